# The real nixpkgs lib (NIX_PATH=nixpkgs=…: /work/shared/nixpkgs-lib here, a nixpkgs
# checkout where there is one) evaluating nixos/module.nix among other modules.
{ modules }:
let
  lib = import <nixpkgs/lib>;
  pkgs = import ./pkgs.nix;
in
lib.evalModules {
  modules = [
    ./nixos-options.nix
    ../../nixos/module.nix
    { _module.args.pkgs = pkgs; nix.package = pkgs.nix; }
  ] ++ modules;
}
