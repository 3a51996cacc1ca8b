"""`fleetctl hosts add` and `fleetctl certs init|host`: per-host broker credentials and TLS.

A host's broker username is its host name; the shipped `mosquitto.acl` confines it to
its own topics with `pattern` rules on `%u`. Passwords are generated here, handed to
`mosquitto_passwd` on its stdin (never on a command line, where `ps` would show them)
and shown once, or written to `--password-file-out` (0600). They never appear in
`--json` output.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

from rich.console import Console

from controller.commands import cliutil
from controller.mqtt import certs
from controller.state.inventory import check_tag, parse_inventory
from protocol import cliargs
from protocol.broker import BrokerAddress, parse_broker_urls
from protocol.errors import InputError, StateError, UsageError
from protocol.mqtt import DEFAULT_MQTT_VERSION
from protocol.topics import validate_host

# Broker users named in the shipped mosquitto.acl: a host of that name would get their rights.
RESERVED_USERS = (cliutil.DEFAULT_CONTROLLER_USER, "homeassistant")
AGENT_ETC = Path("/etc/flotilla")
DAYS = cliargs.option(certs.valid_days)


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    hosts = sub.add_parser("hosts", parents=[common],
                           help="list the inventory's hosts (fleet.toml or --flake) with their "
                                "state: `fleetctl hosts [SELECTOR]`; add one: `hosts add`")
    hosts_sub = hosts.add_subparsers(dest="hosts_command", required=True,
                                     parser_class=type(hosts))
    ls = hosts_sub.add_parser(
        "list", parents=[common], help="inventory hosts with tags and their reported state "
        "(online, generation, system, phase, last result); `fleetctl hosts` alone lists all")
    ls.add_argument("selector", nargs="?", help="host, @tag or group (default: all)")
    ls.set_defaults(func=cmd_hosts_list)
    add = hosts_sub.add_parser(
        "add", parents=[common],
        help="add a host: inventory entry, broker password, agent configuration")
    add.add_argument("name", help="host name (also its broker username)")
    add.add_argument("--tags", default="", help="comma-separated tags, e.g. web,eu")
    add.add_argument("--mosquitto-passwd", dest="passwd_file", type=Path,
                     default=Path(os.environ.get("FLEET_PASSWD_FILE", "mosquitto.passwd")),
                     help="Mosquitto's password_file to add the host's user to (env "
                          "FLEET_PASSWD_FILE; created if missing)")
    add.add_argument("--save-password", dest="password_file_out", type=Path,
                     help="write the generated password to this new file (0600) instead of "
                          "printing it once; required with --json")
    # The former spellings, which sat next to the global --password-file, still work.
    add.add_argument("--passwd-file", dest="passwd_file", type=Path,
                     default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    add.add_argument("--password-file-out", dest="password_file_out", type=Path,
                     default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    add.add_argument("--agent-broker",
                     help="broker URL as the host sees it (default: --broker without "
                          "credentials)")
    add.set_defaults(func=cmd_hosts_add)

    c = sub.add_parser("certs", parents=[common], help="private CA and TLS certificates")
    c_sub = c.add_subparsers(dest="certs_command", required=True, parser_class=type(c))
    init = c_sub.add_parser("init", parents=[common],
                            help="create the CA (STATE_DIR/pki/ca.key, ca.crt)")
    init.add_argument("--days", type=DAYS,
                      default=3650, help="validity of the CA certificate")
    init.add_argument("--force", action="store_true", help="replace an existing CA")
    init.set_defaults(func=cmd_certs_init)
    host = c_sub.add_parser("host", parents=[common],
                            help="key and certificate for a host (or --server: the broker)")
    host.add_argument("name", help="host name (CN and SAN), or the broker's DNS name")
    host.add_argument("--server", action="store_true",
                      help="a broker certificate: SAN NAME, localhost and 127.0.0.1")
    host.add_argument("--san", action="append", default=[], metavar="DNS-OR-IP",
                      help="extra subjectAltName (repeatable)")
    host.add_argument("--days", type=DAYS,
                      default=825, help="validity of the certificate")
    host.add_argument("--force", action="store_true", help="replace existing files")
    host.set_defaults(func=cmd_certs_host)


# -- hosts add -----------------------------------------------------------------------------
def parse_tags(text: str) -> list[str]:
    """`--tags web,eu`: the inventory's tag rules; an empty tag (`web,,eu`) is an error."""
    if not text.strip():
        return []
    try:
        tags = [check_tag(t.strip(), "--tags") for t in text.split(",")]
    except InputError as exc:
        raise UsageError(str(exc)) from None
    return list(dict.fromkeys(tags))


def inventory_with_host(inventory: Path, name: str, tags: list[str]) -> str:
    """The inventory's text with [hosts.NAME] appended (checked; nothing written yet)."""
    try:
        old = inventory.read_text() if inventory.exists() else ""
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read inventory {inventory}: {exc}") from None
    if old.strip():
        inv = parse_inventory(old, str(inventory))
        if name in inv.hosts:
            raise InputError(f"host {name} is already in {inventory}")
        if name in inv.groups:
            raise InputError(f"{name} is a group in {inventory}; pick another host name")
    quoted = ", ".join(f'"{t}"' for t in tags)
    block = f"[hosts.{name}]\ntags = [{quoted}]\n"
    sep = "" if not old or old.endswith("\n\n") else ("\n" if old.endswith("\n") else "\n\n")
    new = old + sep + block
    try:
        parse_inventory(new, str(inventory))
    except InputError as exc:  # e.g. `hosts = {...}` inline: appending cannot extend it
        raise InputError(f"cannot append [hosts.{name}] to {inventory}: {exc}") from None
    return new


def write_inventory(inventory: Path, text: str) -> None:
    """Replace the inventory atomically, keeping its file mode."""
    tmp = inventory.with_name(f".{inventory.name}.tmp")
    try:
        mode = inventory.stat().st_mode & 0o777 if inventory.exists() else 0o644
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, inventory)
    except OSError as exc:
        raise StateError(f"cannot write inventory {inventory}: {exc.strerror}") from None


def mosquitto_passwd_binary() -> str:
    for candidate in (shutil.which("mosquitto_passwd"), "/usr/bin/mosquitto_passwd"):
        if candidate and Path(candidate).exists():
            return candidate
    raise InputError("mosquitto_passwd not found: install Mosquitto "
                     "(Debian: sudo apt-get install mosquitto)")


def set_broker_password(passwd_file: Path, user: str, password: str) -> bool:
    """Add or update `user` in a Mosquitto password file; True if the file was created.

    The password goes to mosquitto_passwd's stdin (asked twice), not to its argv: a
    `-b FILE USER PASS` command line is visible to every local user in `ps`.
    """
    binary = mosquitto_passwd_binary()
    created = not passwd_file.exists()
    if passwd_file.exists() and not passwd_file.is_file():
        raise InputError(f"{passwd_file} is not a file")
    if created and not passwd_file.parent.is_dir():
        raise InputError(f"directory {passwd_file.parent} does not exist")
    argv = [binary, *(["-c"] if created else []), str(passwd_file), user]
    try:
        proc = subprocess.run(argv, input=f"{password}\n{password}\n", capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise StateError(f"mosquitto_passwd failed: {exc}") from None
    if proc.returncode != 0:
        detail = " ".join((proc.stderr or proc.stdout).split()).replace(password, "***")
        raise StateError(f"mosquitto_passwd could not update {passwd_file}: "
                         f"{detail or f'exit {proc.returncode}'}")
    if created:
        os.chmod(passwd_file, 0o640)
    return created


def write_secret(path: Path, secret: str) -> None:
    if path.exists():
        raise InputError(f"{path} exists already; refusing to overwrite a secret")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secret + "\n")
    except OSError as exc:
        raise StateError(f"cannot write {path}: {exc.strerror}") from None


def public_url(address: BrokerAddress) -> str:
    """`address` as a URL without credentials (what a host's configuration may show)."""
    path = address.path if address.transport == "websockets" and address.path != "/mqtt" else ""
    host = f"[{address.host}]" if ":" in address.host else address.host
    return f"{address.scheme}://{host}:{address.port}{path}"


def agent_config(args: argparse.Namespace, name: str) -> tuple[list[str], str]:
    """The fleet-agent command line and a NixOS snippet for host `name`."""
    addresses = parse_broker_urls(args.agent_broker or args.broker)
    broker = ",".join(public_url(a) for a in addresses)
    address = addresses[0]
    pw_path = AGENT_ETC / "broker-password"
    argv = ["fleet-agent", "run", "--host", name, "--broker", broker, "--username", name,
            "--password-file", str(pw_path), "--trust-key", str(AGENT_ETC / "controller.pub"),
            "--backend", "nixos"]
    version = getattr(args, "mqtt_version", DEFAULT_MQTT_VERSION)
    version_line = ""
    if version != DEFAULT_MQTT_VERSION:
        argv += ["--mqtt-version", version]
        version_line = f'    mqttVersion = "{version}";\n'
    tls_lines = ""
    if address.tls:
        argv += ["--ca-file", str(AGENT_ETC / "ca.crt"),
                 "--cert-file", str(AGENT_ETC / f"{name}.crt"),
                 "--key-file", str(AGENT_ETC / f"{name}.key")]
        tls_lines = (f'    caFile = "{AGENT_ETC}/ca.crt";\n'
                     f'    certFile = "{AGENT_ETC}/{name}.crt";\n'
                     f'    keyFile = "{AGENT_ETC}/{name}.key";\n')
    nixos = (
        "services.flotilla-agent = {\n"
        "    enable = true;\n"
        f'    host = "{name}";\n'
        f'    broker = "{broker}";\n'
        f'    username = "{name}";\n'
        f'    passwordFile = "{pw_path}";  # mode 0600, not in the Nix store\n'
        f"    trustKey = ./controller.pub;\n"
        f"{version_line}"
        f"{tls_lines}"
        "};"
    )
    return argv, nixos


async def cmd_hosts_list(args: argparse.Namespace) -> int:
    from controller.follow.status import fetch_states
    inv = cliutil.inventory(args)
    hosts = inv.resolve(args.selector) if args.selector else list(inv.hosts)
    rows = [{**r, "tags": list(inv.hosts[r["host"]])}
            for r in await fetch_states(cliutil.context(args), hosts)]
    if args.json:
        cliutil.emit_json(rows)
        return cliutil.EXIT_OK
    Console().print(cliutil.table(
        ["host", "tags", "online", "generation", "system", "phase", "last result"],
        [[r["host"], ",".join(r["tags"]), "yes" if r["online"] else "no",
          str(r["generation"] or "-"), str(r["system"] or "-"), str(r["phase"] or "-"),
          str(r["result"] or "-")] for r in rows]))
    return cliutil.EXIT_OK


def cmd_hosts_add(args: argparse.Namespace) -> int:
    name = args.name
    validate_host(name)
    if name in RESERVED_USERS:
        raise UsageError(f"{name!r} is a broker user of the shipped ACL; pick another host name")
    tags = parse_tags(args.tags)
    if args.json and args.password_file_out is None:
        raise UsageError("--json needs --password-file-out (the password is never printed "
                         "in JSON)")
    if args.password_file_out is not None and args.password_file_out.exists():
        raise InputError(f"{args.password_file_out} exists already; refusing to overwrite a "
                         "secret")
    # Everything is checked before the password file is touched.
    new_inventory = inventory_with_host(args.inventory, name, tags)
    argv, nixos = agent_config(args, name)
    password = secrets.token_urlsafe(24)
    created = set_broker_password(args.passwd_file, name, password)
    write_inventory(args.inventory, new_inventory)
    if args.password_file_out is not None:
        write_secret(args.password_file_out, password)
    reload_hint = ("reload Mosquitto so it reads the new entry "
                   "(systemctl reload mosquitto, or kill -HUP its pid)")
    if args.json:
        cliutil.emit_json({
            "host": name, "tags": tags, "inventory": str(args.inventory),
            "passwd_file": str(args.passwd_file), "passwd_file_created": created,
            "password_file": str(args.password_file_out), "agent_argv": argv,
            "nixos": nixos, "next": [reload_hint],
        })
        return cliutil.EXIT_OK
    print(f"added {name} to {args.inventory}" + (f" (tags: {', '.join(tags)})" if tags else ""))
    print(f"broker user {name} {'created in new file' if created else 'written to'} "
          f"{args.passwd_file}; {reload_hint}")
    if args.password_file_out is not None:
        print(f"password written to {args.password_file_out} (mode 0600); copy it to the host "
              f"as {AGENT_ETC}/broker-password (mode 0600)")
    else:
        print(f"password for {name} (shown once; store it on the host as "
              f"{AGENT_ETC}/broker-password, mode 0600):")
        print(f"  {password}")
    print("agent command line:")
    print("  " + shlex.join(argv))
    print("NixOS configuration:")
    print("  " + nixos.replace("\n", "\n  "))
    return cliutil.EXIT_OK


# -- certs -----------------------------------------------------------------------------------
def _issued_json(issued: certs.Issued) -> dict[str, Any]:
    return {"key": str(issued.key), "cert": str(issued.cert), "subject": issued.subject,
            "sans": list(issued.sans), "not_after": issued.not_after.isoformat()}


def cmd_certs_init(args: argparse.Namespace) -> int:
    issued = certs.init_ca(args.state_dir, days=args.days, force=args.force)
    if args.json:
        cliutil.emit_json(_issued_json(issued))
    else:
        print(f"created CA {issued.cert} and key {issued.key} (mode 0600), valid until "
              f"{issued.not_after:%Y-%m-%d}")
        print(f"broker: cafile {issued.cert}; clients: --ca-file {issued.cert}")
    return cliutil.EXIT_OK


def cmd_certs_host(args: argparse.Namespace) -> int:
    issued = certs.issue(args.state_dir, args.name, server=args.server, extra_sans=args.san,
                         days=args.days, force=args.force)
    if args.json:
        cliutil.emit_json(_issued_json(issued))
        return cliutil.EXIT_OK
    print(f"created {issued.cert} and key {issued.key} (mode 0600) for CN={issued.subject} "
          f"({', '.join(issued.sans)}), valid until {issued.not_after:%Y-%m-%d}")
    if args.server:
        print(f"broker listener: certfile {issued.cert}; keyfile {issued.key}")
    else:
        print(f"agent: --cert-file {issued.cert} --key-file {issued.key} (copy them to the host)")
    return cliutil.EXIT_OK
