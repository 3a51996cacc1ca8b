"""`fleetctl`: the operator's command line.

This module is the one place that maps Flotilla's exception tree to one-line messages
and exit codes: 0 ok, 1 deploy/check did not succeed, 2 usage or input error,
3 broker unreachable. Anything else escaping is a bug.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path
from typing import NoReturn

from controller import (
    cmd_build,
    cmd_deploy,
    cmd_fleet,
    cmd_logs,
    cmd_rollout,
    cmd_security,
    cmd_serve,
    cmd_steps,
)
from controller.cliutil import EXIT_BROKER, EXIT_OK, EXIT_USAGE
from controller.keys import init_keys
from protocol.errors import BrokerUnavailable, FlotillaError
from protocol.topics import DEFAULT_PREFIX

COMMAND_MODULES = (cmd_build, cmd_deploy, cmd_fleet, cmd_logs, cmd_rollout, cmd_security,
                   cmd_serve, cmd_steps)


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None


def _common() -> Parser:
    p = Parser(add_help=False)
    p.add_argument("--broker", default=os.environ.get("FLEET_BROKER", "mqtt://127.0.0.1:1883"),
                   help="broker URL (env FLEET_BROKER): mqtt://[user[:password]@]host:port, "
                        "mqtts:// (TLS), ws://, wss://. A password in the URL shows in process "
                        "listings: use --password-file instead")
    p.add_argument("--username", default=os.environ.get("FLEET_USERNAME"),
                   help="broker username (env FLEET_USERNAME; default flotilla-controller "
                        "with --password-file)")
    p.add_argument("--password-file", type=Path, default=_env_path("FLEET_PASSWORD_FILE"),
                   help="file holding the broker password (env FLEET_PASSWORD_FILE); the "
                        "recommended way to pass it")
    p.add_argument("--ca-file", type=Path, default=_env_path("FLEET_CA_FILE"),
                   help="TLS: CA certificate the broker's certificate must chain to "
                        "(env FLEET_CA_FILE; default: the system's CAs)")
    p.add_argument("--cert-file", type=Path, default=_env_path("FLEET_CERT_FILE"),
                   help="TLS: client certificate, when the broker requires one "
                        "(env FLEET_CERT_FILE)")
    p.add_argument("--key-file", type=Path, default=_env_path("FLEET_KEY_FILE"),
                   help="TLS: the client certificate's private key (env FLEET_KEY_FILE)")
    p.add_argument("--inventory", type=Path,
                   default=Path(os.environ.get("FLEET_INVENTORY", "./fleet.toml")))
    p.add_argument("--flake", default=os.environ.get("FLEET_FLAKE"), metavar="REF",
                   help="the fleet's flake (env FLEET_FLAKE): hosts are its "
                        "nixosConfigurations, tags their services.flotilla-agent.tags, when "
                        "there is no inventory file (which wins); `build` and `deploy` build "
                        "each host's toplevel from it")
    p.add_argument("--state-dir", type=Path, default=Path(os.environ.get(
        "FLEET_STATE_DIR", Path.home() / ".local/state/flotilla")))
    p.add_argument("--topic-prefix", default=os.environ.get("FLEET_TOPIC_PREFIX",
                                                            DEFAULT_PREFIX))
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = Parser(prog="fleetctl", description="Deploy NixOS systems to a fleet over MQTT.")
    parser.add_argument("--flake", dest="top_flake", metavar="REF",
                        help="as the commands' --flake (`fleetctl --flake REF hosts`)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for module in COMMAND_MODULES:
        module.register(sub, common)
    keys = sub.add_parser("keys", help="controller signing keys", parents=[common])
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, parser_class=Parser)
    init = keys_sub.add_parser("init", help="create the signing key pair", parents=[common])
    init.add_argument("--force", action="store_true")
    init.set_defaults(func=cmd_keys_init)
    return parser


def cmd_keys_init(args: argparse.Namespace) -> int:
    key, pub = init_keys(args.state_dir, force=args.force)
    if args.json:
        print(json.dumps({"private_key": str(key), "public_key": str(pub)}))
    else:
        print(f"created {key} (mode 0600) and {pub}; give {pub} to agents as --trust-key")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "top_flake", None) and not getattr(args, "flake", None):
        args.flake = args.top_flake
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("aiomqtt").setLevel(logging.CRITICAL)
    try:
        result = args.func(args)
        if asyncio.iscoroutine(result):
            result = asyncio.run(result)
        return int(result)
    except BrokerUnavailable as exc:
        print(f"fleetctl: error: {exc}", file=sys.stderr)
        return EXIT_BROKER
    except FlotillaError as exc:
        print(f"fleetctl: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("fleetctl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
