"""`fleetctl rollouts`, `fleetctl rollout show|abort|continue|resume`, `fleetctl watch`,
`fleetctl state show|compact`: operating rollouts and the controller's event log."""

from __future__ import annotations

import argparse
import getpass
import json
import sys
import time
from typing import Any

from rich.console import Console, Group

from controller.commands import cliutil
from controller.commands.drive import report, run_with_view
from controller.follow.monitor import (
    host_line,
    plain_line,
    plural,
    print_summary,
    refresh_interval,
    render,
)
from controller.follow.watch import Watcher
from controller.rollout import steer as rollout_ops
from controller.rollout.driver import RolloutDriver
from controller.state import store
from controller.state.eventlog import EventLog
from protocol import cliargs, outcomes
from protocol.errors import InputError


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("rollouts", parents=[common], help="list rollouts from the event log")
    p.add_argument("--limit", type=cliargs.COUNT, default=0, help="only the N most recent")
    p.set_defaults(func=cmd_rollouts)

    r = sub.add_parser("rollout", parents=[common], help="inspect and steer one rollout")
    rs = r.add_subparsers(dest="rollout_command", required=True, parser_class=type(r))
    show = rs.add_parser("show", parents=[common], help="per-host details of a rollout")
    show.add_argument("id", help="rollout id (or a unique prefix)")
    show.set_defaults(func=cmd_show)
    abort = rs.add_parser("abort", parents=[common],
                          help="stop starting hosts; running hosts finish")
    abort.add_argument("id")
    abort.set_defaults(func=cmd_abort)
    cont = rs.add_parser("continue", parents=[common],
                         help="release the next batch of a --confirm-batches rollout")
    cont.add_argument("id")
    cont.add_argument("--batch", type=cliargs.AT_LEAST_ONE,
                      help="the batch number to release (1-based)")
    cont.set_defaults(func=cmd_continue)
    res = rs.add_parser("resume", parents=[common],
                        help="drive a rollout whose controller stopped (crash, --no-wait)")
    res.add_argument("id")
    res.add_argument("--timeout", type=cliargs.SECONDS,
                     help="seconds from now (default: the rollout's own --timeout)")
    res.add_argument("--share-group", help="MQTT 5 shared subscription group for events")
    res.set_defaults(func=cmd_resume)

    w = sub.add_parser("watch", parents=[common], help="follow a rollout live, from anywhere")
    w.add_argument("id", nargs="?", help="rollout id (default: the latest running one)")
    w.add_argument("--timeout", type=cliargs.SECONDS, help="give up after S seconds (exit 1)")
    w.add_argument("--share-group", help="MQTT 5 shared subscription group for events "
                   "(use a different group than the driver's, or none)")
    w.set_defaults(func=cmd_watch)

    s = sub.add_parser("state", parents=[common], help="the controller's event log")
    ss = s.add_subparsers(dest="state_command", required=True, parser_class=type(s))
    sshow = ss.add_parser("show", parents=[common], help="print the resolved document (JSON)")
    sshow.set_defaults(func=cmd_state_show)
    comp = ss.add_parser("compact", parents=[common],
                         help="replace the log by one snapshot entry (atomic)")
    comp.set_defaults(func=cmd_state_compact)
    rep = ss.add_parser("repair", parents=[common],
                        help="rebuild a damaged log from every readable entry (the damaged "
                             "file is kept aside)")
    rep.set_defaults(func=cmd_state_repair)


def _eventlog(args: argparse.Namespace) -> EventLog:
    return EventLog(args.state_dir)


def _existing_log(args: argparse.Namespace) -> EventLog:
    return rollout_ops.existing_log(_eventlog(args))


def _doc(args: argparse.Namespace) -> dict[str, Any]:
    return _existing_log(args).load()


def _console() -> Console:
    """Full width on a terminal; wide (not truncated) when piped."""
    return Console() if sys.stdout.isatty() else Console(width=250)


def _fmt_time(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def cmd_rollouts(args: argparse.Namespace) -> int:
    log = _eventlog(args)
    doc = log.load() if log.exists() else {}
    if close_finished(log, doc):
        doc = log.load()
    rollouts = store.rollouts_by_age(doc)
    if args.limit:
        rollouts = rollouts[-args.limit:]
    rows = [rollout_ops.with_driver(log, store.rollout_row(r)) for r in rollouts]
    if args.json:
        cliutil.emit_json(rows)
        return cliutil.EXIT_OK
    if not rows:
        print("no rollouts recorded yet")
        return cliutil.EXIT_OK
    t = cliutil.table(
        ["id", "kind", "status", "selector", "hosts", "ok", "failed", "timed out",
         "not started", "running", "created", "system"],
        [[r["id"], r["kind"], r["status"] + ("" if r["driven"] is not False
                                             else " (no controller)"),
          str(r["selector"]), str(r["hosts"]),
          *(str(r["counts"][k]) for k in (*outcomes.COUNT_KEYS, "running")),
          _fmt_time(r["created"]), str(r["system"])] for r in rows])
    _console().print(t)
    for r in rows:
        if r["driven"] is False:
            print(rollout_ops.undriven_note(r["id"]))
    return cliutil.EXIT_OK


def close_finished(log: EventLog, doc: dict[str, Any]) -> list[str]:
    """Running rollouts nobody drives whose every host has a result are closed now."""
    return [rid for rid, r in doc.get("rollouts", {}).items() if r.get("status") == "running"
            and rollout_ops.close_if_complete(log, rid) is not None]


def cmd_show(args: argparse.Namespace) -> int:
    log = _existing_log(args)
    r = store.find_rollout(log.load(), args.id)
    if r.get("status") == "running" and rollout_ops.close_if_complete(log, r["id"]):
        r = store.find_rollout(log.load(), r["id"])
    counts = store.rollout_counts(r)
    detail = rollout_ops.with_driver(log, store.rollout_detail(r))
    driven = detail["driven"]
    if args.json:
        cliutil.emit_json(detail)
        return cliutil.EXIT_OK
    console = _console()
    pol = r.get("policy", {}).get("rollout", {})
    console.print(f"[bold]rollout {r['id']}[/] {store.display_status(r)}: {r.get('selector')} -> "
                  f"{r.get('system')} ({store.rollout_kind(r.get('policy', {}))}"
                  + ("" if store.rollout_kind(r.get("policy", {})) == "check"
                     else f", {r.get('action')}") + ")")
    if driven is False:
        console.print(rollout_ops.undriven_note(r["id"]), markup=False)
    console.print(f"created {_fmt_time(r.get('created'))}, finished "
                  f"{_fmt_time(r.get('finished'))}; {plural(int(r.get('batches') or 0), 'batch')}; "
                  + ", ".join(f"{k} {v}" for k, v in counts.items()))
    opts = ", ".join(f"{k}={v}" for k, v in pol.items() if v not in (None, 0, 0.0, False)
                     and not (k == "offline" and v == "wait"))
    if opts:
        console.print(f"policy: {opts}")
    if r.get("abort_reason"):
        console.print(f"[red]aborted: {r['abort_reason']}[/]")
    elif r.get("abort_requested"):
        console.print("[yellow]abort requested[/]")
    t = cliutil.table(
        ["host", "batch", "attempts", "generation", "deployment", "status", "message"],
        [[h, str(hr.get("batch", 0) + 1), str(hr.get("attempts", 0)),
          str(hr.get("generation") or "-"), str(hr.get("deployment_id") or "-"),
          str(hr.get("result") or hr.get("status")), str(hr.get("message") or "")[:70]]
         for h, hr in r.get("hosts", {}).items()])
    console.print(t)
    return cliutil.EXIT_OK


def _operator() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "an operator"


def cmd_abort(args: argparse.Namespace) -> int:
    out = rollout_ops.request_abort(_eventlog(args), args.id, _operator())
    rid = out.rollout_id
    if args.json:
        cliutil.emit_json({"rollout": rid, "abort_requested": True,
                           "already_requested": out.already_requested,
                           "driver_running": out.driver_running})
    elif out.driver_running:
        print(f"abort of rollout {rid} recorded; its controller stops starting hosts "
              "within a second, running hosts finish")
    else:
        print(f"abort of rollout {rid} recorded; no controller is driving it now: "
              f"`fleetctl rollout resume {rid}` winds it down (withdraws desired states "
              "not yet acknowledged, waits for running hosts)")
    return cliutil.EXIT_OK


def cmd_continue(args: argparse.Namespace) -> int:
    out = rollout_ops.release_batch(_eventlog(args), args.id, args.batch)
    if args.json:
        cliutil.emit_json({"rollout": out.rollout_id, "batch": out.batch + 1,
                           "batches": out.batches})
    else:
        print(f"batch {out.batch + 1}/{out.batches} of rollout {out.rollout_id} released")
    return cliutil.EXIT_OK


async def cmd_resume(args: argparse.Namespace) -> int:
    ctx = cliutil.context(args, need_key=True)
    if not ctx.eventlog.exists():
        raise InputError(f"no controller state at {ctx.eventlog.path}")
    driver = RolloutDriver.from_log(ctx, args.id, args.timeout)
    outcome = await run_with_view(args, driver, wait=True)
    return report(args, outcome, check=driver.req.check_only)


async def cmd_watch(args: argparse.Namespace) -> int:
    ctx = cliutil.context(args)
    watcher = Watcher(ctx, args.id)
    log = ctx.eventlog
    if watcher.from_log and watcher.status in outcomes.ROLLOUT_FINAL:
        return _finished_watch(args, watcher)  # nothing to follow: no broker needed
    notes: list[str] = []
    if watcher.from_log and not rollout_ops.driven(log, watcher.rollout_id):
        notes.append(rollout_ops.undriven_note(watcher.rollout_id))
        if not args.json and not sys.stdout.isatty():
            print(notes[0], flush=True)
    live = cliutil.live_view(args, lambda: _watch_view(watcher, notes))
    if args.json:
        watcher.on_host_change = lambda v: cliutil.emit_json(host_line(watcher.rollout_id, v))
    elif live is None:
        watcher.on_host_change = lambda v: print(plain_line(v), flush=True)
    if live is not None:
        last = 0.0

        def refresh(w: Watcher) -> None:
            nonlocal last
            if time.monotonic() - last > refresh_interval(len(w.views)):
                last = time.monotonic()
                live.update(_watch_view(w, notes))

        watcher.on_change = refresh
        with live:
            result = await watcher.run(args.timeout)
            live.update(_watch_view(watcher, notes))
    else:
        result = await watcher.run(args.timeout)
    if result.finished and watcher.from_log and watcher.status == "running":
        seen = {h: (v.result, v.message) for h, v in watcher.views.items()
                if v.result is not None}
        closed = rollout_ops.close_if_complete(log, watcher.rollout_id, seen)
        if closed is not None and not args.json:
            print(f"every host has a result: rollout {watcher.rollout_id} closed as {closed}")
    if args.json:
        cliutil.emit_json({"type": "end", **result.summary,
                           "watch_timeout": not result.finished})
    else:
        print_summary(Console(file=sys.stdout), watcher.views.values(),
                      result.status if result.finished else f"{result.status} (watch timed out)",
                      watcher.duration())
    return cliutil.EXIT_OK if result.finished and result.status == "succeeded" \
        else cliutil.EXIT_FAILED


def _finished_watch(args: argparse.Namespace, w: Watcher) -> int:
    """A rollout the event log says has ended: its summary, its own run time."""
    if args.json:
        for v in w.views.values():
            cliutil.emit_json(host_line(w.rollout_id, v))
        cliutil.emit_json({"type": "end", **w.summary(), "watch_timeout": False})
    else:
        print_summary(Console(file=sys.stdout), w.views.values(), w.status, w.duration())
    return cliutil.EXIT_OK if w.status == "succeeded" else cliutil.EXIT_FAILED


def _watch_view(w: Watcher, extra: list[str]) -> Group:
    title = f"rollout {w.rollout_id}: {w.system}" + ("" if w.from_log else " (from the broker)")
    notes = [] if w.status in ("running", *outcomes.ROLLOUT_FINAL) else [w.status]
    # The end line is printed once, by the summary after the live view.
    return render(w.views.values(), title, w.batches or None, notes=[*notes, *extra])


def cmd_state_show(args: argparse.Namespace) -> int:
    doc = _doc(args)
    if args.json:
        print(json.dumps(doc, separators=(",", ":")))
    else:
        print(json.dumps(doc, indent=2))
    return cliutil.EXIT_OK


def cmd_state_repair(args: argparse.Namespace) -> int:
    report = _eventlog(args).repair()
    if args.json:
        cliutil.emit_json({"kept": report.kept, "skipped": report.skipped,
                           "damaged_copy": report.damaged_copy and str(report.damaged_copy)})
    elif report.damaged_copy is None:
        print(f"{_eventlog(args).path}: all {report.kept} entries are readable; nothing to "
              "repair, the log is left as it is")
    else:
        print(f"rebuilt {_eventlog(args).path} from {report.kept} readable "
              f"entr{'y' if report.kept == 1 else 'ies'}; skipped {len(report.skipped)}; "
              f"the damaged file is kept as {report.damaged_copy}")
        for line in report.skipped[:10]:
            print(f"  skipped {line}")
    return cliutil.EXIT_OK


def cmd_state_compact(args: argparse.Namespace) -> int:
    log = _eventlog(args)
    if not log.exists():
        raise InputError(f"no controller state at {log.path}")
    before, saved = log.compact()
    if args.json:
        cliutil.emit_json({"path": str(log.path), "entries_before": before, "entries_after": 1,
                           "bytes_saved": saved})
    else:
        print(f"compacted {log.path}: {before} entries -> 1 snapshot ({saved} bytes saved)")
    return cliutil.EXIT_OK
