# nix-instantiate --eval --strict --json tests/nix/eval-module.nix --arg settings '{ ... }'
# Evaluates nixos/module.nix with ./lib.nix and ./pkgs.nix: `settings` are the
# definitions of services.flotilla-agent; the result is what the module renders.
{ settings, hostName ? "web1" }:
let
  lib = import ./lib.nix;
  pkgs = import ./pkgs.nix;
  module = import ../../nixos/module.nix;
  call = config: module { inherit config lib pkgs; };
  config = {
    networking.hostName = hostName;
    nix.package = pkgs.nix;
    services.flotilla-agent =
      lib.evalOptions "services.flotilla-agent" (call config).options.services.flotilla-agent
        settings;
  };
  out = lib.resolve (call config).config;
  steps = out.system.build.flotillaSteps;
in
{
  # Option values (null: used but not defined, as `broker` may be when disabled).
  options = builtins.mapAttrs
    (_: v: let r = builtins.tryEval (builtins.deepSeq v v); in if r.success then r.value else null)
    (builtins.removeAttrs config.services.flotilla-agent [ "package" "steps" ]);
  package = "${config.services.flotilla-agent.package}";
  stepsFile = "${steps}";
  stepsText = steps.text;
  systemBuilderCommands = out.system.systemBuilderCommands or null;
  service = out.systemd.services.flotilla-agent or null;
  tmpfiles = out.systemd.tmpfiles.rules or null;
  failedAssertions = map (a: a.message) (builtins.filter (a: !a.assertion) out.assertions);
}
