# The Flotilla package (fleetctl and fleet-agent), built from pyproject.toml.
{ lib, python3Packages }:

python3Packages.buildPythonApplication {
  pname = "flotilla";
  version = "0.1.0";
  pyproject = true;

  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [
      ../pyproject.toml
      ../protocol
      ../client
      ../controller
      (lib.fileset.maybeMissing ../README.md)
    ];
  };

  build-system = with python3Packages; [ setuptools wheel ];

  dependencies = with python3Packages; [
    aiomqtt
    paho-mqtt
    msgpack
    pydantic
    cryptography
    rich
    jsonpatch
    zstandard
  ];

  pythonImportsCheck = [ "protocol" "client" "controller" ];

  meta = {
    description = "MQTT deployment controller for NixOS fleets";
    license = lib.licenses.mit;
    mainProgram = "fleetctl";
    platforms = lib.platforms.linux;
  };
}
