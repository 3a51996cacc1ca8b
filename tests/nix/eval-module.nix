# nix-instantiate --eval --strict --json tests/nix/eval-module.nix --arg settings '{ ... }'
# Evaluates nixos/module.nix with lib.evalModules (./eval.nix): `settings` are the
# definitions of services.flotilla-agent, `modules` more modules (a user's, a flake's:
# they merge, with priorities, as on a host); the result is what the module renders.
{ settings ? { }, modules ? [ ], hostName ? "web1" }:
let
  eval = import ./eval.nix {
    modules = [ { networking.hostName = hostName; services.flotilla-agent = settings; } ]
      ++ modules;
  };
  config = eval.config;
  cfg = config.services.flotilla-agent;
  steps = config.system.build.flotillaSteps;
  try = v: let r = builtins.tryEval (builtins.deepSeq v v); in if r.success then r.value else null;
in
{
  # Option values (null: used but not defined, as `broker` may be when disabled).
  options = builtins.mapAttrs (_: try) (builtins.removeAttrs cfg [ "package" "steps" ]);
  package = "${cfg.package}";
  stepsFile = "${steps}";
  stepsText = steps.text;
  systemBuilderCommands = if config.system.systemBuilderCommands == "" then null
    else config.system.systemBuilderCommands;
  service = try (config.systemd.services.flotilla-agent or null);
  tmpfiles = if config.systemd.tmpfiles.rules == [ ] then null else config.systemd.tmpfiles.rules;
  failedAssertions = map (a: a.message) (builtins.filter (a: !a.assertion) config.assertions);
}
