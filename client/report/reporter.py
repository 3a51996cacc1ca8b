"""Everything the agent tells the world goes through one Reporter.

Events get a per-host sequence number that keeps growing across restarts (the
journal's start count is the high part), so the controller can order and dedupe.

The Reporter also decides what is worth a message, so every runner gets the same
budget per deploy (a quick deploy sends an Ack, a Result carrying its output lines and
one final HostState):

- Progress and Log events are *held*: at most one goes out per `hold` seconds after the
  previous event, each at most `hold` late (a Progress that opens a prompt goes at once).
  A held Progress is replaced by a newer one and dropped once the deployment ends.
  Held Log lines are merged and never dropped: they ride on the next Progress or Result
  of their deployment that goes out (`lines`), and go as a Log event of their own only
  when no such event goes (the hold ended, or another deployment's event goes), before
  the next event that is not held.
- An empty CheckReport of a deployment that is not check-only says nothing anyone
  reads: it is not sent (`deploy --check` and reports with items are).
- The retained HostState is published at once when its phase is one someone waits on
  (idle, final, awaiting an answer or a reboot) or it carries a rejection; a passing
  phase is folded: published only if it is still the current state `hold` seconds
  later. Listeners (Home Assistant) see every change at once.
- The retained prompt is cleared only if one may be set: after each prompt, and once
  after start (at the first connection when no deployment is in flight, else when that
  deployment ends).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from protocol.codec import encode
from protocol.models import (
    MAX_LOG_BATCH,
    WAITING_PHASES,
    Ack,
    CheckReport,
    Event,
    HostState,
    Log,
    Progress,
    Prompt,
    Rejected,
    RejectNote,
    ReportItem,
    Result,
)
from protocol.outcomes import result_of_phase
from protocol.topics import Topics

log = logging.getLogger(__name__)
PublishFn = Callable[..., Awaitable[None]]
SEQ_EPOCH = 1_000_000_000
HOLD = 1.0


def publish_at_once(state: HostState) -> bool:
    """A HostState someone reads as it is: not a phase the deployment passes through."""
    return (state.phase == "idle" or state.phase in WAITING_PHASES
            or result_of_phase(state.phase) is not None)


class Reporter:
    def __init__(self, host: str, topics: Topics, publish: PublishFn, epoch: int,
                 hold: float = HOLD) -> None:
        self.host = host
        self.topics = topics
        self._publish = publish
        self._seq = epoch * SEQ_EPOCH
        self.hold = hold
        self.state = HostState(host=host, updated_at=time.time())
        self.listeners: list[Callable[[HostState], None]] = []
        self._last_event = 0.0  # monotonic time the last event went out
        self._held_progress: dict[str, Any] | None = None
        self._held_log: dict[str, Any] | None = None
        self._event_timer: asyncio.TimerHandle | None = None
        self._state_timer: asyncio.TimerHandle | None = None
        self._state_lock = asyncio.Lock()
        self._state_dirty = False  # self.state differs from the last one published
        self._prompt_set: bool | None = None  # None: unknown (since start)
        self._tasks: set[asyncio.Task[None]] = set()

    def _next(self) -> int:
        self._seq += 1
        return self._seq

    async def _send(self, fields: dict[str, Any]) -> None:
        ev = fields["cls"](host=self.host, seq=self._next(), time=time.time(),
                           **{k: v for k, v in fields.items() if k != "cls"})
        self._last_event = time.monotonic()
        await self._publish(self.topics.events(self.host), encode(ev), qos=1)

    async def event(self, cls: type[Event], deployment_id: str | None, generation: int,
                    **fields: Any) -> None:
        """Send an event now (after any held Log lines); Progress and Log are held."""
        msg = {"cls": cls, "deployment_id": deployment_id, "generation": generation, **fields}
        if cls is Progress and fields.get("prompt_id") is None:
            self._held_progress = msg
            self._arm_events()
            return
        if cls is Log:
            held = self._held_log
            if held is not None and held["deployment_id"] == deployment_id and \
                    len(held["lines"]) + len(fields["lines"]) <= MAX_LOG_BATCH:
                held["lines"] = [*held["lines"], *fields["lines"]]
                held["dropped"] += fields.get("dropped", 0)
            else:
                await self._flush_log()
                self._held_log = {**msg, "lines": list(fields["lines"]),
                                  "dropped": fields.get("dropped", 0)}
            self._arm_events()
            return
        if not self._carry_log(msg):
            await self._flush_log()
        if cls is Progress:  # it opens a prompt: someone waits for it, and it supersedes
            self._held_progress = None
        elif cls in (Result, Rejected) and self._held_progress is not None and \
                self._held_progress["deployment_id"] == deployment_id:
            self._held_progress = None  # the deployment ended: its progress is moot
        await self._send(msg)

    def _carry_log(self, msg: dict[str, Any]) -> bool:
        """Put the held Log lines (at most a Log's worth) on `msg`, a Progress or Result of
        their deployment: one message instead of two. False: they must go on their own."""
        held = self._held_log
        if held is None or msg["cls"] not in (Progress, Result) or \
                held["deployment_id"] != msg["deployment_id"]:
            return False
        msg["lines"], msg["dropped"] = held["lines"], held["dropped"]
        self._held_log = None
        return True

    async def _flush_log(self) -> None:
        held, self._held_log = self._held_log, None
        if held is not None:
            await self._send(held)

    def _arm_events(self) -> None:
        if self._event_timer is not None:
            return
        delay = self._last_event + self.hold - time.monotonic()
        if delay <= 0:
            self._spawn(self._flush_events())
            return
        self._event_timer = asyncio.get_running_loop().call_later(
            delay, lambda: self._spawn(self._flush_events()))

    async def _flush_events(self) -> None:
        self._event_timer = None
        held, self._held_progress = self._held_progress, None
        if held is None or not self._carry_log(held):
            await self._flush_log()
        if held is not None:
            await self._send(held)

    def _spawn(self, coro: Awaitable[None]) -> None:
        async def run() -> None:
            try:
                await coro
            except Exception as exc:  # best effort: the next message carries the news
                log.warning("%s: could not send a held message: %s", self.host, exc)

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def ack(self, deployment_id: str, generation: int) -> None:
        await self.event(Ack, deployment_id, generation)

    async def rejected(self, deployment_id: str | None, generation: int, reason: str,
                       message: str, unverified: bool = False) -> None:
        log.warning("%s: rejected desired state (%s): %s", self.host, reason, message)
        await self.event(Rejected, deployment_id, generation, reason=reason, message=message,
                         unverified=unverified)
        if deployment_id is not None:
            await self.host_state(rejected=RejectNote(deployment_id=deployment_id,
                                                      generation=generation, reason=reason,
                                                      message=message[:500]))

    async def progress(self, deployment_id: str, generation: int, stage: str, message: str = "",
                       percent: float | None = None, step: str | None = None,
                       prompt: Prompt | None = None,
                       deferred_until: float | None = None) -> None:
        await self.event(Progress, deployment_id, generation, stage=stage, message=message,
                         percent=percent, step=step,
                         prompt_id=prompt.prompt_id if prompt else None,
                         prompt_kind=prompt.kind if prompt else None,
                         deferred_until=deferred_until)

    async def check_report(self, deployment_id: str, generation: int, items: list[ReportItem],
                           open_choices: list[str], check_only: bool) -> None:
        if not (items or open_choices or check_only):
            return
        await self.event(CheckReport, deployment_id, generation, items=items,
                         open_choices=open_choices, check_only=check_only)

    async def result(self, deployment_id: str, generation: int, status: str, message: str,
                     system: str | None, needs_reboot: bool, log_tail: list[str]) -> None:
        await self.event(Result, deployment_id, generation, status=status, message=message,
                         system=system, needs_reboot=needs_reboot, log_tail=log_tail[-20:])

    async def host_state(self, publish: bool = True, **changes: Any) -> HostState:
        """Update the HostState and publish it (retained), at once or folded (see the
        module doc). `publish=False`: a phase the caller knows passes; always folded."""
        self.state = self.state.model_copy(update={**changes, "updated_at": time.time()})
        self._state_dirty = True
        for listener in self.listeners:
            listener(self.state)
        if publish and ("rejected" in changes or publish_at_once(self.state)):
            await self._publish_state()
        elif self._state_timer is None:
            self._state_timer = asyncio.get_running_loop().call_later(
                self.hold, lambda: self._spawn(self._publish_state()))
        return self.state

    async def _publish_state(self) -> None:
        """Publish the current state (one at a time, so the last one out is the latest)."""
        if self._state_timer is not None:
            self._state_timer.cancel()
            self._state_timer = None
        async with self._state_lock:
            if not self._state_dirty:
                return
            self._state_dirty = False
            await self._publish(self.topics.state(self.host), encode(self.state), qos=1,
                                retain=True)

    async def clear_stale_prompt(self) -> None:
        """Clear a retained prompt an earlier run may have left (it stopped after its
        Result, before clearing it); for an agent with no deployment in flight, whose
        prompt nobody else owns. Once known clear, a deploy that asks nothing sends
        nothing on `prompt`."""
        if self._prompt_set is None:
            await self.prompt(None)

    async def prompt(self, prompt: Prompt | None) -> None:
        if prompt is None and self._prompt_set is False:
            return
        payload = encode(prompt) if prompt is not None else b""
        await self._publish(self.topics.prompt(self.host), payload, qos=1, retain=True)
        self._prompt_set = prompt is not None

    async def close(self) -> None:
        """Send what is held (on a clean stop)."""
        for timer in (self._event_timer, self._state_timer):
            if timer is not None:
                timer.cancel()
        self._event_timer = self._state_timer = None
        with contextlib.suppress(Exception):
            await self._flush_events()
            await self._publish_state()
