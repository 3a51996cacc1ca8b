"""`fleetctl build`: every selected host's toplevel from the flake, signed and pushed to
the binary cache, written to deploy.json; and `fleetctl hosts` (the inventory)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.console import Console

from controller.build.buildview import add_build_arguments, build_and_push
from controller.build.nixbuild import write_json
from controller.commands import cliutil
from protocol.errors import UsageError


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("build", parents=[common],
                       help="build each host's system from --flake (and push it to --cache)")
    p.add_argument("selector", help="host, @tag or group; comma = union")
    p.add_argument("--out", type=Path, default=Path("deploy.json"),
                   help="where to write {agents: {host: path}, cache, cache_public_key} "
                        "(default ./deploy.json)")
    add_build_arguments(p)
    p.set_defaults(func=cmd_build)


def selected_hosts(args: argparse.Namespace) -> list[str]:
    hosts = cliutil.inventory(args).resolve(args.selector)
    if not hosts:
        raise UsageError(f"selector {args.selector!r} matches no host")
    return hosts


async def cmd_build(args: argparse.Namespace) -> int:
    if not args.flake:
        raise UsageError("build needs --flake REF (the fleet's flake)")
    run = await build_and_push(args, selected_hosts(args))
    write_json(args.out, run.deploy_json())
    if args.json:
        cliutil.emit_json({**run.summary(), "out": str(args.out)})
    else:
        console = Console()
        for host, message in run.failed.items():
            console.print(f"[red]{host}: build failed[/]: {message}", highlight=False)
        t = run.timings
        console.print(f"built {len(run.systems)}/{len(run.hosts)} host(s) in "
                      f"{t.get('build_s', 0):.1f}s"
                      + (f", pushed in {t['push_s']:.1f}s" if "push_s" in t else "")
                      + f"; wrote {args.out}", highlight=False)
        if run.push_message:
            console.print(f"[red]push failed[/]: {run.push_message}", highlight=False)
    return cliutil.EXIT_OK if run.ok else cliutil.EXIT_FAILED
