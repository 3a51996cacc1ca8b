# Fake pkgs for evaluating nixos/module.nix: "derivations" are attrsets with an outPath
# (no store, no daemon); writeText keeps its text so tests can read what was rendered.
let
  fake = name: {
    type = "derivation";
    inherit name;
    outPath = "/nix/store/${builtins.substring 0 32 (builtins.hashString "sha256" name)}-${name}";
  };
in
{
  writeText = name: text: fake name // { inherit text; };
  writeShellScript = name: text: fake name // { inherit text; };
  callPackage = _fn: _args: fake "flotilla-0.1.0";
  nix = fake "nix-2.24.10";
  systemd = fake "systemd-256.8";
  coreutils = fake "coreutils-9.5";
  util-linux = fake "util-linux-2.40.2";
  shadow = fake "shadow-4.16.0";
  findutils = fake "findutils-4.10.0";
  postgresql_15 = fake "postgresql-15.8" // { version = "15.8"; };
  postgresql_16 = fake "postgresql-16.4" // { version = "16.4"; };
}
