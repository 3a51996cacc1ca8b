"""Running a rollout driver in the terminal, and summarising its outcome.

Shared by every command that drives a rollout (`deploy`, `rollout resume|continue`,
`rollback`, `demo`): a live view on a terminal, one line per host change otherwise,
batch confirmations typed at the view, and the final summary with its exit code.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from collections.abc import Callable, Iterable, Iterator

from rich.console import Console, Group
from rich.live import Live

from controller.commands import cliutil
from controller.follow.monitor import (
    ChangeTracker,
    host_line,
    plain_line,
    plural,
    print_summary,
    refresh_interval,
    render,
)
from controller.follow.view import HostView
from controller.rollout.driver import AskContinue, Outcome, RolloutDriver

MAX_RETRY_NOTES = 3


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
        from controller.rollout.prediction import go_no_go, print_prediction
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
