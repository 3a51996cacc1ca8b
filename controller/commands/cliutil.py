"""Helpers shared by the fleetctl command modules (context, output)."""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from controller.rollout.driver import ControllerContext
from controller.state.inventory import Inventory, load_inventory
from protocol.broker import BrokerCluster, read_password_file
from protocol.errors import UsageError
from protocol.mqtt import parse_mqtt_version
from protocol.topics import Topics

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_BROKER = 0, 1, 2, 3
DEFAULT_CONTROLLER_USER = "flotilla-controller"
CHOICE_RE = re.compile(r"^([A-Za-z0-9_.-]+)\.([A-Za-z0-9_:-]+)=([A-Za-z0-9._:@-]+)$")


def context(args: argparse.Namespace, need_key: bool = False) -> ControllerContext:
    from controller.state.keys import load_key

    broker = broker_cluster(args)
    share_group = getattr(args, "share_group", None)
    if share_group and not broker.mqtt.shared_subscriptions:
        raise UsageError("--share-group needs MQTT 5 shared subscriptions; MQTT 3.1.1 has "
                         "none (drop --share-group, or use --mqtt-version 5 with a broker "
                         "that delivers $share subscriptions)")
    return ControllerContext(
        broker=broker, topics=Topics(args.topic_prefix), state_dir=args.state_dir,
        key=load_key(args.state_dir) if need_key else None,
        share_group=share_group,
    )


def broker_cluster(args: argparse.Namespace) -> BrokerCluster:
    """--broker (one URL or a cluster's comma-separated URLs), --mqtt-version and
    --connect-timeout, plus --username/--password-file and the TLS files; the password
    is only ever held in the BrokerAddress, whose str() and repr() hide it."""
    broker = BrokerCluster.parse(args.broker, parse_mqtt_version(args.mqtt_version),
                                 args.connect_timeout)
    first = broker.addresses[0]
    if args.password_file is not None:
        password = read_password_file(args.password_file)
        broker = broker.with_credentials(
            args.username or first.username or DEFAULT_CONTROLLER_USER, password)
    elif args.username:
        broker = broker.with_credentials(args.username, None)
    return broker.with_tls(getattr(args, "ca_file", None), getattr(args, "cert_file", None),
                           getattr(args, "key_file", None))


def emit_json(obj: Any) -> None:
    print(json.dumps(obj, sort_keys=False), flush=True)


def live_view(args: argparse.Namespace, render: Callable[[], Any]) -> Live | None:
    """A rich Live display on a terminal; None for --json or a pipe."""
    if args.json or not sys.stdout.isatty():
        return None
    return Live(render(), console=Console(), refresh_per_second=8, transient=False)


def table(columns: list[str], rows: list[list[str]]) -> Table:
    t = Table(show_header=True, header_style="bold")
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*r)
    return t


def inventory(args: argparse.Namespace) -> Inventory:
    """fleet.toml; without one, the hosts and tags of `--flake` (a fleet.toml wins)."""
    flake = getattr(args, "flake", None)
    if flake and not args.inventory.exists():
        from controller.build.nixbuild import flake_inventory
        return flake_inventory(flake)
    return load_inventory(args.inventory)


def parse_choices(items: list[str], what: str = "--choose") -> dict[str, str]:
    """`STEP.ITEM=CHOICE` arguments (pre-answers or answers) as {"STEP.ITEM": CHOICE}."""
    out: dict[str, str] = {}
    for item in items:
        m = CHOICE_RE.fullmatch(item)
        if not m:
            raise UsageError(f"{what} wants STEP.ITEM=CHOICE, not {item!r}")
        out[f"{m.group(1)}.{m.group(2)}"] = m.group(3)
    return out
