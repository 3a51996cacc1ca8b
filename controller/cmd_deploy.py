"""`fleetctl deploy`: plan, publish, watch, summarise."""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live

from controller import cliutil
from controller.buildview import add_build_arguments, build_and_push
from controller.deploy import AskContinue, DeployRequest, Outcome, RolloutDriver
from controller.monitor import (
    ChangeTracker,
    host_line,
    plain_line,
    print_summary,
    refresh_interval,
    render,
)
from controller.nixbuild import load_systems
from controller.planner import RolloutPolicy
from protocol.errors import UsageError
from protocol.models import DeployPolicy

CHOICE_RE = re.compile(r"^([A-Za-z0-9_.-]+)\.([A-Za-z0-9_:-]+)=([A-Za-z0-9._:@-]+)$")
LINE_INTERVAL = 0.5  # seconds between checks for host changes (plain and --stream lines)
ROLLOUT_FLAGS = ("canary", "batch", "max_parallel", "max_failures", "min_executed",
                 "host_timeout", "retries", "pause_between_batches", "confirm_batches",
                 "offline")


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("deploy", parents=[common], help="deploy a system to hosts")
    p.add_argument("selector", help="host, @tag or group; comma = union")
    src = p.add_argument_group("what to deploy: --system, --systems or --flake")
    src.add_argument("--system", help="one store path or flake ref for every selected host")
    src.add_argument("--systems", type=Path, metavar="DEPLOY_JSON",
                     help="each host its own store path: {agents: {host: path}, cache, "
                          "cache_public_key} as written by 'fleetctl build'")
    src.add_argument("--build-on", choices=["controller", "host"], default="controller",
                     help="with --flake: build every host's toplevel here and ship it through "
                          "--cache (default), or let each host build the flake itself")
    add_build_arguments(p)
    p.add_argument("--action", choices=["switch", "boot", "test", "dry-activate"],
                   default="switch",
                   help="dry-activate: fetch, check and report what a switch would restart")
    p.add_argument("--install-bootloader", action="store_true",
                   help="(re)install the boot loader (NIXOS_INSTALL_BOOTLOADER=1)")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds to wait for all hosts (default 600)")
    p.add_argument("--no-wait", action="store_true", help="return after publishing")
    p.add_argument("--stream", action="store_true",
                   help="with --json: one JSON line per host change (as `watch --json`) "
                        "before the summary line")
    p.add_argument("--check", action="store_true",
                   help="only predict: fetch and run state checks, do not switch")
    p.add_argument("--choose", action="append", default=[], metavar="STEP.ITEM=CHOICE",
                   help="pre-answer a migration choice (repeatable)")
    p.add_argument("--expires-in", type=float, help="agents ignore the deploy after S seconds")
    g = p.add_argument_group("rollout (defaults from [rollout] in the inventory)")
    g.add_argument("--canary", type=int)
    g.add_argument("--batch", help="N hosts or P%% per batch")
    g.add_argument("--max-parallel", type=int)
    g.add_argument("--max-failures", help="N or P%%: abort beyond this")
    g.add_argument("--min-executed", type=int, help="hosts finished before judging failures")
    g.add_argument("--host-timeout", type=float, help="per-host in-progress timeout (s)")
    g.add_argument("--retries", type=int, help="retries for failed or timed-out hosts")
    g.add_argument("--pause-between-batches", type=float)
    g.add_argument("--confirm-batches", action="store_true", default=None)
    g.add_argument("--offline", choices=["wait", "skip"])
    g.add_argument("--share-group", help="MQTT 5 shared subscription group for events")
    a = p.add_argument_group("on the host")
    a.add_argument("--approval", choices=["none", "ask"], default="none")
    a.add_argument("--confirm", choices=["broker", "controller", "none"], default="broker",
                   help="how the agent proves it still reaches the broker after switching")
    a.add_argument("--confirm-timeout", type=float, default=60.0)
    a.add_argument("--reboot", default="never", help="never, ask, now or 'window HH:MM-HH:MM'")
    a.add_argument("--prompt-deadline", type=float, help="seconds before a prompt times out")
    a.add_argument("--take-default", action="store_true",
                   help="after the prompt deadline, take each item's default")
    a.add_argument("--on-step-failure", choices=["ask", "retry", "skip", "rollback"],
                   default="ask")
    p.set_defaults(func=cmd_deploy)


def parse_choices(items: list[str], what: str = "--choose") -> dict[str, str]:
    """`STEP.ITEM=CHOICE` arguments (pre-answers or answers) as {"STEP.ITEM": CHOICE}."""
    out: dict[str, str] = {}
    for item in items:
        m = CHOICE_RE.fullmatch(item)
        if not m:
            raise UsageError(f"{what} wants STEP.ITEM=CHOICE, not {item!r}")
        out[f"{m.group(1)}.{m.group(2)}"] = m.group(3)
    return out


def rollout_policy(args: argparse.Namespace, defaults: dict[str, Any]) -> RolloutPolicy:
    values = {k.replace("-", "_"): v for k, v in defaults.items()}
    for name in ROLLOUT_FLAGS:
        if getattr(args, name, None) is not None:
            values[name] = getattr(args, name)
    try:
        return RolloutPolicy.from_dict(values)
    except TypeError as exc:
        raise UsageError(f"bad [rollout] option: {exc}") from None


def agent_policy(args: argparse.Namespace) -> DeployPolicy:
    from pydantic import ValidationError
    try:
        return DeployPolicy(
            approval=args.approval, confirm=args.confirm, confirm_timeout_s=args.confirm_timeout,
            reboot=args.reboot, prompt_deadline_s=args.prompt_deadline,
            take_default_on_deadline=args.take_default, on_step_failure=args.on_step_failure)
    except ValidationError as exc:
        raise UsageError(f"invalid deploy option: {exc.errors()[0]['msg']}") from None


def system_source(args: argparse.Namespace) -> str:
    """Which of --system, --systems, --flake says what to deploy (exactly one)."""
    given = [name for name, v in (("--system", args.system), ("--systems", args.systems))
             if v is not None]
    if not given:
        if not args.flake:
            raise UsageError("say what to deploy: --system PATH|REF, --systems deploy.json "
                             "or --flake REF")
        return "--flake"
    if len(given) > 1:
        raise UsageError("--system and --systems exclude each other")
    return given[0]


def build_request(args: argparse.Namespace) -> DeployRequest:
    source = system_source(args)
    inv = cliutil.inventory(args)
    hosts = inv.resolve(args.selector)
    if not hosts:
        raise UsageError(f"selector {args.selector!r} matches no host")
    if args.timeout <= 0:
        raise UsageError("--timeout must be positive")
    if args.install_bootloader and args.action not in ("switch", "boot"):
        raise UsageError("--install-bootloader goes with --action switch or boot")
    system, systems, cache = args.system, {}, None
    if source == "--systems":
        loaded = load_systems(args.systems)
        systems, cache = loaded.for_hosts(hosts, str(args.systems)), loaded.cache
        system = str(args.systems)
    elif source == "--flake":
        system = args.flake  # --build-on host: each host builds REF#nixosConfigurations.HOST
    return DeployRequest(
        selector=args.selector, hosts=hosts, system=system, action=args.action,
        timeout=args.timeout, choices=parse_choices(args.choose),
        agent_policy=agent_policy(args), rollout=rollout_policy(args, inv.rollout),
        check_only=args.check, expires_in=args.expires_in, systems=systems, cache=cache,
        install_bootloader=args.install_bootloader)


async def build_on_controller(args: argparse.Namespace, req: DeployRequest) -> bool:
    """--flake with --build-on controller: every host's toplevel, pushed to --cache.
    A failed build or push stops the deploy before anything is published."""
    run = await build_and_push(args, req.hosts)
    if not run.ok:
        for host, message in run.failed.items():
            print(f"fleetctl: {host}: build failed: {message}", file=sys.stderr)
        if run.push_message:
            print(f"fleetctl: push failed: {run.push_message}", file=sys.stderr)
        print("fleetctl: nothing was deployed", file=sys.stderr)
        return False
    req.systems, req.cache = run.systems, run.cache
    req.system = f"{args.flake} (per host)"
    return True


async def cmd_deploy(args: argparse.Namespace) -> int:
    req = build_request(args)
    if system_source(args) == "--flake" and args.build_on == "controller" and \
            not await build_on_controller(args, req):
        return cliutil.EXIT_FAILED
    ctx = cliutil.context(args, need_key=True)
    driver = RolloutDriver(ctx, req)
    outcome = await run_with_view(args, driver, wait=not args.no_wait)
    return report(args, outcome, check=req.check_only, batches=len(driver.batches))


def driver_notes(d: RolloutDriver, now: float | None = None) -> list[str]:
    """One-line status notes under the live view: aborting, waiting, pausing."""
    now = now or time.time()
    notes = []
    if d.progress.aborted:
        notes.append(f"aborting: {d.progress.aborted}; running hosts finish, no new ones start")
    elif d.waiting_for is not None:
        notes.append(f"waiting before batch {d.waiting_for + 1}/{len(d.batches)}: run "
                     f"`fleetctl rollout continue {d.rollout_id}` (or abort)")
    elif d.pause_until is not None and d.req.rollout.pause_between_batches and not any(
            v.deployment_id is not None and v.result is None for v in d.views.values()):
        notes.append(f"pausing between batches: next one in {max(0, d.pause_until - now):.0f}s")
    return notes


async def read_stdin_line() -> str | None:
    """One line from stdin without blocking the event loop (None at end of input)."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[str] = loop.create_future()
    fd = sys.stdin.fileno()

    def ready() -> None:
        if not fut.done():
            fut.set_result(sys.stdin.readline())

    loop.add_reader(fd, ready)
    try:
        line = await fut
    finally:
        loop.remove_reader(fd)
    return line or None


def tty_asker(live: Live | None) -> AskContinue:
    """--confirm-batches on a terminal: ask y/n; `fleetctl rollout continue` also works."""

    async def ask(d: RolloutDriver, batch: int) -> bool | None:
        size = len(d.batches[batch]) if batch < len(d.batches) else 0
        if live is not None:
            live.stop()
        try:
            while True:
                print(f"\nstart batch {batch + 1}/{len(d.batches)} ({size} hosts)? [y/n] "
                      f"(or from any terminal: fleetctl rollout continue {d.rollout_id}) ",
                      end="", flush=True)
                line = await read_stdin_line()
                if line is None:
                    return None
                answer = line.strip().lower()
                if answer in ("y", "yes"):
                    return True
                if answer in ("n", "no"):
                    return False
        finally:
            if live is not None:
                live.start()

    return ask


async def run_with_view(args: argparse.Namespace, driver: RolloutDriver, wait: bool) -> Outcome:
    title = f"rollout {driver.rollout_id}: {driver.req.system}"

    def view() -> Group:
        return render(driver.views.values(), title, driver.batches, notes=driver_notes(driver))

    live = cliutil.live_view(args, view)
    interactive = not args.json and sys.stdin.isatty() and sys.stdout.isatty()
    if interactive and driver.req.rollout.confirm_batches:
        driver.ask_continue = tty_asker(live)
    try:
        if live is None:
            return await _run_lines(args, driver, wait)
        return await _run_live(live, view, driver, wait)
    except asyncio.CancelledError:  # Ctrl-C: the rollout is left without a driver
        if driver.created and driver.status == "running":
            print(f"\nfleetctl: interrupted; rollout {driver.rollout_id} has no controller "
                  f"now: continue it with `fleetctl rollout resume {driver.rollout_id}` "
                  f"(or stop it: `fleetctl rollout abort {driver.rollout_id}`)",
                  file=sys.stderr, flush=True)
        raise


async def _run_lines(args: argparse.Namespace, driver: RolloutDriver, wait: bool) -> Outcome:
    """Not a terminal: one timestamped line per host change (`--json --stream`: the same
    JSON lines as `watch --json`), then the summary."""
    stream = wait and (not args.json or getattr(args, "stream", False))
    if not stream:
        return await driver.run(wait=wait)
    tracker = ChangeTracker()

    def emit() -> None:
        for v in tracker.changes(driver.views.values()):
            if args.json:
                cliutil.emit_json(host_line(driver.rollout_id, v))
            else:
                print(plain_line(v), flush=True)

    async def ticker() -> None:
        while True:
            await asyncio.sleep(LINE_INTERVAL)
            emit()

    task = asyncio.create_task(ticker())
    try:
        outcome = await driver.run(wait=wait)
    finally:
        task.cancel()
    emit()
    return outcome


async def _run_live(live: Live, view: Callable[[], Group], driver: RolloutDriver,
                    wait: bool) -> Outcome:
    last = 0.0
    interval = refresh_interval(len(driver.views))

    def refresh(d: RolloutDriver) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last > interval:
            last = now
            live.update(view())

    driver.on_change = refresh
    with live:
        outcome = await driver.run(wait=wait)
        live.update(view())
    return outcome


def report(args: argparse.Namespace, outcome: Outcome, check: bool = False,
           batches: int = 1) -> int:
    if check:
        from controller.prediction import go_no_go, print_prediction
        verdict = go_no_go(outcome.views.values())
        if args.json:
            cliutil.emit_json(verdict)
        else:
            print_prediction(Console(), verdict)
        return cliutil.EXIT_OK if verdict["go"] else cliutil.EXIT_FAILED
    if outcome.status == "published":
        sent = sorted(h for h, v in outcome.views.items() if v.deployment_id is not None)
        if args.json:
            cliutil.emit_json({"rollout": outcome.rollout_id, "status": "published",
                               "hosts": sent, "batches": batches})
        else:
            more = (f"; batches 2-{batches} start with: fleetctl rollout resume "
                    f"{outcome.rollout_id}") if batches > 1 else ""
            print(f"rollout {outcome.rollout_id} published to {len(sent)} host(s){more}; "
                  f"follow it with: fleetctl watch {outcome.rollout_id}")
        return cliutil.EXIT_OK
    if args.json:
        cliutil.emit_json(outcome.summary())
    else:
        print_summary(Console(file=sys.stdout), outcome.views.values(), outcome.status,
                      outcome.finished - outcome.started)
    return cliutil.EXIT_OK if outcome.status == "succeeded" else cliutil.EXIT_FAILED
