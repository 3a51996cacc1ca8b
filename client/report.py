"""Everything the agent tells the world goes through one Reporter.

Events get a per-host sequence number that keeps growing across restarts (the
journal's start count is the high part), so the controller can order and dedupe.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from protocol.codec import encode
from protocol.models import (
    Ack,
    CheckReport,
    Event,
    HostState,
    Progress,
    Prompt,
    Rejected,
    RejectNote,
    ReportItem,
    Result,
)
from protocol.topics import Topics

log = logging.getLogger(__name__)
PublishFn = Callable[..., Awaitable[None]]
SEQ_EPOCH = 1_000_000_000


class Reporter:
    def __init__(self, host: str, topics: Topics, publish: PublishFn, epoch: int) -> None:
        self.host = host
        self.topics = topics
        self._publish = publish
        self._seq = epoch * SEQ_EPOCH
        self.state = HostState(host=host, updated_at=time.time())
        self.listeners: list[Callable[[HostState], None]] = []

    def _next(self) -> int:
        self._seq += 1
        return self._seq

    async def event(self, cls: type[Event], deployment_id: str | None, generation: int,
                    **fields: Any) -> None:
        ev = cls(host=self.host, deployment_id=deployment_id, generation=generation,
                 seq=self._next(), time=time.time(), **fields)
        await self._publish(self.topics.events(self.host), encode(ev), qos=1)

    async def ack(self, deployment_id: str, generation: int) -> None:
        await self.event(Ack, deployment_id, generation)

    async def rejected(self, deployment_id: str | None, generation: int, reason: str,
                       message: str) -> None:
        log.warning("%s: rejected desired state (%s): %s", self.host, reason, message)
        await self.event(Rejected, deployment_id, generation, reason=reason, message=message)
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
        await self.event(CheckReport, deployment_id, generation, items=items,
                         open_choices=open_choices, check_only=check_only)

    async def result(self, deployment_id: str, generation: int, status: str, message: str,
                     system: str | None, needs_reboot: bool, log_tail: list[str]) -> None:
        await self.event(Result, deployment_id, generation, status=status, message=message,
                         system=system, needs_reboot=needs_reboot, log_tail=log_tail[-20:])

    async def host_state(self, publish: bool = True, **changes: Any) -> HostState:
        """Update the HostState; publish it (retained) unless `publish` is False."""
        self.state = self.state.model_copy(update={**changes, "updated_at": time.time()})
        for listener in self.listeners:
            listener(self.state)
        if publish:
            await self._publish(self.topics.state(self.host), encode(self.state), qos=1,
                                retain=True)
        return self.state

    async def prompt(self, prompt: Prompt | None) -> None:
        payload = encode(prompt) if prompt is not None else b""
        await self._publish(self.topics.prompt(self.host), payload, qos=1, retain=True)
