# nix-instantiate --eval --strict --json tests/nix/eval-example.nix \
#   --arg example ./nixos/examples/X.nix --arg host 'pkgs: { ...host config... }'
# Evaluates an example module through nixos/module.nix with lib.evalModules and returns
# the rendered steps plus the text of every program they name.
{ example, host }:
let
  pkgs = import ./pkgs.nix;
  eval = import ./eval.nix { modules = [ example (host pkgs) { networking.hostName = "db1"; } ]; };
  config = eval.config;
  stepDefs = config.services.flotilla-agent.steps;
  programsOf = s: builtins.filter (p: p != null)
    ([ s.check s.dump s.restore ] ++ builtins.attrValues s.migrations);
  programs = builtins.concatMap programsOf (builtins.attrValues stepDefs);
in
{
  steps = (builtins.fromJSON config.system.build.flotillaSteps.text).steps;
  failedAssertions = map (a: a.message) (builtins.filter (a: !a.assertion) config.assertions);
  programs = builtins.listToAttrs (map (p: { name = "${p}"; value = p.text; }) programs);
}
