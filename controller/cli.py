"""`fleetctl`: the operator's command line.

This module is the one place that maps Flotilla's exception tree to one-line messages
and exit codes: 0 ok, 1 deploy/check did not succeed, 2 usage or input error,
3 broker unreachable. Anything else escaping is a bug.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from controller.commands import build, deploy, fleet, logs, rollout, security, serve, steps
from controller.commands.cliutil import EXIT_BROKER, EXIT_OK, EXIT_USAGE
from controller.state.keys import init_keys
from protocol import cliargs
from protocol.broker import DEFAULT_CONNECT_TIMEOUT_S
from protocol.cliargs import DefaultsHelpFormatter
from protocol.errors import BrokerUnavailable, FlotillaError, InputError
from protocol.mqtt import DEFAULT_MQTT_VERSION
from protocol.topics import DEFAULT_PREFIX

COMMAND_MODULES = (build, deploy, fleet, logs, rollout, security, serve, steps)


class HelpFormatter(DefaultsHelpFormatter):
    """The common options' parsers default to SUPPRESS: their help shows COMMON_DEFAULTS."""

    def default_of(self, action: argparse.Action) -> Any:
        if action.default is argparse.SUPPRESS:
            return COMMON_DEFAULTS.get(action.dest, argparse.SUPPRESS)
        return action.default


class Parser(cliargs.Parser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None


# The options every command takes, before or after the command name. Their parsers
# default to SUPPRESS (so a subcommand's defaults never overwrite a value given before
# it); `main` fills in these defaults afterwards.
COMMON_DEFAULTS: dict[str, Any] = {}


def _common() -> Parser:
    p = Parser(add_help=False)

    def opt(*names: str, default: Any, **kw: Any) -> None:
        action = p.add_argument(*names, default=argparse.SUPPRESS, **kw)
        COMMON_DEFAULTS[action.dest] = default

    opt("--broker", default=os.environ.get("FLEET_BROKER", "mqtt://127.0.0.1:1883"),
        help="broker URL (env FLEET_BROKER): mqtt://[user[:password]@]host:port, "
             "mqtts:// (TLS), ws://, wss://; a cluster's nodes as comma-separated URLs "
             "(the first that answers is used, the next on failover). A password in the "
             "URL shows in process listings: use --password-file instead")
    # Defaults are raw (env) strings, checked with the rest of the broker options.
    opt("--mqtt-version", type=cliargs.MQTT_VERSION,
        default=os.environ.get("FLEET_MQTT_VERSION", DEFAULT_MQTT_VERSION),
        help="MQTT protocol: 5, or 3.1.1 for brokers that speak only 3.1.1, such as "
             "NATS (env FLEET_MQTT_VERSION)")
    opt("--connect-timeout", type=cliargs.SECONDS,
        default=os.environ.get("FLEET_CONNECT_TIMEOUT", DEFAULT_CONNECT_TIMEOUT_S),
        help="seconds to keep trying every listed broker address at start before giving "
             "up with exit 3 (env FLEET_CONNECT_TIMEOUT)")
    opt("--username", default=os.environ.get("FLEET_USERNAME"),
        help="broker username (env FLEET_USERNAME; default: flotilla-controller "
             "with --password-file)")
    opt("--password-file", type=Path, default=_env_path("FLEET_PASSWORD_FILE"),
        help="file holding the broker password (env FLEET_PASSWORD_FILE); the "
             "recommended way to pass it")
    opt("--ca-file", type=Path, default=_env_path("FLEET_CA_FILE"),
        help="TLS: CA certificate the broker's certificate must chain to "
             "(env FLEET_CA_FILE; default: the system's CAs)")
    opt("--cert-file", type=Path, default=_env_path("FLEET_CERT_FILE"),
        help="TLS: client certificate, when the broker requires one (env FLEET_CERT_FILE)")
    opt("--key-file", type=Path, default=_env_path("FLEET_KEY_FILE"),
        help="TLS: the client certificate's private key (env FLEET_KEY_FILE)")
    # --inventory and --state-dir stay text until `checked_paths` (Path("") is ".")
    opt("--inventory", default=os.environ.get("FLEET_INVENTORY", "fleet.toml"),
        help="the fleet.toml naming hosts, tags, groups and [rollout] defaults "
             "(env FLEET_INVENTORY)")
    opt("--flake", default=os.environ.get("FLEET_FLAKE"), metavar="REF",
        help="the fleet's flake (env FLEET_FLAKE): hosts are its nixosConfigurations, tags "
             "their services.flotilla-agent.tags, when there is no inventory file (which "
             "wins); `build` and `deploy` build each host's toplevel from it")
    opt("--state-dir", default=os.environ.get(
        "FLEET_STATE_DIR", str(Path.home() / ".local/state/flotilla")),
        help="the controller's keys, event log (state.jsonl), logs and locks "
             "(env FLEET_STATE_DIR)")
    opt("--topic-prefix", default=os.environ.get("FLEET_TOPIC_PREFIX", DEFAULT_PREFIX),
        help="MQTT topic prefix shared with the agents (env FLEET_TOPIC_PREFIX)")
    opt("--json", action="store_true", default=False, help="machine-readable output")
    opt("-v", "--verbose", action="store_true", default=False,
        help="debug logging on stderr")
    return p


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = Parser(prog="fleetctl", description="Deploy NixOS systems to a fleet over MQTT.",
                    parents=[common], epilog="Exit codes: 0 ok; 1 a deploy, check, watch or "
                    "answer did not succeed; 2 usage or input error; 3 broker unreachable; "
                    "130 interrupted (Ctrl-C).")
    parser.add_argument("--version", action="version", version=f"fleetctl {version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for module in COMMAND_MODULES:
        module.register(sub, common)
    keys = sub.add_parser("keys", help="controller signing keys", parents=[common])
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, parser_class=Parser)
    init = keys_sub.add_parser("init", help="create the signing key pair", parents=[common])
    init.add_argument("--force", action="store_true", help="replace an existing key pair")
    init.set_defaults(func=cmd_keys_init)
    return parser


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version
    try:
        return dist_version("flotilla")
    except PackageNotFoundError:
        return "unknown"


def with_defaults(args: argparse.Namespace) -> argparse.Namespace:
    for key, value in COMMON_DEFAULTS.items():
        if not hasattr(args, key):
            setattr(args, key, value)
    return args


def checked_paths(args: argparse.Namespace) -> None:
    """--inventory and --state-dir (or their variables) as paths, checked before any
    command reads or writes there: an empty one is an error (not the current directory),
    and a state dir that exists must be a directory."""
    for dest, env in (("inventory", "FLEET_INVENTORY"), ("state_dir", "FLEET_STATE_DIR")):
        where = f"--{dest.replace('_', '-')} (env {env})"
        text = str(getattr(args, dest))
        if not text:
            raise InputError(f"{where} is empty: give a path")
        setattr(args, dest, Path(text))
    if args.state_dir.exists() and not args.state_dir.is_dir():
        raise InputError(f"--state-dir (env FLEET_STATE_DIR): {args.state_dir} is not a "
                         "directory")


HOSTS_COMMANDS = ("add", "list")


def default_hosts_list(argv: list[str]) -> list[str]:
    """`fleetctl hosts [SELECTOR]` lists hosts: insert the implicit `list`."""
    if "hosts" not in argv:
        return argv
    i = argv.index("hosts")
    rest = argv[i + 1:]
    if rest and rest[0] in (*HOSTS_COMMANDS, "-h", "--help"):
        return argv
    return [*argv[:i + 1], "list", *rest]


def cmd_keys_init(args: argparse.Namespace) -> int:
    key, pub = init_keys(args.state_dir, force=args.force)
    if args.json:
        print(json.dumps({"private_key": str(key), "public_key": str(pub)}))
    else:
        print(f"created {key} (mode 0600) and {pub}; give {pub} to agents as --trust-key")
    return EXIT_OK


EXIT_TERMINATED = 128 + signal.SIGTERM


class Terminated(Exception):
    """SIGTERM arrived (systemd, `timeout`, a CI runner stopping a job)."""


async def cancel_on_sigterm(coro: Any) -> Any:
    """Run a command so that SIGTERM cancels it as Ctrl-C does: its clean-up runs (a
    demo stops its broker and agents, a deploy says how to resume its rollout) instead
    of the process dying where it stands."""
    loop, task = asyncio.get_running_loop(), asyncio.current_task()
    assert task is not None
    terminated = False

    def on_sigterm() -> None:
        nonlocal terminated
        terminated = True
        task.cancel()

    def on_callback_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        # aiomqtt's disconnect callback asks a cancelled connect future for its
        # exception: a command cancelled while it connects is no error to report
        if not isinstance(context.get("exception"), asyncio.CancelledError):
            loop.default_exception_handler(context)

    loop.set_exception_handler(on_callback_error)
    loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    try:
        return await coro
    except asyncio.CancelledError:
        if terminated:
            raise Terminated from None
        raise
    finally:
        with contextlib.suppress(ValueError, RuntimeError):
            loop.remove_signal_handler(signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    argv = default_hosts_list(list(sys.argv[1:] if argv is None else argv))
    args = with_defaults(build_parser().parse_args(argv))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # aiomqtt's paho client logs through "mqtt" (an ERROR for every dropped socket); the
    # caller reports a lost connection itself, and how it handles it (-v shows paho's)
    for name in ("aiomqtt", "mqtt"):
        logging.getLogger(name).setLevel(logging.DEBUG if args.verbose else logging.CRITICAL)
    try:
        checked_paths(args)
        result = args.func(args)
        if asyncio.iscoroutine(result):
            result = asyncio.run(cancel_on_sigterm(result))
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
    except Terminated:
        print("fleetctl: terminated", file=sys.stderr)
        return EXIT_TERMINATED
    except BrokenPipeError:  # `fleetctl logs … | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
