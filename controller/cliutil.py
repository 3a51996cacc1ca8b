"""Helpers shared by the fleetctl command modules (context, output)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from controller.deploy import ControllerContext
from controller.inventory import Inventory, load_inventory
from protocol.broker import BrokerAddress, parse_broker_url, read_password_file
from protocol.topics import Topics

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_BROKER = 0, 1, 2, 3
DEFAULT_CONTROLLER_USER = "flotilla-controller"


def context(args: argparse.Namespace, need_key: bool = False) -> ControllerContext:
    from controller.keys import load_key

    address = broker_address(args)
    return ControllerContext(
        broker=address, topics=Topics(args.topic_prefix), state_dir=args.state_dir,
        key=load_key(args.state_dir) if need_key else None,
        share_group=getattr(args, "share_group", None),
    )


def broker_address(args: argparse.Namespace) -> BrokerAddress:
    """--broker plus --username/--password-file and the TLS files; the password is only
    ever held in the BrokerAddress, whose str() and repr() hide it."""
    address = parse_broker_url(args.broker)
    if args.password_file is not None:
        password = read_password_file(args.password_file)
        address = address.with_credentials(
            args.username or address.username or DEFAULT_CONTROLLER_USER, password)
    elif args.username:
        address = address.with_credentials(args.username, None)
    return address.with_tls(getattr(args, "ca_file", None), getattr(args, "cert_file", None),
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
        from controller.nixbuild import flake_inventory
        return flake_inventory(flake)
    return load_inventory(args.inventory)
