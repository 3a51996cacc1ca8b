"""Live progress of per-host builds and the push (used by `fleetctl build` and
`fleetctl deploy --flake`): a table on a terminal, one line per change otherwise."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from controller.build.nixbuild import BuildRun, HostBuild, build_fleet, load_cache, push
from controller.commands import cliutil
from protocol import cliargs
from protocol.errors import UsageError

STATUS_STYLE = {"queued": "dim", "building": "yellow", "built": "green", "failed": "red"}


def add_build_arguments(p: argparse.ArgumentParser) -> None:
    """The flags `build` and `deploy --flake` share."""
    g = p.add_argument_group("building on the controller (with --flake)")
    g.add_argument("--cache", metavar="URL",
                   help="binary cache to push the signed closures to, and agents to fetch "
                        "from (file://, ssh-ng://, s3://: anything 'nix copy' takes)")
    g.add_argument("--sign-key", type=Path, metavar="FILE",
                   help="Nix signing key (nix-store --generate-binary-cache-key); its public "
                        "half is what agents accept")
    g.add_argument("--max-jobs", type=cliargs.AT_LEAST_ONE, metavar="N",
                   help="hosts built at once (default 4)")


def cache_args(args: argparse.Namespace) -> tuple[str, Path] | None:
    """--cache URL --sign-key FILE, both or neither."""
    cache, key = getattr(args, "cache", None), getattr(args, "sign_key", None)
    if cache and key is None:
        raise UsageError("--cache needs --sign-key FILE (a key from "
                         "'nix-store --generate-binary-cache-key')")
    if key is not None and not cache:
        raise UsageError("--sign-key needs --cache URL")
    return (str(cache), Path(key)) if cache and key is not None else None


def render(run: BuildRun) -> Table:
    rows = [[h, f"[{STATUS_STYLE.get(b.status, '')}]{b.status}[/]",
             f"{b.seconds:.1f}s" if b.seconds is not None else "",
             (b.path or b.last_line)[-90:] if b.status != "failed" else b.message[-90:]]
            for h, b in run.hosts.items()]
    if run.push_status != "none":
        rows.append(["(cache)", run.push_status, "", run.push_message or
                     (run.cache.url if run.cache else "")])
    return cliutil.table(["host", "status", "time", "output"], rows)


async def build_and_push(args: argparse.Namespace, hosts: list[str]) -> BuildRun:
    """Build every host of `hosts` from --flake (showing progress), then sign and push
    to --cache when given. Failures are recorded in the returned run, never raised."""
    cached = cache_args(args)
    cache = load_cache(*cached) if cached else None  # bad key or URL: fail before building
    err = Console(file=sys.stderr)
    live = cliutil.live_view(args, lambda: "") if sys.stderr.isatty() else None
    runs: list[BuildRun] = []
    last: dict[str, str] = {}

    def say(text: str) -> None:
        err.print(text, markup=False, highlight=False, soft_wrap=True)

    def changed(b: HostBuild) -> None:
        if live is not None:
            if runs:
                live.update(render(runs[0]))
        elif b.status != last.get(b.host):
            last[b.host] = b.status
            detail = b.message if b.status in ("built", "failed") else ""
            say(f"{b.host}: {b.status}" + (f": {detail}" if detail else ""))

    async def go() -> BuildRun:
        run = await build_fleet(args.flake, hosts, args.max_jobs or 4, changed, runs.append)
        if cache is not None:
            if live is None:
                say(f"signing and pushing {len(run.systems)} closure(s) to {cache[0].url}")
            await push(run, *cache)
            if live is None:
                say(f"cache {cache[0].url}: {run.push_status}"
                    + (f": {run.push_message}" if run.push_message else ""))
        return run

    if live is None:
        return await go()
    with live:
        run = await go()
        live.update(render(run))
    return run
