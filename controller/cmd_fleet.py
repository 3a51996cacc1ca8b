"""`fleetctl status` and `fleetctl demo`."""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from controller import cliutil
from controller.broker import running_mosquitto
from controller.deploy import DeployRequest, RolloutDriver
from controller.inventory import render_inventory
from controller.keys import init_keys
from controller.status import fetch_states
from protocol.errors import UsageError


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("status", parents=[common], help="show hosts' reported state")
    p.add_argument("selector", nargs="?", help="host, @tag or group (default: all)")
    p.set_defaults(func=cmd_status)
    d = sub.add_parser("demo", parents=[common],
                       help="local deploy: Mosquitto + N simulated agents + a rollout")
    d.add_argument("--hosts", type=int, default=8)
    d.add_argument("--fail-rate", type=float, default=0.0)
    d.add_argument("--delay", type=float, default=0.3, help="simulated fetch/switch seconds")
    d.set_defaults(func=cmd_demo)


async def cmd_status(args: argparse.Namespace) -> int:
    inv = cliutil.inventory(args)
    hosts = inv.resolve(args.selector) if args.selector else list(inv.hosts)
    rows = await fetch_states(cliutil.context(args), hosts)
    if args.json:
        cliutil.emit_json(rows)
        return cliutil.EXIT_OK
    t = cliutil.table(
        ["host", "online", "generation", "phase", "result", "reboot", "system"],
        [[r["host"], "yes" if r["online"] else "no", str(r["generation"] or "-"),
          str(r["phase"] or "-"), str(r["result"] or "-"), "yes" if r["needs_reboot"] else "",
          str(r["system"] or "-")] for r in rows])
    Console().print(t)
    return cliutil.EXIT_OK


async def cmd_demo(args: argparse.Namespace) -> int:
    if not 1 <= args.hosts <= 10000:
        raise UsageError("--hosts must be between 1 and 10000")
    if not 0 <= args.fail_rate <= 1:
        raise UsageError("--fail-rate must be between 0 and 1")
    console = Console(stderr=args.json)
    with tempfile.TemporaryDirectory(prefix="flotilla-demo-") as tmp:
        work = Path(tmp)
        with running_mosquitto(work / "broker") as broker:
            console.print(f"[dim]mosquitto from mosquitto.conf on {broker.url}[/]")
            state = work / "controller"
            _, pub = init_keys(state)
            names = [f"demo-{i:04d}" for i in range(1, args.hosts + 1)]
            roles = ("web", "db", "cache")
            inv = work / "fleet.toml"
            inv.write_text(render_inventory(
                {n: ["demo", roles[i % 3]] for i, n in enumerate(names)},
                {"everything": ["@demo"]}))
            agents = subprocess.Popen(
                [sys.executable, "-m", "client", "simulate", "--hosts", ",".join(names),
                 "--state-dir", str(work / "agents"), "--trust-key", str(pub),
                 "--broker", broker.url, "--sim-fetch-delay", str(args.delay),
                 "--sim-switch-delay", str(args.delay), "--sim-fail-rate", str(args.fail_rate),
                 "--sim-seed", "demo"],
                stdout=subprocess.DEVNULL, stderr=open(work / "agents.log", "wb"),  # noqa: SIM115
                env={**os.environ, "PYTHONUNBUFFERED": "1"})
            try:
                ns = argparse.Namespace(**{**vars(args), "broker": broker.url,
                                           "state_dir": state, "inventory": inv})
                ctx = cliutil.context(ns, need_key=True)
                req = DeployRequest(selector="@demo", hosts=names,
                                    system="/nix/store/demo-nixos-system-25.11", timeout=120)
                driver = RolloutDriver(ctx, req)
                from controller.cmd_deploy import run_with_view
                started = time.monotonic()
                outcome = await run_with_view(ns, driver, wait=True)
                duration = time.monotonic() - started
            finally:
                agents.terminate()
                try:
                    agents.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    agents.kill()
    counts = outcome.counts()
    failed = counts["failed"] + counts["timed_out"] + counts["not_started"]
    if args.json:
        cliutil.emit_json({"hosts": args.hosts, "succeeded": counts["succeeded"],
                           "failed": failed, "duration_s": round(duration, 3)})
    else:
        from controller.monitor import print_summary
        print_summary(console, outcome.views.values(), outcome.status, duration)
    await asyncio.sleep(0)
    return cliutil.EXIT_OK
