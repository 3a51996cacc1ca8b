"""`fleet-agent`: command line of the host agent. Errors map to one line + exit code."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path

from client.agent import Agent, AgentConfig
from client.ask import prompt_tui
from client.ask.notify import NotifyConfig
from client.host.backend import BackendError, SystemBackend
from client.host.sim import SimSettings, SimulatedBackend
from client.journal import JOURNAL_NAME, check_file, repair_file
from client.steps.dumps import check_age_keys
from protocol import cliargs
from protocol.broker import BrokerCluster, read_password_file
from protocol.cliargs import DefaultsHelpFormatter
from protocol.errors import BrokerRefused, FlotillaError, InputError, UsageError
from protocol.mqtt import DEFAULT_MQTT_VERSION
from protocol.prompts import DEFAULT_TONIGHT, parse_hhmm
from protocol.signing import load_public_keys
from protocol.topics import DEFAULT_PREFIX, Topics, validate_host

EXIT_USAGE, EXIT_BROKER = 2, 3


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--broker", default=os.environ.get("FLEET_BROKER", "mqtt://127.0.0.1:1883"),
                   help="broker URL mqtt://[user[:password]@]host:port (mqtts:// for TLS, ws://,"
                        " wss://); a cluster's nodes as comma-separated URLs (the first that"
                        " answers is used, the next on failover). Env FLEET_BROKER. A password"
                        " in the URL shows in process listings: use --password-file instead")
    p.add_argument("--mqtt-version", type=cliargs.MQTT_VERSION,
                   default=os.environ.get("FLEET_MQTT_VERSION", DEFAULT_MQTT_VERSION),
                   help="MQTT protocol: 5, or 3.1.1 for brokers that speak only"
                        " 3.1.1, such as NATS (env FLEET_MQTT_VERSION)")
    p.add_argument("--username", help="broker username (default: the host name)")
    p.add_argument("--password-file", type=Path,
                   help="file holding the broker password (recommended way to pass it)")
    p.add_argument("--ca-file", type=Path,
                   help="TLS: CA certificate(s) the broker's certificate must chain to"
                        " (default: the system's CAs)")
    p.add_argument("--cert-file", type=Path,
                   help="TLS: this host's client certificate (from 'fleetctl certs host')")
    p.add_argument("--key-file", type=Path, help="TLS: the client certificate's private key")
    p.add_argument("--trust-key", type=Path, required=True,
                   help="controller public key(s) (PEM) that sign desired states and answers")
    p.add_argument("--topic-prefix", default=DEFAULT_PREFIX,
                   help="MQTT topic prefix shared with the controller")
    p.add_argument("--backend", choices=["auto", "sim", "nixos"], default="auto",
                   help="nixos: really fetch and switch this host; sim: pretend (tests, "
                        "demo); auto: nixos when ROOT/run/current-system exists, else sim "
                        "(the choice is logged at start)")
    p.add_argument("--root", type=Path, default=Path("/"),
                   help="nixos backend: prefix for /run and /nix/var paths (tests)")
    p.add_argument("--from-cache", metavar="URL",
                   help="nixos backend: binary cache to 'nix copy --from' before realising")
    p.add_argument("--sim-fetch-delay", type=cliargs.SECONDS_OR_ZERO, default=0.0,
                   help="sim backend: seconds a fetch takes")
    p.add_argument("--sim-switch-delay", type=cliargs.SECONDS_OR_ZERO, default=0.0,
                   help="sim backend: seconds a switch takes")
    p.add_argument("--sim-fail-rate", type=cliargs.SHARE, default=0.0,
                   help="sim backend: share of hosts whose fetch or switch fails (per "
                        "host and system, from --sim-seed)")
    p.add_argument("--sim-fail-stage", choices=["fetch", "switch"], default="switch",
                   help="sim backend: which stage --sim-fail-rate fails")
    p.add_argument("--sim-seed", default="", help="sim backend: seed of --sim-fail-rate")
    p.add_argument("--sim-system", metavar="PATH",
                   help="sim backend: the system a new simulated host runs before its first "
                        "deploy (default: none, so a rollback has nothing to go back to)")
    p.add_argument("--home-assistant", action="store_true",
                   help="announce this host to Home Assistant (MQTT discovery)")
    p.add_argument("--ha-prefix", default="homeassistant", help="discovery prefix")
    p.add_argument("--ha-reboot", action="store_true",
                   help="offer a reboot button in Home Assistant when a reboot is pending")
    p.add_argument("--control-group", default="wheel",
                   help="group allowed to use the local control socket (fleet-agent prompt)")
    p.add_argument("--notify-desktop", action="store_true",
                   help="desktop notification to logged-in users when a prompt opens")
    p.add_argument("--notify-wall", action="store_true",
                   help="wall message to terminal users when a prompt opens")
    p.add_argument("--defer-tonight", default=DEFAULT_TONIGHT, metavar="HH:MM",
                   help="when 'tonight' is for a user deferring an approval (host-local)")
    p.add_argument("--dump-retention", type=cliargs.AT_LEAST_ONE, default=3,
                   help="dumps kept per step")
    p.add_argument("--age-recipient", help="encrypt dumps to this age recipient (pyrage)")
    p.add_argument("--age-identity", help="file with the age identity that decrypts dumps "
                                          "on rollback (as age-keygen writes it)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


class _RawDefaults(argparse.RawDescriptionHelpFormatter, DefaultsHelpFormatter):
    pass


def build_parser() -> argparse.ArgumentParser:
    fmt = DefaultsHelpFormatter
    parser = cliargs.Parser(prog="fleet-agent", description=__doc__, formatter_class=fmt)
    parser.add_argument("--version", action="version", version=f"fleet-agent {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=cliargs.Parser)
    run = sub.add_parser("run", help="run the agent for this host", formatter_class=fmt)
    run.add_argument("--host", required=True, help="this host's name (as in the inventory)")
    run.add_argument("--state-dir", type=cliargs.path, default=Path("/var/lib/flotilla"),
                     help="journal, dumps, deployment logs and the control socket")
    _common(run)
    sim = sub.add_parser("simulate", help="run many simulated agents in one process",
                         formatter_class=fmt)
    sim.add_argument("--hosts", required=True, help="comma-separated host names")
    sim.add_argument("--state-dir", type=cliargs.path, required=True,
                     help="parent dir; each host gets STATE_DIR/HOST")
    _common(sim)
    prompt = sub.add_parser("prompt", help="answer this host's open prompts (local socket)",
                            description=prompt_tui.__doc__,
                            formatter_class=_RawDefaults)
    prompt_tui.add_arguments(prompt)
    jr = sub.add_parser("journal", help="check or repair the agent's journal",
                        description="check: report unreadable records (exit 1 when the agent"
                        " would refuse to start). repair (agent stopped): keep the damaged"
                        " file aside, keep every readable record; steps of the running"
                        " deployment not recorded as done count as interrupted",
                        formatter_class=fmt)
    jr.add_argument("action", choices=["check", "repair"], help="check or repair")
    jr.add_argument("--state-dir", type=cliargs.path, default=Path("/var/lib/flotilla"),
                    help="the agent's state directory (holds journal.jsonl)")
    return parser


def _steps_of(toplevel: str) -> list[str]:
    from client.steps.programs import load_steps
    try:
        return [s.name for s in load_steps(toplevel).steps]
    except BackendError as exc:
        print(f"fleet-agent: warning: {exc}", file=sys.stderr)
        return []


def journal_command(args: argparse.Namespace) -> int:
    path = args.state_dir / JOURNAL_NAME
    if args.action == "check":
        ok, lines = check_file(path)
        print("\n".join(lines))
        return 0 if ok else 1
    print("\n".join(repair_file(path, _steps_of)))
    return 0


def _broker(args: argparse.Namespace, host: str) -> BrokerCluster:
    broker = BrokerCluster.parse(args.broker, args.mqtt_version)
    password = None
    if args.password_file is not None:
        password = read_password_file(args.password_file)
    username = args.username or (
        host if password and not broker.addresses[0].username else None)
    return broker.with_credentials(username, password).with_tls(
        args.ca_file, args.cert_file, args.key_file)


def choose_backend(requested: str, root: Path) -> tuple[str, str]:
    """(backend, why): `auto` is nixos on a NixOS host (it has /run/current-system);
    `nixos` on a host without it is a usage error (every deploy would fail there)."""
    marker = root / "run" / "current-system"
    if requested == "nixos" and not marker.exists():
        raise UsageError(f"--backend nixos: {marker} does not exist, so this is no NixOS "
                         "host (or give --root the prefix that has it)")
    if requested != "auto":
        return requested, "--backend " + requested
    if marker.exists():
        return "nixos", f"auto: {marker} exists"
    return "sim", f"auto: {marker} does not exist, so this is no NixOS host; nothing is " \
                  "really switched"


def make_backend(args: argparse.Namespace, host: str, state_dir: Path, backend: str
                 ) -> SystemBackend:
    if backend == "nixos":
        from client.host.nixos import NixosBackend
        return NixosBackend(root=args.root, state_dir=state_dir, from_cache=args.from_cache)
    settings = SimSettings(args.sim_fetch_delay, args.sim_switch_delay, args.sim_fail_rate,
                           args.sim_fail_stage, args.sim_seed, args.sim_system)
    return SimulatedBackend(state_dir, host, settings)


def parse_hosts(text: str) -> list[str]:
    """`simulate --hosts a,b`: host names by the protocol's rule, checked before any agent
    starts. None may be empty, none twice: two agents of one name share an MQTT client id,
    and the broker drops one whenever the other connects, for ever."""
    names = [h.strip() for h in text.split(",")]
    if not any(names):
        raise UsageError("--hosts needs at least one host name")
    if not all(names):
        raise UsageError("invalid --hosts: an empty entry between commas")
    seen: set[str] = set()
    for name in names:
        try:
            validate_host(name)
        except InputError as exc:
            raise UsageError(f"--hosts: {exc}") from None
        if name in seen:
            raise UsageError(f"duplicate host {name!r} in --hosts")
        seen.add(name)
    return names


def make_agent(args: argparse.Namespace, host: str, state_dir: Path) -> Agent:
    validate_host(host)
    try:
        parse_hhmm(args.defer_tonight)
    except ValueError as exc:
        raise UsageError(f"--defer-tonight: {exc}") from None
    check_age_keys(args.age_recipient, args.age_identity)
    config = AgentConfig(
        host=host, broker=_broker(args, host), state_dir=state_dir,
        trusted_keys=load_public_keys(args.trust_key),
        topics=Topics(args.topic_prefix, ha_prefix=args.ha_prefix),
        dump_retention=args.dump_retention, age_recipient=args.age_recipient,
        age_identity=args.age_identity,
        home_assistant=args.home_assistant, ha_reboot=args.ha_reboot,
        control_socket=args.command == "run", control_group=args.control_group,
        tonight=args.defer_tonight,
        notify=NotifyConfig(desktop=args.notify_desktop, wall=args.notify_wall,
                            command=f"fleet-agent prompt --state-dir {state_dir}"),
    )
    backend, why = choose_backend(args.backend, args.root)
    agent = Agent(config, make_backend(args, host, state_dir, backend))
    # logged once the agent could open its state: a start-up error stays one line
    logging.getLogger("client.cli").info("%s: backend %s (%s)", host, backend, why)
    return agent


async def _serve(agents: list[Agent]) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    tasks = [asyncio.create_task(a.run(), name=f"agent-{a.host}") for a in agents]
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
    for a in agents:
        await a.close()
    for t in tasks:
        t.cancel()
    for t in tasks:
        if t.done() and not t.cancelled() and t.exception() is not None:
            raise t.exception()  # type: ignore[misc]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("flotilla")
    except PackageNotFoundError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "prompt":
        return prompt_tui.run(args)
    if args.command == "journal":
        try:
            return journal_command(args)
        except FlotillaError as exc:
            print(f"fleet-agent: error: {exc}", file=sys.stderr)
            return EXIT_USAGE
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # paho logs an ERROR for every dropped socket through "mqtt"; the session logs the
    # loss and the reconnect itself (-v shows paho's)
    logging.getLogger("aiomqtt").setLevel(logging.WARNING)
    logging.getLogger("mqtt").setLevel(logging.DEBUG if args.verbose else logging.CRITICAL)
    try:
        if args.command == "run":
            agents = [make_agent(args, args.host, args.state_dir)]
        else:
            agents = [make_agent(args, h, args.state_dir / h) for h in parse_hosts(args.hosts)]
        asyncio.run(_serve(agents))
    except BrokerRefused as exc:  # retrying cannot help: stop (systemd shows the line)
        print(f"fleet-agent: error: {exc}", file=sys.stderr)
        return EXIT_BROKER
    except FlotillaError as exc:
        print(f"fleet-agent: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"fleet-agent: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
