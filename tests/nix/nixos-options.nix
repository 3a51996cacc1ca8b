# The NixOS options nixos/module.nix and the examples touch, declared with nixpkgs' own
# lib.types the way nixos/modules declares them (simplified where NixOS uses its own
# unit-option types), so `lib.evalModules` merges, prioritises and checks definitions
# exactly as on a NixOS host. The fake pkgs (./pkgs.nix) come in as `_module.args.pkgs`.
{ lib, ... }:
let
  inherit (lib) mkOption types;
  unitOption = types.oneOf [ types.bool types.int types.str (types.listOf types.str) ];
  service = types.submodule {
    options = {
      description = mkOption { type = types.str; default = ""; };
      wantedBy = mkOption { type = types.listOf types.str; default = [ ]; };
      wants = mkOption { type = types.listOf types.str; default = [ ]; };
      after = mkOption { type = types.listOf types.str; default = [ ]; };
      restartIfChanged = mkOption { type = types.bool; default = true; };
      unitConfig = mkOption { type = types.attrsOf unitOption; default = { }; };
      path = mkOption { type = types.listOf (types.either types.package types.str); default = [ ]; };
      preStart = mkOption { type = types.lines; default = ""; };
      serviceConfig = mkOption { type = types.attrsOf unitOption; default = { }; };
    };
  };
in
{
  options = {
    networking.hostName = mkOption { type = types.str; default = "nixos"; };
    nix.package = mkOption { type = types.package; };
    assertions = mkOption { type = types.listOf types.unspecified; default = [ ]; };
    warnings = mkOption { type = types.listOf types.str; default = [ ]; };
    system.build = mkOption {
      type = types.submoduleWith {
        modules = [ { freeformType = with types; lazyAttrsOf (uniq unspecified); } ];
      };
      default = { };
    };
    system.systemBuilderCommands = mkOption { type = types.lines; default = ""; internal = true; };
    systemd.services = mkOption { type = types.attrsOf service; default = { }; };
    systemd.tmpfiles.rules = mkOption { type = types.listOf types.str; default = [ ]; };
    services.postgresql = {
      enable = mkOption { type = types.bool; default = false; };
      package = mkOption { type = types.package; };
      dataDir = mkOption { type = types.path; };
      initdbArgs = mkOption { type = types.listOf types.str; default = [ ]; };
    };
    users.users = mkOption {
      type = types.attrsOf (types.submodule ({ name, ... }: {
        options.name = mkOption { type = types.str; default = name; };
        options.uid = mkOption { type = types.nullOr types.int; default = null; };
      }));
      default = { };
    };
    users.groups = mkOption {
      type = types.attrsOf (types.submodule ({ name, ... }: {
        options.name = mkOption { type = types.str; default = name; };
        options.gid = mkOption { type = types.nullOr types.int; default = null; };
      }));
      default = { };
    };
  };
}
