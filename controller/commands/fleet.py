"""`fleetctl status` and `fleetctl demo`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from rich.console import Console

from controller.commands import cliutil
from controller.follow.reader import MessageReader
from controller.follow.status import fetch_states
from controller.mqtt.broker import die_with_parent, running_mosquitto
from controller.rollout.driver import DeployRequest, RolloutDriver
from controller.state.inventory import render_inventory
from controller.state.keys import init_keys
from protocol import cliargs
from protocol.errors import UsageError


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("status", parents=[common], help="show hosts' reported state")
    p.add_argument("selector", nargs="?", help="host, @tag or group (default: all)")
    p.set_defaults(func=cmd_status)
    d = sub.add_parser(
        "demo", parents=[common], help="watch a simulated rollout: canary, batches, a prompt, "
        "a failure that rolls back, a retry",
        description="Start a private Mosquitto (from mosquitto.conf) and N simulated agents, "
                    "then deploy to them in a canary batch and then batches a system whose "
                    "state step offers a choice on one host "
                    "(answered by the policy's default after a short deadline) and fails "
                    "on another (rolled back, log shown, retried). The state directory is "
                    "kept, so `fleetctl rollouts`, `watch` and `logs` work on it afterwards. "
                    "Exit code: 0 if the rollout succeeded, 1 if not (as `deploy`).")
    d.add_argument("--hosts", type=cliargs.AT_LEAST_ONE,
                   default=12, help="simulated hosts (default: 12)")
    d.add_argument("--fail-rate", type=cliargs.SHARE, default=0.0,
                   help="share of hosts whose migration always fails, chosen with the seed "
                        "(default: 0; one more host fails once and is retried)")
    d.add_argument("--delay", type=cliargs.SECONDS_OR_ZERO, default=0.3,
                   help="simulated fetch/switch seconds (default: 0.3)")
    d.add_argument("--seed", type=int, help="repeat a run (default: random; printed)")
    d.add_argument("--prompt-deadline", type=cliargs.SECONDS, default=4.0,
                   help="seconds before the demo prompt takes its default (default: 4)")
    d.add_argument("--serve", metavar="HOST:PORT",
                   help="also show the rollout on the web dashboard at this loopback address "
                        "(on a terminal: Enter starts the rollout, and Enter after it ends "
                        "stops the dashboard)")
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
    from controller.commands import demo_fleet
    from controller.commands.drive import report, run_with_view

    if not 1 <= args.hosts <= 10000:
        raise UsageError("--hosts must be between 1 and 10000")
    listen = demo_listen(args.serve) if args.serve else None  # before anything starts
    seed = args.seed if args.seed is not None else secrets.randbelow(100_000)
    console = Console(stderr=args.json, soft_wrap=True)
    work = Path(tempfile.mkdtemp(prefix="flotilla-demo-"))
    plan = demo_fleet.plan_demo(args.hosts, args.fail_rate, seed)
    system = demo_fleet.make_system(work, plan, pace=max(0.1, args.delay))
    previous = demo_fleet.make_previous_system(work)
    state, inv = work / "controller", work / "fleet.toml"
    _, pub = init_keys(state)
    roles = ("web", "db", "cache")
    inv.write_text(render_inventory({n: ["demo", roles[i % 3]] for i, n in enumerate(plan.hosts)},
                                    {"everything": ["@demo"]}))
    console.print(f"[bold]flotilla demo[/] seed {seed} (--seed {seed} repeats it): "
                  f"{args.hosts} simulated hosts; canary {plan.canary}; "
                  f"a choice on {plan.choice_host or '-'}; "
                  f"{plan.retry_host or '-'} fails once and is retried; "
                  f"always failing: {', '.join(sorted(plan.failing)) or 'none'}")
    with running_mosquitto(work / "broker") as broker:
        console.print(f"[dim]mosquitto from mosquitto.conf on {broker.url}; "
                      f"state in {work}[/]")
        agents = subprocess.Popen(die_with_parent(
            [sys.executable, "-m", "client", "simulate", "--hosts", ",".join(plan.hosts),
             "--state-dir", str(work / "agents"), "--trust-key", str(pub),
             "--broker", broker.url, "--sim-fetch-delay", str(args.delay),
             "--sim-switch-delay", str(args.delay), "--sim-system", str(previous)]),
            stdout=subprocess.DEVNULL, stderr=open(work / "agents.log", "wb"),  # noqa: SIM115
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            ns = argparse.Namespace(**{**vars(args), "broker": broker.url,
                                       "state_dir": state, "inventory": inv})
            ctx = cliutil.context(ns, need_key=True)
            await wait_online(ctx, plan.hosts, agents)
            console.print(f"[dim]{len(plan.hosts)} agents online[/]")
            req = DeployRequest(selector="@demo", hosts=plan.hosts, system=str(system),
                                timeout=120, rollout=demo_fleet.rollout_policy(args.hosts),
                                agent_policy=demo_fleet.agent_policy(args.prompt_deadline))
            driver = RolloutDriver(ctx, req)
            async with contextlib.AsyncExitStack() as stack:
                if listen:
                    await stack.enter_async_context(demo_dashboard(ns, ctx, console, listen))
                outcome = await run_with_view(ns, driver, wait=True)
                if listen and sys.stdin.isatty():
                    await asyncio.to_thread(input, "rollout finished; press Enter to stop "
                                            "the dashboard ")
        finally:
            agents.terminate()
            try:
                agents.wait(timeout=10)
            except subprocess.TimeoutExpired:
                agents.kill()
    code = report(ns, outcome, batches=len(driver.batches))
    if not args.json:
        epilogue(console, state, outcome.rollout_id, driver, work)
    return code


def demo_listen(value: str) -> tuple[str, int]:
    """`demo --serve HOST:PORT`: a loopback address only (the demo has no tokens)."""
    from controller.web.auth import is_loopback, parse_listen

    host, port = parse_listen(value, "--serve")
    if not is_loopback(host):
        raise UsageError("demo --serve listens on a loopback address only (the demo has no "
                         "access tokens); use fleetctl serve for anything else")
    return host, port


@contextlib.asynccontextmanager
async def demo_dashboard(args: argparse.Namespace, ctx: Any, console: Console,
                         listen: tuple[str, int]) -> AsyncIterator[None]:
    """`demo --serve`: the web dashboard on the demo's broker and state."""
    from controller.web.app import running
    from controller.web.auth import Guard, TokenFile

    host, port = listen
    guard = Guard(TokenFile(args.state_dir / "web-tokens.json"), loopback_listener=True)
    async with running(ctx, cliutil.inventory(args), guard, host, port) as (url, _):
        console.print(f"[bold]dashboard:[/] {url}")
        if sys.stdin.isatty():
            await asyncio.to_thread(input, "open it, then press Enter to start the rollout ")
        yield


def epilogue(console: Console, state: Path, rollout_id: str, driver: RolloutDriver,
             work: Path) -> None:
    """Retried hosts with their first attempt's log, and how to look further."""
    from controller.state import logs

    for host, attempts in sorted(driver.progress.attempts.items()):
        if attempts < 2:
            continue
        v = driver.views[host]
        console.print(f"[yellow]{host}[/]: attempt 1 rolled back; retry: {v.result}. "
                      "Its first attempt's log:")
        output = [r for r in logs.read_lines(state, rollout_id, host, rollout_id)
                  if r.stream != "agent"]
        for rec in output[-6:]:
            console.print(f"    {logs.format_line(rec)}", markup=False, highlight=False)
    console.print(f"state kept in {work}; look around with:\n"
                  f"  export FLEET_STATE_DIR={state} FLEET_INVENTORY={work / 'fleet.toml'}\n"
                  f"  fleetctl rollouts\n  fleetctl rollout show {rollout_id}\n"
                  f"  fleetctl watch {rollout_id}\n"
                  f"  fleetctl logs HOST [--deployment {rollout_id}]",
                  markup=False, highlight=False)


async def wait_online(ctx: Any, hosts: list[str], agents: subprocess.Popen[bytes],
                      timeout: float = 60.0) -> None:
    """Start the rollout only once every simulated agent is connected."""
    from controller.mqtt.connection import connect, read_retained

    deadline = time.monotonic() + timeout
    while True:
        async with connect(ctx.broker) as client:
            msgs = await read_retained(client, ctx.topics, [ctx.topics.all_hosts("online")])
        reader = MessageReader(ctx.topics)
        online = {msg.host for m in msgs
                  if (msg := reader.read(str(m.topic), m.payload if isinstance(m.payload, bytes)
                                         else b"")) is not None and msg.online}
        if online >= set(hosts):
            return
        if agents.poll() is not None:
            raise UsageError(f"the simulated agents exited (code {agents.returncode}); "
                             "see agents.log in the demo's state directory")
        if time.monotonic() > deadline:
            raise UsageError(f"only {len(online)} of {len(hosts)} agents came online "
                             f"in {timeout:.0f}s")
        await asyncio.sleep(0.3)
