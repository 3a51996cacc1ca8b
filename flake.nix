{
  description = "Flotilla: MQTT deployment controller for NixOS fleets";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs = { self, nixpkgs }:
    let
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forAllSystems = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
    in
    {
      packages = forAllSystems (pkgs: rec {
        flotilla = pkgs.callPackage ./nixos/package.nix { };
        default = flotilla;
      });

      # The module builds the package from this source by default (nixos/package.nix);
      # here it uses this flake's build, so hosts and controller run the same one.
      nixosModules.default = { lib, pkgs, ... }: {
        imports = [ ./nixos/module.nix ];
        services.flotilla-agent.package =
          lib.mkDefault self.packages.${pkgs.stdenv.hostPlatform.system}.default;
      };
      nixosModules.flotilla-agent = self.nixosModules.default;

      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          packages = [ pkgs.python3 pkgs.mosquitto pkgs.nix ];
        };
      });
    };
}
