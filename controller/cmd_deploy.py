"""`fleetctl deploy`: plan, publish, watch, summarise."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator
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
    plural,
    print_summary,
    refresh_interval,
    render,
)
from controller.nixbuild import load_systems
from controller.planner import RolloutPolicy
from controller.systemref import check_system
from controller.view import HostView
from protocol import cliargs
from protocol.errors import InputError, UsageError
from protocol.models import DeployPolicy

CHOICE_RE = re.compile(r"^([A-Za-z0-9_.-]+)\.([A-Za-z0-9_:-]+)=([A-Za-z0-9._:@-]+)$")
MAX_RETRY_NOTES = 3
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
                   help="switch-to-configuration action: switch (now and at boot), boot "
                        "(next boot), test (now, not at boot), dry-activate (fetch, check and "
                        "report what a switch would restart)")
    p.add_argument("--install-bootloader", action="store_true",
                   help="(re)install the boot loader (NIXOS_INSTALL_BOOTLOADER=1)")
    p.add_argument("--timeout", type=cliargs.SECONDS, default=600.0,
                   help="seconds to wait for all hosts")
    p.add_argument("--no-wait", action="store_true", help="return after publishing")
    p.add_argument("--stream", action="store_true",
                   help="with --json: one JSON line per host change (as `watch --json`) "
                        "before the summary line")
    p.add_argument("--check", action="store_true",
                   help="only predict: fetch and run state checks, do not switch (recorded "
                        "as a check; the hosts' status stays as it was)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved hosts, systems, batches and policy; contact "
                        "nothing, record nothing")
    p.add_argument("--choose", action="append", default=[], metavar="STEP.ITEM=CHOICE",
                   help="pre-answer a migration choice (repeatable)")
    p.add_argument("--expires-in", type=cliargs.SECONDS,
                   help="agents ignore the deploy after S seconds")
    g = p.add_argument_group("rollout (defaults from [rollout] in the inventory)")
    g.add_argument("--canary", type=cliargs.COUNT,
                   help="hosts in a first batch that must succeed before the rest start "
                        "(default: [rollout] canary, else 0)")
    g.add_argument("--batch", help="N hosts or P%% per batch")
    g.add_argument("--max-parallel", type=cliargs.AT_LEAST_ONE,
                   help="hosts deploying at once (default: [rollout] max_parallel, else a "
                        "whole batch)")
    g.add_argument("--max-failures", help="N or P%%: abort beyond this")
    g.add_argument("--min-executed", type=cliargs.COUNT,
                   help="hosts finished before judging failures")
    g.add_argument("--host-timeout", type=cliargs.SECONDS, help="per-host in-progress timeout (s)")
    g.add_argument("--retries", type=cliargs.COUNT, help="retries for failed or timed-out hosts")
    g.add_argument("--pause-between-batches", type=cliargs.SECONDS_OR_ZERO,
                   help="seconds to wait after a batch finishes (default: [rollout], else 0)")
    g.add_argument("--confirm-batches", action="store_true", default=None,
                   help="ask before each batch after the first (y/n on a terminal, or "
                        "`fleetctl rollout continue ID`)")
    g.add_argument("--offline", choices=["wait", "skip"],
                   help="hosts offline when their batch starts: wait for them (the retained "
                        "desired state is queued) or skip them (default: [rollout], else "
                        "wait)")
    g.add_argument("--share-group", help="MQTT 5 shared subscription group for events")
    a = p.add_argument_group("on the host")
    a.add_argument("--approval", choices=["none", "ask"], default="none",
                   help="ask: each host waits for `fleetctl approve HOST` before it dumps "
                        "and switches")
    a.add_argument("--confirm", choices=["broker", "controller", "none"], default="broker",
                   help="how the agent proves it still reaches the broker after switching")
    a.add_argument("--confirm-timeout", type=cliargs.SECONDS, default=60.0,
                   help="seconds for that proof; without it the host rolls back")
    a.add_argument("--reboot", default="never", help="never, ask, now or 'window HH:MM-HH:MM'")
    a.add_argument("--prompt-deadline", type=cliargs.SECONDS,
                   help="seconds before a prompt times out")
    a.add_argument("--take-default", action="store_true",
                   help="after the prompt deadline, take each item's default")
    a.add_argument("--on-step-failure", choices=["ask", "retry", "skip", "rollback"],
                   default="ask", help="when a migration fails: ask the operator (a prompt), "
                                       "retry it, skip it, or roll the host back")
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
    try:  # the inventory's own values first, so an error names its key, not a flag
        RolloutPolicy.from_dict(dict(values))
    except (UsageError, TypeError) as exc:
        text = re.sub(r"--([a-z-]+)", lambda m: m.group(1).replace("-", "_"), str(exc))
        raise InputError(f"{args.inventory}: [rollout] {text}") from None
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
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else "option"
        option = "--" + field.removesuffix("_s").replace("_", "-")
        message = first['msg'].removeprefix('Value error, ')
        raise UsageError(f"invalid {option}: {message}") from None


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
    if args.install_bootloader and args.action not in ("switch", "boot"):
        raise UsageError("--install-bootloader goes with --action switch or boot")
    system, systems, cache = args.system, {}, None
    if source == "--system":
        system = check_system(args.system)
    elif source == "--systems":
        loaded = load_systems(args.systems)
        systems, cache = loaded.for_hosts(hosts, str(args.systems)), loaded.cache
        system = str(args.systems)
    elif source == "--flake":
        system = args.flake  # --build-on host: each host builds REF#nixosConfigurations.HOST
        if args.build_on == "controller" and not args.cache:
            raise UsageError("deploy --flake builds on the controller: give --cache URL and "
                             "--sign-key FILE to ship the closures to the hosts (or "
                             "--build-on host)")
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
    if args.dry_run:
        return dry_run(args, req)
    if system_source(args) == "--flake" and args.build_on == "controller" and \
            not await build_on_controller(args, req):
        return cliutil.EXIT_FAILED
    ctx = cliutil.context(args, need_key=True)
    driver = RolloutDriver(ctx, req)
    outcome = await run_with_view(args, driver, wait=not args.no_wait)
    return report(args, outcome, check=req.check_only, batches=len(driver.batches))


def dry_run(args: argparse.Namespace, req: DeployRequest) -> int:
    """What `deploy` would do, resolved: contacts nothing, records nothing."""
    batches = req.rollout.batches(req.hosts)
    canary = bool(req.rollout.canary)
    listed: list[dict[str, Any]] = [{"batch": i + 1, "canary": i == 0 and canary, "hosts": b}
                                    for i, b in enumerate(batches)]
    plan: dict[str, Any] = {"dry_run": True, "selector": req.selector, "hosts": req.hosts,
            "systems": {h: req.system_for(h) for h in req.hosts}, "action": req.action,
            "check_only": req.check_only,
            "batches": listed,
            "policy": {"rollout": req.rollout.as_dict(),
                       "agent": req.agent_policy.model_dump(), "timeout": req.timeout,
                       "choices": req.choices, "expires_in": req.expires_in},
            "failure_threshold": req.rollout.describe_threshold()}
    if args.json:
        cliutil.emit_json(plan)
        return cliutil.EXIT_OK
    what = "check" if req.check_only else req.action
    print(f"dry run: {what} {req.system} on {plural(len(req.hosts), 'host')} matching "
          f"{req.selector!r}; nothing is contacted or recorded")
    for b in listed:
        label = "canary" if b["canary"] else f"batch {b['batch']}"
        print(f"  {label} ({len(b['hosts'])}): {', '.join(b['hosts'])}")
    pol = {k: v for k, v in req.rollout.as_dict().items() if v not in (None, 0, 0.0, False)}
    print("  rollout: " + (", ".join(f"{k}={v}" for k, v in pol.items()) or "defaults")
          + f"; abort beyond {req.rollout.describe_threshold()}; timeout {req.timeout:g}s")
    agent = req.agent_policy.model_dump(exclude_defaults=True)
    print("  on the host: " + (", ".join(f"{k}={v}" for k, v in agent.items()) or "defaults")
          + (f"; pre-answers {req.choices}" if req.choices else ""))
    return cliutil.EXIT_OK


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
    retrying = [(h, n) for h, n in d.progress.attempts.items()
                if n > 1 and d.views[h].result is None]
    for h, n in retrying[:MAX_RETRY_NOTES]:
        notes.append(f"retrying {h} (attempt {n}): attempt {n - 1} failed; its log: "
                     f"fleetctl logs {h} --deployment {d.rollout_id}.{n - 1}")
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


def tty_asker(live: Live | None, questions: list[str]) -> AskContinue:
    """--confirm-batches on a terminal: ask y/n; `fleetctl rollout continue` also works.
    The question is a line of the live view (stopping and restarting the view printed
    the table twice around it) and the typed answer is not echoed into the view."""

    async def ask(d: RolloutDriver, batch: int) -> bool | None:
        size = len(d.batches[batch]) if batch < len(d.batches) else 0
        question = (f"start batch {batch + 1}/{len(d.batches)} ({plural(size, 'host')})? "
                    f"[y/n] + Enter (or from any terminal: fleetctl rollout continue "
                    f"{d.rollout_id})")
        questions.append(question)
        with _no_echo():
            try:
                while True:
                    if live is None:
                        print(question, flush=True)
                    line = await read_stdin_line()
                    if line is None:
                        return None
                    answer = line.strip().lower()
                    if answer in ("y", "yes"):
                        return True
                    if answer in ("n", "no"):
                        return False
            finally:
                questions.remove(question)

    return ask


@contextlib.contextmanager
def _no_echo() -> Iterator[None]:
    """Keystrokes typed at a question are not echoed (the live view owns the screen)."""
    try:
        import termios
        fd = sys.stdin.fileno()
        old = termios.tcgetattr(fd)
    except (ImportError, OSError, ValueError):
        yield
        return
    new = [*old]
    new[3] = new[3] & ~termios.ECHO
    try:
        termios.tcsetattr(fd, termios.TCSANOW, new)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, old)


async def run_with_view(args: argparse.Namespace, driver: RolloutDriver, wait: bool) -> Outcome:
    title = f"rollout {driver.rollout_id}: {driver.req.system}"

    questions: list[str] = []

    def view() -> Group:
        return render(driver.views.values(), title, driver.batches,
                      notes=[*driver_notes(driver), *questions])

    live = cliutil.live_view(args, view)
    interactive = not args.json and sys.stdin.isatty() and sys.stdout.isatty()
    if interactive and driver.req.rollout.confirm_batches:
        driver.ask_continue = tty_asker(live, questions)
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

    def emit(views: Iterable[HostView]) -> None:
        for v in tracker.changes(views):
            if args.json:
                cliutil.emit_json(host_line(driver.rollout_id, v))
            else:
                print(plain_line(v), flush=True)

    driver.on_host = lambda v: emit((v,))  # each change as it happens, even a brief one
    outcome = await driver.run(wait=wait)
    emit(driver.views.values())
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
            print(f"rollout {outcome.rollout_id} published to {plural(len(sent), 'host')}{more}; "
                  f"follow it with: fleetctl watch {outcome.rollout_id}")
        return cliutil.EXIT_OK
    if args.json:
        cliutil.emit_json(outcome.summary())
    else:
        print_summary(Console(file=sys.stdout, soft_wrap=True), outcome.views.values(),
                      outcome.status,
                      outcome.finished - outcome.started)
    return cliutil.EXIT_OK if outcome.status == "succeeded" else cliutil.EXIT_FAILED
