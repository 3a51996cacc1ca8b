"""`fleetctl logs HOST [--deployment ID] [--follow]`: what a host's programs printed."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from typing import Any

import aiomqtt

from controller.commands import cliutil
from controller.mqtt.connection import while_connected
from controller.state import logs, store
from controller.state.eventlog import EventLog
from protocol import cliargs
from protocol.codec import decode
from protocol.errors import InputError, ProtocolError
from protocol.models import EVENT_TYPES, Rejected, Result, carried_lines
from protocol.topics import HOST_NAME_RE

FINISHED_POLL_S = 1.0  # how often --follow asks the event log whether the host finished


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "logs", parents=[common], help="output of a host's deployment (fetch, build, checks, "
        "dumps, migrations, switch), as the controller stored it",
        description="Print what the programs of a host's deployment printed. The lines are "
                    "stored per rollout in STATE_DIR/logs/ by the fleetctl process that drove "
                    "the rollout.")
    p.add_argument("host", help="host name")
    p.add_argument("--deployment", metavar="ID",
                   help="a rollout id (every attempt) or one attempt ROLLOUT.N (ROLLOUT.1 is "
                        "the first), or a unique prefix (default: the host's latest rollout)")
    p.add_argument("--follow", "-f", action="store_true",
                   help="keep printing new lines until the host's deployment ends")
    p.add_argument("--lines", "-n", type=cliargs.COUNT, default=0,
                   help="only the last N lines (default: all)")
    p.set_defaults(func=cmd_logs)


def pick(doc: dict[str, Any], host: str, ident: str | None) -> tuple[str, str | None]:
    """(rollout id, deployment id or None for every attempt) that `logs` shows."""
    if ident is None:
        mine = [r for r in doc.get("rollouts", {}).values() if host in r.get("hosts", {})]
        if not mine:
            raise InputError(f"no rollout recorded here included {host}")
        r = max(mine, key=lambda r: r.get("created", 0))
        return str(r["id"]), None
    rollout = logs.rollout_of(ident)
    r = store.find_rollout(doc, rollout)
    if host not in r.get("hosts", {}):
        raise InputError(f"rollout {r['id']} did not include {host}")
    if ident == f"{r['id']}.1":  # attempt 1 deploys as the rollout id itself
        return str(r["id"]), str(r["id"])
    return str(r["id"]), (ident if ident != rollout else None)


async def cmd_logs(args: argparse.Namespace) -> int:
    if not HOST_NAME_RE.fullmatch(args.host):
        raise InputError(f"invalid host name {args.host!r}")
    log = EventLog(args.state_dir)
    if not log.exists():
        raise InputError(f"no controller state at {log.path} (set --state-dir or "
                         "FLEET_STATE_DIR); nothing was deployed from here yet")
    rollout_id, dep = pick(log.load(), args.host, args.deployment)
    if args.follow:
        await follow(args, log, rollout_id, dep)
        return cliutil.EXIT_OK
    records = stored(args, rollout_id, dep)
    if args.json:
        cliutil.emit_json({"rollout": rollout_id, "host": args.host, "deployment_id": dep,
                           "lines": [r.as_dict() for r in records]})
        return cliutil.EXIT_OK
    for r in records:
        _print(args, r)
    if not records:
        print(f"(no output stored for {args.host} in rollout {rollout_id})")
    return cliutil.EXIT_OK


def stored(args: argparse.Namespace, rollout_id: str, dep: str | None) -> list[logs.LogRecord]:
    records = logs.read_lines(args.state_dir, rollout_id, args.host, dep)
    return records[-args.lines:] if args.lines else records


def _print(args: argparse.Namespace, r: logs.LogRecord) -> None:
    if args.json:
        cliutil.emit_json(r.as_dict())
    else:
        print(logs.format_line(r), flush=True)


def follow_ends(rollout: dict[str, Any], host: str, now: float) -> bool:
    """May `logs --follow`, having printed what the store holds, end without having
    seen the host's Result? When the rollout ended (its driver stored all it got), or
    the host's outcome is LATE_LINES_S old: until then its last lines may still be on
    their way to the driver (an outcome learnt from a retained state comes first)."""
    if rollout.get("status") != "running":
        return True
    hr = rollout["hosts"][host]
    if hr.get("result") is None:
        return False
    finished = hr.get("finished")
    return not isinstance(finished, int | float) or now - finished >= logs.LATE_LINES_S


def _host_finished(log: EventLog, rollout_id: str, host: str) -> bool:
    r = log.refresh()["rollouts"][rollout_id]  # what the driver appended since (not all)
    return follow_ends(r, host, time.time())


def unseen(records: list[logs.LogRecord], seen: set[tuple[str, int]], after: int,
           before: int | None = None) -> list[logs.LogRecord]:
    """The stored lines of events not printed yet, newer than `after` (what was printed
    first) and older than `before` (the live event about to be printed), in order."""
    return [r for r in records if (r.deployment_id, r.seq) not in seen and r.seq > after
            and (before is None or r.seq < before)]


async def follow(args: argparse.Namespace, log: EventLog, rollout_id: str,
                 dep: str | None) -> None:
    """The stored lines, then live Log events of the host until its deployment in this
    rollout ends (subscribed first, so no line falls between the two). An event sent
    before we subscribed that the driver had not stored yet when we read the store is
    printed from the store before the next live event (and before we end). A lost
    connection is taken up again on any node (within --connect-timeout); what the
    driver stored meanwhile is printed from the store."""
    ctx = cliutil.context(args)
    following = LogFollow(args, log, rollout_id, dep, ctx.topics.events(args.host))
    await while_connected(ctx.broker, following.on_connection, **ctx.client_kwargs)


class LogFollow:
    """What `logs --follow` printed so far, across connections."""

    def __init__(self, args: argparse.Namespace, log: EventLog, rollout_id: str,
                 dep: str | None, topic: str) -> None:
        self.args, self.log, self.rollout_id, self.dep = args, log, rollout_id, dep
        self.topic = topic  # the host's events
        self.kept = logs.LineFollower(args.state_dir, rollout_id, args.host, dep)
        self.seen: set[tuple[str, int]] = set()
        self.after: int | None = None  # the newest event of the first read of the store

    def show(self, records: list[logs.LogRecord]) -> None:
        for r in records:
            _print(self.args, r)
        self.seen.update((r.deployment_id, r.seq) for r in records)

    def catch_up(self, before: int | None = None) -> None:
        """Print what the driver stored that was not printed (older than `before`)."""
        assert self.after is not None
        self.show(unseen(self.kept.read(), self.seen, self.after, before))

    async def on_connection(self, client: aiomqtt.Client) -> bool:
        """Follow on one connection: True once the deployment ended."""
        await client.subscribe(self.topic, qos=1)
        if self.after is None:
            first = self.kept.read()  # then only what the driver appends (no re-reading)
            first = first[-self.args.lines:] if self.args.lines else first
            self.after = max((r.seq for r in first), default=-1)
            self.show(first)
        else:
            self.catch_up()  # stored while we were away
        return await self._live(client)

    def _finished(self) -> bool:
        if _host_finished(self.log, self.rollout_id, self.args.host):
            self.catch_up()
            return True
        return False

    async def _live(self, client: aiomqtt.Client) -> bool:
        """Print live lines until the deployment ends (True) or the connection does. It
        ends at its Result, or when the event log says the host finished (asked at once
        and whenever no event came for FINISHED_POLL_S): a Result sent while we were not
        connected never arrives, and the store has its lines. Asked also at an event of
        another deployment: one that follows ours can keep the topic busy."""
        if self._finished():
            return True
        messages = client.messages  # its __anext__ may be cancelled: a message stays queued
        while True:
            try:
                m = await asyncio.wait_for(anext(messages), FINISHED_POLL_S)
            except TimeoutError:
                if self._finished():
                    return True
                continue
            payload = m.payload if isinstance(m.payload, bytes) else b""
            with contextlib.suppress(ProtocolError):
                ev = decode(payload, expect=EVENT_TYPES)
                if ev.deployment_id is None or logs.rollout_of(ev.deployment_id) \
                        != self.rollout_id or (self.dep is not None
                                               and ev.deployment_id != self.dep):
                    if self._finished():
                        return True
                    continue
                lines, _ = carried_lines(ev)
                if (lines or isinstance(ev, Result | Rejected)) \
                        and (ev.deployment_id, ev.seq) not in self.seen:
                    self.catch_up(before=ev.seq)
                    self.seen.add((ev.deployment_id, ev.seq))
                    for line in lines:
                        _print(self.args, logs.LogRecord(ev.deployment_id, ev.seq, line.time,
                                                         line.stream, line.source, line.text))
                if isinstance(ev, Result | Rejected):
                    return True
