"""One deployment on one host, as a resumable pipeline of journaled stages.

fetch → check → choose → approve → dump → migrate(before) → switch → reboot →
migrate(after) → confirm. Each stage is journaled before it starts and after it ends;
on restart the runner skips what is done and resumes at the first unfinished stage.
Host side effects go through the SystemBackend; decisions are in `client.decide` and
`client.plan`; state steps are run by `client.steps_exec`.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from client.backend import BackendError, SystemBackend
from client.journal import ActiveDeployment, Journal, RecordedResult
from client.report import Reporter
from protocol.errors import FlotillaError, StateError
from protocol.models import Desired

log = logging.getLogger(__name__)

STAGE_PERCENT = {
    "fetch": 5, "check": 30, "choose": 35, "approve": 38, "dump": 40, "migrate:before-switch": 50,
    "switch": 60, "reboot": 75, "migrate:after-switch": 80, "confirm": 90,
}


class DeployFailed(FlotillaError):
    """The deployment cannot go on; `status` says how it ends."""

    def __init__(self, message: str, status: str = "failed", rollback: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.rollback = rollback


class AgentContext(Protocol):
    host: str
    journal: Journal
    backend: SystemBackend
    reporter: Reporter

    async def round_trip(self, generation: int, timeout: float, controller: bool) -> bool: ...


class DeploymentRunner:
    def __init__(self, ctx: AgentContext, desired: Desired) -> None:
        self.ctx = ctx
        self.d = desired
        self.log_tail: list[str] = []
        self.hooks: dict[str, Callable[[], Awaitable[None]]] = {}

    @property
    def active(self) -> ActiveDeployment:
        a = self.ctx.journal.state.active
        assert a is not None and a.deployment_id == self.d.deployment_id
        return a

    # -- reporting helpers -------------------------------------------------------
    async def progress(self, stage: str, message: str = "", step: str | None = None,
                       percent: float | None = None) -> None:
        self.log_tail = [*self.log_tail[-19:], message] if message else self.log_tail
        pct = percent if percent is not None else STAGE_PERCENT.get(stage)
        base = stage.split(":")[0]
        await self.ctx.reporter.progress(self.d.deployment_id, self.d.generation, base, message,
                                         pct, step)

    async def phase(self, phase: str, **extra: Any) -> None:
        await self.ctx.reporter.host_state(
            phase=phase, deployment_id=self.d.deployment_id, rollout_id=self.d.rollout_id,
            desired_generation=self.d.generation, **extra)

    def journal(self, kind: str, **fields: Any) -> None:
        self.ctx.journal.append(kind, deployment_id=self.d.deployment_id, **fields)

    async def stage(self, name: str, body: Callable[[], Awaitable[Any]]) -> Any:
        """Run `body` once: journaled before and after; skipped when already done."""
        if name in self.active.done:
            return self.active.done[name]
        self.journal("begin", stage=name)
        data = await body()
        self.journal("end", stage=name, data=data)
        return data

    # -- the pipeline --------------------------------------------------------------
    async def run(self) -> RecordedResult:
        d = self.d
        try:
            try:
                await self._pipeline()
            except DeployFailed as exc:
                if exc.rollback:
                    return await self.roll_back(str(exc))
                return await self.finish(exc.status, str(exc))
            except BackendError as exc:
                return await self.fail_after_error(str(exc))
            if d.check_only:
                return await self.finish("succeeded", "checks ran; nothing switched",
                                         system=self.ctx.backend.current_system())
            needs_reboot = bool(self.active.notes.get("needs_reboot", False))
            return await self.finish("succeeded", f"{d.action} to generation {d.generation}",
                                     system=d.system, needs_reboot=needs_reboot)
        except StateError as exc:
            # The journal cannot record what we do: stop, report, trust nothing unwritten.
            log.error("%s: %s", self.ctx.host, exc)
            await self.ctx.reporter.result(d.deployment_id, d.generation, "failed",
                                           f"agent state unusable: {exc}", None, False,
                                           self.log_tail)
            await self.phase("failed", last_result="failed", message=str(exc))
            raise

    async def _pipeline(self) -> None:
        d = self.d
        toplevel = await self.stage("fetch", self.fetch)
        await self.phase("fetched")
        await self.stage("check", lambda: self.check(toplevel))
        await self.phase("checked")
        if d.check_only:
            return
        for hook in ("choose", "approve", "dump", "migrate:before-switch"):
            if hook in self.hooks:
                await self.stage(hook, self.hooks[hook])
        await self.stage("switch", lambda: self.switch(toplevel))
        await self.phase("switched")
        if "reboot" in self.hooks:
            await self.stage("reboot", self.hooks["reboot"])
        if "migrate:after-switch" in self.hooks:
            await self.stage("migrate:after-switch", self.hooks["migrate:after-switch"])
            await self.phase("migrated")
        await self.stage("confirm", self.confirm)
        await self.phase("confirmed")

    async def fetch(self) -> str:
        await self.phase("acked")
        await self.progress("fetch", f"fetching {self.d.system}")

        async def line(msg: str) -> None:
            await self.progress("fetch", msg)

        return await self.ctx.backend.fetch(self.d.system, self.ctx.host, line)

    async def check(self, toplevel: str) -> Any:
        await self.progress("check", "running state checks of the new system")
        checker = self.hooks.get("check")
        if checker is not None:
            return await checker()
        await self.ctx.reporter.check_report(self.d.deployment_id, self.d.generation, [], [],
                                             self.d.check_only)
        return {"items": []}

    async def switch(self, toplevel: str) -> dict[str, Any]:
        await self.progress("switch", f"switch-to-configuration {self.d.action}")

        async def line(msg: str) -> None:
            await self.progress("switch", msg)

        outcome = await self.ctx.backend.switch(toplevel, self.d.action, line)
        needs_reboot = outcome.reboot_required or self.ctx.backend.needs_reboot(toplevel)
        self.journal("note", key="needs_reboot", value=needs_reboot)
        if outcome.units_failed:
            await self.progress("switch", "switch-to-configuration: some units failed (exit 4)")
            raise DeployFailed("activation finished but some units failed (exit 4)",
                               rollback=True)
        return {"exit_code": outcome.exit_code, "needs_reboot": needs_reboot}

    async def confirm(self) -> None:
        policy = self.d.policy
        if policy.confirm == "none" or self.d.action == "boot":
            return
        deadline = self.active.notes.get("confirm_deadline")
        if deadline is None:
            deadline = time.time() + policy.confirm_timeout_s
            self.journal("note", key="confirm_deadline", value=deadline)
        remaining = deadline - time.time()
        await self.progress("confirm", f"confirming broker reachability ({policy.confirm})")
        ok = remaining > 0 and await self.ctx.round_trip(
            self.d.generation, remaining, policy.confirm == "controller")
        if not ok:
            raise DeployFailed(
                f"no confirmation through the broker within {policy.confirm_timeout_s:.0f}s",
                rollback=True)

    # -- endings ---------------------------------------------------------------------
    async def fail_after_error(self, message: str) -> RecordedResult:
        switched = "switch" in self.active.started
        if switched:
            return await self.roll_back(message)
        return await self.finish("failed", message)

    async def roll_back(self, reason: str) -> RecordedResult:
        a = self.active
        await self.phase("rolling_back", message=reason)
        self.journal("begin", stage="rollback")
        restore = self.hooks.get("restore")
        try:
            if restore is not None:
                await restore()
            if "switch" in a.started:

                async def line(msg: str) -> None:
                    await self.progress("rollback", msg)

                await self.progress("rollback", f"rolling back: {reason}")
                await self.ctx.backend.rollback(a.previous_system, line)
        except (BackendError, DeployFailed) as exc:
            return await self.finish("failed", f"{reason}; rollback failed: {exc}")
        self.journal("end", stage="rollback")
        return await self.finish("rolled_back", reason, system=a.previous_system)

    async def finish(self, status: str, message: str, system: str | None = None,
                     needs_reboot: bool = False) -> RecordedResult:
        d = self.d
        self.journal("result", generation=d.generation, status=status, message=message,
                     system=system, needs_reboot=needs_reboot)
        st = self.ctx.journal.state
        await self.ctx.reporter.result(d.deployment_id, d.generation, status, message, system,
                                       needs_reboot, self.log_tail)
        phase = "done" if status == "succeeded" else status
        await self.phase(phase, last_result=status, message=message, system=st.system,
                         generation=st.generation, needs_reboot=needs_reboot, percent=None,
                         step=None, open_prompt=None)
        rec = st.results[d.deployment_id]
        return rec


def new_nonce() -> str:
    return uuid.uuid4().hex


async def sleep_until(deadline: float) -> None:
    await asyncio.sleep(max(0.0, deadline - time.time()))
