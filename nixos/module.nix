# services.flotilla-agent: the Flotilla host agent, and the state steps this system carries.
#
# Steps are rendered to $toplevel/flotilla/steps.json (the schema of protocol/steps.py),
# so the agent can run the *new* system's checks before switching to it. The service is
# never restarted or stopped by a switch (like system.autoUpgrade): the agent is the one
# running that switch, and a restart mid-deploy would cut its own rollback short; when
# its unit changed, the agent restarts itself once the deployment is recorded.
{ config, lib, pkgs, ... }:

let
  inherit (lib) mkEnableOption mkIf mkMerge mkOption types;
  cfg = config.services.flotilla-agent;

  program = types.nullOr types.path;

  stepModule = { ... }: {
    options = {
      after = mkOption {
        type = types.listOf types.str;
        default = [ ];
        description = "Steps whose migrations must finish before this step's start.";
      };
      user = mkOption {
        type = types.nullOr types.str;
        default = null;
        description = "User the step's programs run as (null: the agent's user).";
      };
      phase = mkOption {
        type = types.enum [ "before-switch" "after-switch" ];
        default = "after-switch";
        description = "Whether the migrations run before or after switch-to-configuration.";
      };
      revision = mkOption {
        type = types.str;
        default = "0";
        description = "Version of the service's state format; dumps are keyed by it.";
      };
      idempotent = mkOption {
        type = types.bool;
        default = false;
        description = "May be re-run after a crash mid-run (otherwise the agent asks).";
      };
      check = mkOption {
        type = program;
        default = null;
        description = ''Program printing {"items": [...]} about this host, run before switching.'';
      };
      migrations = mkOption {
        type = types.attrsOf types.path;
        default = { };
        description = ''Choice id -> program; "*" runs for any choice or when there are no items.'';
      };
      dump = mkOption {
        type = program;
        default = null;
        description = "Program that dumps the state into $FLOTILLA_DUMP_DIR (with restore).";
      };
      restore = mkOption {
        type = program;
        default = null;
        description = "Program that restores the state from $FLOTILLA_DUMP_DIR (with dump).";
      };
      paths = mkOption {
        type = types.listOf types.str;
        default = [ ];
        description = "Paths archived before migrating and restored on rollback (instead of dump/restore).";
      };
    };
  };

  nullableString = p: if p == null then null else "${p}";

  renderStep = name: s: {
    inherit name;
    inherit (s) after user phase revision idempotent paths;
    check = nullableString s.check;
    migrations = builtins.mapAttrs (_: p: "${p}") s.migrations;
    dump = nullableString s.dump;
    restore = nullableString s.restore;
  };

  stepsJson = pkgs.writeText "flotilla-steps.json"
    (builtins.toJSON { steps = lib.mapAttrsToList renderStep cfg.steps; });

  stepNames = builtins.attrNames cfg.steps;
  where = name: "services.flotilla-agent.steps.${name}";
  stepAssertions = lib.concatLists (lib.mapAttrsToList (name: s: [
    {
      assertion = builtins.match "[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}" name != null;
      message = "${where name}: a step name is 1-64 of A-Z a-z 0-9 _ . - and starts with a letter, digit or _";
    }
    {
      assertion = builtins.match "[A-Za-z0-9_.+-]{1,64}" s.revision != null;
      message = "${where name}.revision: use 1-64 of A-Z a-z 0-9 _ . + -";
    }
    {
      assertion = (s.dump == null) == (s.restore == null);
      message = "${where name}: dump and restore go together";
    }
    {
      assertion = s.dump == null || s.paths == [ ];
      message = "${where name}: use either dump/restore or paths, not both";
    }
  ] ++ map (dep: {
    assertion = builtins.elem dep stepNames;
    message = "${where name}.after: there is no step ${dep}";
  }) s.after) cfg.steps);

  # What `fleet-agent run` refuses at start (protocol/broker.py parse_broker_urls), so a
  # host whose unit would only exit and restart fails evaluation instead. Messages never
  # quote the broker (it may hold a password); a URL's port and path are left to the agent.
  brokerEntries = map lib.trim (lib.splitString "," cfg.broker);
  brokerUrl = u: builtins.match "(mqtts?|wss?)://([^@/?#]*@)?[^@/?#:].*" (lib.toLower u) != null;
  brokerAssertions = let opt = "services.flotilla-agent.broker"; in
    if lib.all (u: u == "") brokerEntries then [ {
      assertion = false;
      message = "${opt}: no broker URL given (example: mqtt://127.0.0.1:1883)";
    } ] else [
      {
        assertion = lib.all (u: u != "") brokerEntries;
        message = "${opt}: invalid broker list: an empty entry between commas";
      }
      {
        assertion = lib.all (u: u == "" || brokerUrl u) brokerEntries;
        message = "${opt}: not a broker URL (use mqtt://, mqtts://, ws:// or wss:// and a host; example: mqtts://broker.example:8883)";
      }
      {
        assertion = lib.all (u: builtins.match "[a-zA-Z]+://[^@/?#]*:[^@/?#]*@.*" u == null)
          brokerEntries;
        message = "${opt}: a broker URL holds a password, which would end up in the world-readable Nix store: give it in credentialsFile";
      }
      {
        assertion = lib.allUnique (map lib.toLower (lib.filter (u: u != "") brokerEntries));
        message = "${opt}: invalid broker list: an address is listed twice";
      }
    ];

  pemMarker = "-----BEGIN PUBLIC KEY-----";
  keyAssertions = map (k: {
    assertion = !builtins.isString k || lib.hasPrefix "/" k || lib.hasInfix pemMarker k;
    message = "services.flotilla-agent.trustedKeys: \"${k}\" is neither an absolute path nor PEM text (${pemMarker}); give a relative file as a path: ./${k}";
  }) cfg.trustedKeys;

  # A key is a file (path, or a string that is an absolute path) or PEM text.
  keyFile = k:
    if builtins.isString k && !(lib.hasPrefix "/" k)
    then pkgs.writeText "flotilla-trusted-key.pem" k
    else k;
  keyFiles = map (k: "${keyFile k}") cfg.trustedKeys;
  trustFile = "/run/flotilla-agent/trusted-keys.pem";

  # ExecStart is parsed by systemd, not a shell: quote like nixpkgs'
  # utils.escapeSystemdExecArg (a JSON string, which systemd's C-style quoting reads;
  # `%` doubled so no specifier expands, `$` doubled so no variable does).
  arg = v: builtins.replaceStrings [ "%" "$" ] [ "%%" "$$" ] (builtins.toJSON v);
  agentArgs =
    map arg ([ "run" "--backend" "nixos" "--host" cfg.host "--broker" cfg.broker
               "--state-dir" cfg.stateDir "--trust-key" trustFile ]
             ++ lib.optionals (cfg.username != null) [ "--username" cfg.username ]
             ++ lib.optionals (cfg.mqttVersion != "5") [ "--mqtt-version" cfg.mqttVersion ])
    # %d is the service's credentials directory (LoadCredential below).
    ++ lib.optionals (cfg.credentialsFile != null) [ "--password-file" "%d/broker-password" ]
    ++ map arg cfg.extraArgs;
in
{
  options.services.flotilla-agent = {
    enable = mkEnableOption "the Flotilla deployment agent";

    package = mkOption {
      type = types.package;
      default = pkgs.callPackage ./package.nix { };
      defaultText = lib.literalExpression "pkgs.callPackage ./package.nix { }";
      description = "The Flotilla package providing fleet-agent.";
    };

    host = mkOption {
      type = types.str;
      default = config.networking.hostName;
      defaultText = lib.literalExpression "config.networking.hostName";
      description = "This host's name in the fleet (its MQTT topics and credentials).";
    };

    broker = mkOption {
      type = types.str;
      example = "mqtts://mqtt.example.org:8883";
      description = ''
        Broker URL: mqtt://, mqtts://, ws:// or wss://, without a password. For a broker
        cluster (NATS), every node's URL, comma-separated: the agent uses the first that
        answers and fails over to the next.
      '';
    };

    mqttVersion = mkOption {
      type = types.enum [ "5" "3.1.1" ];
      default = "5";
      description = ''
        MQTT protocol version: "5", or "3.1.1" for brokers that speak only 3.1.1 (the
        NATS MQTT gateway). Must match the controller's --mqtt-version.
      '';
    };

    username = mkOption {
      type = types.nullOr types.str;
      default = null;
      description = "Broker user name (null: the host name when a password is set).";
    };

    credentialsFile = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "/run/secrets/flotilla-broker-password";
      description = ''
        File holding the broker password, read by systemd (LoadCredential) at start.
        A string, not a path, so the secret is never copied into the Nix store.
      '';
    };

    trustedKeys = mkOption {
      type = types.listOf (types.either types.path types.str);
      default = [ ];
      description = ''
        Controller public keys (ed25519 PEM) whose signatures the agent accepts:
        files (paths, or absolute path strings read at service start) or PEM text.
      '';
    };

    tags = mkOption {
      type = types.listOf (types.strMatching "[^,]+");
      default = [ ];
      example = [ "web" "eu" ];
      description = ''
        This host's tags in the fleet: with no fleet.toml, `fleetctl --flake REF` reads them
        from each nixosConfiguration, so `@web` selects from the flake alone.
      '';
    };

    stateDir = mkOption {
      type = types.str;
      default = "/var/lib/flotilla";
      description = "Journal, dumps and the agent's state; must survive reboots.";
    };

    extraArgs = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "--from-cache" "https://cache.example.org" ];
      description = "Extra arguments of `fleet-agent run`.";
    };

    steps = mkOption {
      type = types.attrsOf (types.submodule stepModule);
      default = { };
      description = ''
        State steps of this system (see protocol/steps.py): checks that predict whether
        the switch will work on this host, migrations per choice, dumps for rollback.
      '';
    };
  };

  config = mkMerge [
    {
      assertions = stepAssertions;
      # Carried by every system that declares steps, whether or not the agent is enabled.
      system.build.flotillaSteps = stepsJson;
    }

    (mkIf (cfg.steps != { }) {
      system.systemBuilderCommands = ''
        mkdir -p $out/flotilla
        cp ${stepsJson} $out/flotilla/steps.json
      '';
    })

    (mkIf cfg.enable {
      assertions = [
        {
          assertion = builtins.match "[a-z0-9][a-z0-9-]{0,62}" cfg.host != null;
          message = "services.flotilla-agent.host = \"${cfg.host}\" is not a valid fleet host name (1-63 of a-z 0-9 -): set it explicitly";
        }
        {
          assertion = cfg.trustedKeys != [ ];
          message = "services.flotilla-agent.trustedKeys: give at least one controller public key";
        }
        {
          assertion = cfg.credentialsFile == null || lib.hasPrefix "/" cfg.credentialsFile;
          message = "services.flotilla-agent.credentialsFile must be an absolute path";
        }
        {
          assertion = lib.hasPrefix "/" cfg.stateDir;
          message = "services.flotilla-agent.stateDir must be an absolute path";
        }
      ] ++ brokerAssertions ++ keyAssertions;

      systemd.tmpfiles.rules = [ "d ${cfg.stateDir} 0700 root root - -" ];

      systemd.services.flotilla-agent = {
        description = "Flotilla deployment agent";
        wantedBy = [ "multi-user.target" ];
        wants = [ "network-online.target" ];
        after = [ "network-online.target" ];
        # A switch must never restart or stop the agent that runs it (system.autoUpgrade does the same).
        restartIfChanged = false;
        unitConfig.X-StopOnRemoval = false;
        # nix, nix-store, nix-env; systemd-run and systemctl.
        path = [ config.nix.package pkgs.systemd ];
        preStart = ''
          cat ${lib.escapeShellArgs keyFiles} > ${trustFile}.tmp
          mv ${trustFile}.tmp ${trustFile}
        '';
        serviceConfig = {
          ExecStart = "${cfg.package}/bin/fleet-agent ${builtins.concatStringsSep " " agentArgs}";
          Restart = "always";
          RestartSec = 5;
          RuntimeDirectory = "flotilla-agent";
          LoadCredential = lib.optional (cfg.credentialsFile != null)
            "broker-password:${cfg.credentialsFile}";
        };
      };
    })
  ];
}
