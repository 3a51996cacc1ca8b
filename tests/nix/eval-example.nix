# nix-instantiate --eval --strict --json tests/nix/eval-example.nix \
#   --arg example ./nixos/examples/X.nix --arg host 'pkgs: { ...host config... }'
# Evaluates an example module (its step definitions) through nixos/module.nix and
# returns the rendered steps plus the text of every program they name.
{ example, host }:
let
  lib = import ./lib.nix;
  pkgs = import ./pkgs.nix;
  exampleModule = import example { config = host pkgs; inherit lib pkgs; };
  defs = lib.resolve (exampleModule.config or exampleModule);
  stepDefs = defs.services.flotilla-agent.steps or { };
  agent = import ../../nixos/module.nix;
  call = config: agent { inherit config lib pkgs; };
  config = {
    networking.hostName = "db1";
    nix.package = pkgs.nix;
    services.flotilla-agent = lib.evalOptions "services.flotilla-agent"
      (call config).options.services.flotilla-agent { steps = stepDefs; };
  };
  out = lib.resolve (call config).config;
  programsOf = s: builtins.filter (p: p != null)
    ([ (s.check or null) (s.dump or null) (s.restore or null) ]
     ++ builtins.attrValues (s.migrations or { }));
  programs = builtins.concatMap programsOf (builtins.attrValues stepDefs);
in
{
  steps = (builtins.fromJSON out.system.build.flotillaSteps.text).steps;
  failedAssertions = map (a: a.message) (builtins.filter (a: !a.assertion) out.assertions);
  programs = builtins.listToAttrs (map (p: { name = "${p}"; value = p.text; }) programs);
}
