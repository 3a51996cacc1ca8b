"""One deployment on one host: a thin loop around the stage machine.

`client.run.machine.next_step` decides everything (stage order, prompts, waits, endings);
this runner asks it, executes the step through the SystemBackend and
`client.steps.programs`, journals, and asks again. Each stage is journaled before it
starts and after it ends, so after a crash or a reboot the machine, reading the same
journal, resumes at the first unfinished stage. Answers, approvals, deferrals and
cancellations are journaled the moment they arrive (`on_answer`, `cancel`) and wake
the loop; nothing here keeps a copy of them.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from client.host.backend import BackendError, SystemBackend, program_output
from client.journal import ActiveDeployment, Journal, RecordedResult
from client.report.deplog import DeploymentLog
from client.report.reporter import Reporter
from client.run import machine
from client.run.machine import Ask, Facts, Finish, Reboot, Record, RollBack, RunStage, RunSteps
from client.run.reboot import activation_needs_reboot
from client.steps import plan
from client.steps.dumps import DumpStore
from client.steps.programs import (
    StepEnv,
    dump_step,
    encode_items,
    load_steps,
    restore_step,
    run_check,
    run_graph,
    run_migration,
)
from protocol import prompts
from protocol.errors import FlotillaError, StateError
from protocol.models import Answer, Desired, Log, LogLine, Prompt, ReportItem
from protocol.outcomes import phase_of
from protocol.steps import StepDecl, StepsFile

log = logging.getLogger(__name__)

STAGE_PERCENT = {
    "fetch": 5, "check": 25, "choose": 30, "approve": 32, "dump": 35,
    "migrate:before-switch": 45, "switch": 60, "reboot": 70, "migrate:after-switch": 80,
    "confirm": 92, "rollback": 95,
}
PASSING_PHASES = {"fetched", "checked", "switched", "migrated", "confirmed"}
PROGRESS_STAGE = {"choice": "choose", "step_failure": "choose", "approval": "approve",
                  "reboot": "reboot", "rollback-previous": "rollback"}


class StageFailed(FlotillaError):
    """A stage body cannot complete; the machine decides how the deployment ends
    (`blocked`: nothing changed and retrying will not help)."""

    def __init__(self, message: str, status: str = "failed") -> None:
        super().__init__(message)
        self.status = status


class AgentContext(Protocol):
    host: str
    journal: Journal
    backend: SystemBackend
    reporter: Reporter
    dumps: DumpStore
    tonight: str

    @property
    def state_dir(self) -> Path: ...

    async def listening(self, waiting: Callable[[str], Awaitable[None]] | None = None
                        ) -> None: ...

    async def round_trip(self, generation: int, timeout: float, controller: bool) -> bool: ...


def local_now() -> datetime:
    return datetime.now().astimezone()


class DeploymentRunner:
    def __init__(self, ctx: AgentContext, desired: Desired) -> None:
        self.ctx = ctx
        self.d = desired
        self.steps: StepsFile | None = None
        self._prompt: Prompt | None = None
        self._wake = asyncio.Event()
        self.on_prompt: list[Callable[[Prompt | None], Awaitable[None]]] = []
        self._before = ctx.reporter.state  # what the host reported before this deployment
        self.output = DeploymentLog(ctx.state_dir, desired.deployment_id, self._send_log)

    async def _send_log(self, lines: list[LogLine], dropped: int) -> None:
        await self.ctx.reporter.event(Log, self.d.deployment_id, self.d.generation,
                                      lines=lines, dropped=dropped)

    def _lines_to(self, source: str) -> None:
        """Programs run from here on (in this task) print into the log as `source`."""
        program_output.set(self.output.writer(source))

    def _program_lines(self, source: str) -> Callable[[str], Awaitable[None]]:
        """A backend's ProgressFn: each line of its programs into the log (batched into
        Log events), never one event per line."""
        write = self.output.writer(source)

        async def line(msg: str) -> None:
            write("stdout", msg)

        return line

    @property
    def active(self) -> ActiveDeployment:
        a = self.ctx.journal.state.active
        assert a is not None and a.deployment_id == self.d.deployment_id
        return a

    @property
    def open_prompt(self) -> Prompt | None:
        """The prompt this deployment waits on now (None while it works)."""
        return self._prompt

    def prompt_answers(self) -> dict[str, str]:
        """What the open prompt was answered so far (partial answers)."""
        p = self._prompt
        return dict(self.active.prompt_answers.get(p.prompt_id, {})) if p else {}

    def poke(self) -> None:
        """Something the machine reads changed (answer, cancel): decide again."""
        self._wake.set()

    # -- reporting and journaling helpers -------------------------------------------
    async def progress(self, stage: str, message: str = "", step: str | None = None,
                       percent: float | None = None, prompt: Prompt | None = None,
                       deferred_until: float | None = None) -> None:
        stage = PROGRESS_STAGE.get(stage, stage)
        if message:
            self.output.line("agent", stage.split(":")[0] + (f":{step}" if step else ""),
                             message)
        pct = percent if percent is not None else STAGE_PERCENT.get(stage)
        await self.ctx.reporter.progress(self.d.deployment_id, self.d.generation,
                                         stage.split(":")[0], message, pct, step, prompt,
                                         deferred_until)

    async def phase(self, phase: str, **extra: Any) -> None:
        """Update the HostState. Passing phases (fetched, checked, ...) are only published
        with the next one that matters: Progress events already carry them live, and the
        retained state is for catch-up."""
        await self.ctx.reporter.host_state(
            phase=phase, deployment_id=self.d.deployment_id, rollout_id=self.d.rollout_id,
            desired_generation=self.d.generation, publish=phase not in PASSING_PHASES, **extra)

    def journal(self, kind: str, **fields: Any) -> None:
        self.ctx.journal.append(kind, deployment_id=self.d.deployment_id, **fields)

    def active_done(self, stage: str) -> Any:
        """What a stage of this deployment returned (also once it has a result)."""
        st = self.ctx.journal.state
        a = st.active if st.active is not None and \
            st.active.deployment_id == self.d.deployment_id else st.last_deployment
        return a.done.get(stage) if a is not None else None

    @property
    def env(self) -> StepEnv:
        return StepEnv(self.ctx.host, self.active.previous_system, self.d)

    @property
    def items(self) -> list[ReportItem]:
        return machine.items_of(self.active)

    @property
    def answers(self) -> dict[str, str]:
        return machine.answers_of(self.d, self.active)

    def facts(self) -> Facts:
        a = self.active
        if self.steps is None and "fetch" in a.done:
            try:
                self.steps = load_steps(str(a.done["fetch"]))
            except BackendError as exc:
                self.steps = StepsFile()
                if "error" not in a.notes:
                    self.journal("note", key="error", value={"stage": "fetch",
                                                             "message": str(exc)})
        return Facts(self.d, a, self.steps, self.ctx.backend.boot_id(), local_now(),
                     self.ctx.tonight)

    # -- the loop --------------------------------------------------------------------
    async def run(self) -> RecordedResult:
        self.output.start()
        try:
            return await self._run()
        finally:
            await self.output.close()

    async def _run(self) -> RecordedResult:
        d = self.d
        try:
            while True:
                self._wake.clear()
                step = machine.next_step(self.facts())
                if not isinstance(step, Ask) and self._prompt is not None:
                    await self._close_prompt()
                if isinstance(step, Finish):
                    result = await self.finish(step)
                    if step.status == "succeeded" and (
                            self.active_done("switch") or {}).get("restart_agent"):
                        await self.restart_agent()
                    return result
                await self.execute(step)
        except StateError as exc:
            # The journal cannot record what we do: stop. If the failure itself can be
            # recorded (the reserve freed a little space) the deploy ends cleanly as failed;
            # otherwise we report and stop the agent, trusting nothing unwritten.
            log.error("%s: %s", self.ctx.host, exc)
            message = f"agent state unusable, deploy stopped: {exc}"
            try:
                return await self.finish(Finish("failed", message))
            except StateError:
                await self.ctx.reporter.result(d.deployment_id, d.generation, "failed",
                                               message, None, False, self.output.tail)
                await self.phase("failed", last_result="failed", message=message)
                raise

    async def execute(self, step: machine.Step) -> None:
        if isinstance(step, RunStage):
            await self._stage(step.name)
        elif isinstance(step, RunSteps):
            await self._guarded(step.phase, lambda: self.migrate(step.phase, step.names))
        elif isinstance(step, Record):
            for kind, fields in step.records:
                self.journal(kind, **fields)
            if step.message:
                await self.progress("choose" if step.records[0][0] == "answer" else "migrate",
                                    step.message)
        elif isinstance(step, Ask):
            await self._ask(step)
        elif isinstance(step, Reboot):
            await self._guarded("reboot", self.reboot)
        elif isinstance(step, RollBack):
            await self.roll_back(step.reason)

    async def _guarded(self, stage: str, body: Callable[[], Awaitable[Any]]) -> None:
        """Run a body; a host error is journaled for the machine to decide on."""
        try:
            await body()
        except (BackendError, StageFailed, OSError) as exc:
            await self._note_error(stage, exc)

    async def _note_error(self, stage: str, exc: Exception) -> None:
        message = str(exc) if isinstance(exc, FlotillaError) or not isinstance(exc, OSError) \
            else f"host error: {exc.strerror}: {exc.filename or ''}".rstrip(": ")
        status = exc.status if isinstance(exc, StageFailed) else "failed"
        self.journal("note", key="error", value={"stage": stage, "message": message,
                                                 "status": status})
        await self.progress(stage, message)

    async def _stage(self, name: str) -> None:
        bodies: dict[str, Callable[[], Awaitable[Any]]] = {
            "fetch": self.fetch, "check": self.check, "dump": self.dump,
            "switch": self.switch, "reboot": self.after_reboot, "confirm": self.confirm,
            "rollback-previous": self.rollback_previous, "dry-activate": self.dry_activate,
        }
        self.journal("begin", stage=name)
        token = program_output.set(self.output.writer(name))
        try:
            data = await bodies[name]()
        except (BackendError, StageFailed, OSError) as exc:
            await self._note_error(name, exc)
            return
        finally:
            program_output.reset(token)
        self.journal("end", stage=name, data=data)
        passing = {"fetch": "fetched", "check": "checked", "switch": "switched"}
        if name in passing:
            await self.phase(passing[name])

    # -- prompts ---------------------------------------------------------------------
    async def _ask(self, step: Ask) -> None:
        """Publish the (journaled) prompt, then wait for an answer, a cancel or wake_at."""
        a = self.active
        if step.prompt_id not in a.prompts:
            deadline = (time.time() + self.d.policy.prompt_deadline_s
                        if self.d.policy.prompt_deadline_s else None)
            prompt = Prompt(host=self.ctx.host, prompt_id=step.prompt_id,
                            deployment_id=self.d.deployment_id, generation=self.d.generation,
                            kind=step.kind, items=list(step.items),  # type: ignore[arg-type]
                            created_at=time.time(), deadline=deadline)
            self.journal("prompt", prompt_id=step.prompt_id, prompt=prompt.model_dump(mode="json"))
            self.poke()  # the machine sees the journaled prompt (and its deadline) next
        prompt = Prompt.model_validate(a.prompts[step.prompt_id])
        if self._prompt is None or self._prompt.prompt_id != prompt.prompt_id:
            if self._prompt is not None:
                await self._close_prompt()
            self._prompt = prompt
            # whoever sees the prompt can answer it; a refused subscription is told
            await self.ctx.listening(lambda why: self.progress(step.kind, why))
            await self.ctx.reporter.prompt(prompt)
            # Also as an event: a controller following events (not retained states)
            # learns that this host now waits, and for which prompt.
            await self.progress(step.kind, step.message, prompt=prompt,
                                deferred_until=step.deferred_until)
            for cb in self.on_prompt:
                await cb(prompt)
        state = self.ctx.reporter.state
        if (state.phase, state.message, state.deferred_until, state.open_prompt) != (
                step.phase, step.message, step.deferred_until, prompt.prompt_id) \
                or (step.needs_reboot and not state.needs_reboot):
            if state.deferred_until != step.deferred_until:
                await self.progress(step.kind, step.message, prompt=prompt,
                                    deferred_until=step.deferred_until)
            await self.phase(step.phase, open_prompt=prompt.prompt_id, message=step.message,
                             deferred_until=step.deferred_until,
                             needs_reboot=step.needs_reboot or state.needs_reboot)
        timeout = None if step.wake_at is None else max(0.0, step.wake_at - time.time())
        try:
            await asyncio.wait_for(self._wake.wait(), timeout)
        except TimeoutError:
            pass

    async def _close_prompt(self) -> None:
        self._prompt = None
        await self.ctx.reporter.prompt(None)
        for cb in self.on_prompt:
            await cb(None)
        await self.phase("acked", open_prompt=None, message="", deferred_until=None)

    async def on_answer(self, answer: Answer, source: str) -> tuple[bool, str]:
        """Journal an answer to the open prompt (remote, Home Assistant or local) and wake
        the loop; the first complete answer closes the prompt, later ones are refused."""
        a = self.active
        if answer.prompt_id in a.closed_prompts:
            return False, f"prompt {answer.prompt_id} was already answered"
        prompt = self._prompt
        if prompt is None and answer.prompt_id in a.prompts:
            # journaled and still open, not re-published yet (the agent just restarted)
            prompt = Prompt.model_validate(a.prompts[answer.prompt_id])
        verdict = prompts.validate_answer(prompt, answer,
                                          a.prompt_answers.get(answer.prompt_id, {}),
                                          local_now(), self.ctx.tonight)
        if not verdict.ok:
            return False, verdict.message
        self.journal("answer", prompt_id=answer.prompt_id, choices=verdict.choices,
                     source=source, by=answer.answered_by, complete=verdict.complete,
                     deferred_until=verdict.deferred_until)
        who = answer.answered_by or source
        await self.progress(PROGRESS_STAGE.get(prompt.kind if prompt else "", "choose"),
                            f"answered by {who}: {verdict.choices}", prompt=prompt,
                            deferred_until=verdict.deferred_until)
        if not verdict.complete and prompt is not None:
            for cb in self.on_prompt:
                await cb(prompt)
        self.poke()
        return True, verdict.message

    def cancel(self, reason: str) -> None:
        """Journal a cancellation: it ends the deployment's current or next wait."""
        if "cancel" not in self.active.notes:
            self.journal("note", key="cancel", value=reason)
        self.poke()

    # -- stage bodies ------------------------------------------------------------------
    async def fetch(self) -> str:
        await self.phase("acked")
        await self.progress("fetch", f"fetching {self.d.system}")
        return await self.ctx.backend.fetch(self.d.system, self.ctx.host,
                                            self._program_lines("fetch"), cache=self.d.cache)

    async def check(self) -> dict[str, Any]:
        """Run the NEW system's checks against this host, in parallel, and report."""
        steps = self.steps or StepsFile()
        checks = [s for s in steps.steps if s.check]
        await self.progress("check", f"running {len(checks)} state check(s) of the new system")

        async def one(step: StepDecl) -> list[ReportItem]:
            self._lines_to(f"check:{step.name}")
            return await run_check(self.ctx.backend, step, self.env)

        results = await asyncio.gather(*(one(s) for s in checks))
        items = [i for r in results for i in r]
        bad = plan.invalid_answers(items, self.d.choices)
        if bad:
            items.append(ReportItem(step="-", id="bad-pre-answer", severity="error",
                                    message=f"pre-answers do not fit: {', '.join(bad)}"))
        open_keys = [i.key for i in plan.open_items(items, self.d.choices)]
        await self.ctx.reporter.check_report(self.d.deployment_id, self.d.generation, items,
                                             open_keys, self.d.check_only)
        return {"items": encode_items(items)}

    async def dump(self) -> dict[str, Any]:
        steps = self.steps or StepsFile()
        affected = plan.affected_steps(steps.steps, self.items, self.answers)
        dumps: dict[str, str] = {}
        for step in affected:
            await self.progress("dump", f"dumping state of {step.name}", step=step.name)
            self._lines_to(f"dump:{step.name}")
            dumps[step.name] = await dump_step(self.ctx.backend, self.ctx.dumps, step,
                                               step.revision, self.env)
        return {"dumps": dumps}

    async def migrate(self, phase: str, names: tuple[str, ...]) -> None:
        """Run these steps' migrations in dependency order, some in parallel; a failure
        is noted and its dependents wait (the machine resolves it)."""
        steps = self.steps or StepsFile()
        by_name = steps.by_name()
        graph = plan.phase_graph(steps.steps, phase)
        todo = set(names)

        async def run(name: str) -> bool:
            if name not in todo:
                return True
            return await self._run_step(by_name[name])

        def skip(name: str, because: str) -> None:
            if name in todo:
                self.output.line("agent", f"migrate:{name}", f"waits: {because} failed")

        await run_graph(graph, self.d.policy.max_parallel_steps, run, skip)

    async def _run_step(self, step: StepDecl) -> bool:
        key = f"step:{step.name}"
        self.journal("begin", stage=key)
        self._lines_to(f"migrate:{step.name}")
        await self.phase("migrating", step=step.name)
        await self.progress("migrate", f"migrating {step.name}", step=step.name)
        for m in plan.migrations_for(step, self.items, self.answers):
            error = await run_migration(self.ctx.backend, step, m, self.env)
            if error is not None:
                self.journal("note", key=f"failed:{step.name}", value=error)
                await self.progress("migrate", f"{step.name} failed: {error}", step=step.name)
                return False
        self.journal("end", stage=key, data={"status": "ok"})
        await self.progress("migrate", f"{step.name} done", step=step.name)
        return True

    async def switch(self) -> dict[str, Any]:
        toplevel = str(self.active.done["fetch"])
        await self.progress("switch", f"switch-to-configuration {self.d.action}")
        backend = self.ctx.backend
        outcome = await backend.switch(toplevel, self.d.action, self._program_lines("switch"),
                                       install_bootloader=self.d.install_bootloader)
        if outcome.inhibited:
            raise StageFailed(
                f"switch-to-configuration {self.d.action} refused by switch inhibitors "
                "(nothing was activated; the boot default is unchanged): deploy with "
                "--action boot and reboot to take this system", status="blocked")
        if outcome.units_failed:
            await self.progress("switch", "switch-to-configuration: some units failed (exit 4)")
            raise StageFailed("activation finished but some units failed (exit 4)")
        restart_agent = self.d.action in ("switch", "test") and backend.agent_unit_changed(
            self.active.previous_system, toplevel)
        return {"exit_code": outcome.exit_code, "needs_reboot": activation_needs_reboot(
            self.d.action, outcome.reboot_required, backend.needs_reboot(toplevel),
            backend.current_system(), toplevel), "restart_agent": restart_agent}

    async def restart_agent(self) -> None:
        """The new system has another agent unit: restart into it now that the result
        is journaled and published (like comin). A failure leaves the old agent running,
        which is still correct, only older."""
        log.info("%s: the agent's unit changed with this system; restarting the agent",
                 self.ctx.host)
        try:
            await self.ctx.backend.restart_agent()
        except BackendError as exc:
            log.warning("%s: %s (the new agent starts at the next boot)", self.ctx.host, exc)

    async def dry_activate(self) -> dict[str, Any]:
        """switch-to-configuration dry-activate: what a switch would stop, restart, start
        or reload, reported; nothing is switched and the profile is untouched."""
        toplevel = str(self.active.done["fetch"])
        await self.progress("switch", "switch-to-configuration dry-activate")
        would: list[str] = []

        async def line(msg: str) -> None:
            if msg.startswith("would "):
                would.append(msg)
            await self.progress("switch", msg)

        outcome = await self.ctx.backend.switch(toplevel, "dry-activate", line)
        if outcome.inhibited:
            would.append("a switch would be refused by switch inhibitors (boot would work)")
        return {"would": would}

    async def reboot(self) -> None:
        """The boot id is journaled first, so after the boot the machine sees a new id
        and finishes the deploy."""
        self.journal("note", key="reboot_boot_id", value=self.ctx.backend.boot_id())
        await self.phase("awaiting_reboot", message="rebooting", needs_reboot=True)
        await self.progress("reboot", "rebooting")
        await self.ctx.backend.reboot()  # returns only if the host failed to go down

    async def after_reboot(self) -> dict[str, Any]:
        toplevel = str(self.active.done["fetch"])
        await self.progress("reboot", "host rebooted; finishing the deploy")
        return {"rebooted": True, "needs_reboot": self.ctx.backend.needs_reboot(toplevel)}

    async def confirm(self) -> None:
        policy = self.d.policy
        deadline = self.active.notes.get("confirm_deadline")
        if deadline is None:
            deadline = time.time() + policy.confirm_timeout_s
            self.journal("note", key="confirm_deadline", value=deadline)
        remaining = deadline - time.time()
        await self.progress("confirm", f"confirming broker reachability ({policy.confirm})")
        ok = remaining > 0 and await self.ctx.round_trip(
            self.d.generation, remaining, policy.confirm == "controller")
        if not ok:
            raise StageFailed(
                f"no confirmation through the broker within {policy.confirm_timeout_s:.0f}s")

    async def rollback_previous(self) -> dict[str, Any]:
        """`fleetctl rollback`: undo the last deployment, data (dumps) and code."""
        last = self.ctx.journal.state.last_deployment
        if last is None or "switch" not in last.started:
            raise StageFailed("nothing to roll back: no earlier deployment switched here")
        await self.phase("rolling_back", message=f"rolling back {last.deployment_id}")
        steps = load_steps(str(last.done.get("fetch") or ""))
        by_name = steps.by_name()
        dumps: dict[str, str] = (last.done.get("dump") or {}).get("dumps") or {}
        env = StepEnv(self.ctx.host, last.previous_system, self.d)
        for name in plan.reverse_order([s for s in steps.steps if s.name in dumps]):
            await self.progress("rollback", f"restoring {name}", step=name)
            await restore_step(self.ctx.backend, self.ctx.dumps, by_name[name], dumps[name], env)
        await self.ctx.backend.rollback(last.previous_system, self._program_lines("rollback"))
        return {"system": last.previous_system, "generation": last.previous_generation,
                "message": f"rolled back deployment {last.deployment_id} "
                           f"(generation {last.generation})"}

    # -- endings ---------------------------------------------------------------------
    async def roll_back(self, reason: str) -> None:
        """Restore dumps (reverse dependency order), then switch back to the previous
        generation: code and data return together."""
        a = self.active
        if "rollback_reason" not in a.notes:
            self.journal("note", key="rollback_reason", value=reason)
        await self.phase("rolling_back", message=reason)
        self.journal("begin", stage="rollback")
        await self.progress("rollback", f"rolling back: {reason}")
        line = self._program_lines("rollback")
        self._lines_to("rollback")
        try:
            steps = self.steps or StepsFile()
            dumps: dict[str, str] = (a.done.get("dump") or {}).get("dumps") or {}
            by_name = steps.by_name()
            touched = {n for n in dumps if f"step:{n}" in a.started}
            for name in plan.reverse_order([s for s in steps.steps if s.name in dumps]):
                if name in touched:
                    await self.progress("rollback", f"restoring {name}", step=name)
                    self._lines_to(f"restore:{name}")
                    await restore_step(self.ctx.backend, self.ctx.dumps, by_name[name],
                                       dumps[name], self.env)
            if "switch" in a.started:
                await self.ctx.backend.rollback(a.previous_system, line)
        except (BackendError, OSError) as exc:
            self.journal("note", key="rollback_error", value=str(exc))
            return
        self.journal("end", stage="rollback")

    async def finish(self, f: Finish) -> RecordedResult:
        d = self.d
        extra: dict[str, Any] = {} if f.installed is None else {"installed": f.installed}
        if d.check_only:
            extra["check_only"] = True  # a check is no deploy, after a restart too
        self.journal("result", generation=d.generation, status=f.status, message=f.message,
                     system=f.system, needs_reboot=f.needs_reboot, **extra)
        st = self.ctx.journal.state
        current = self.ctx.backend.current_system()
        await self.output.flush()  # the lines arrive before the Result that ends the host
        await self.ctx.reporter.result(d.deployment_id, d.generation, f.status, f.message,
                                       f.system or current, f.needs_reboot, self.output.tail)
        await self.ctx.reporter.prompt(None)
        if d.check_only:  # a check is no deploy: the host's reported status stays as it was
            b = self._before
            await self.ctx.reporter.host_state(
                phase=b.phase, last_result=b.last_result, message=b.message,
                deployment_id=b.deployment_id, rollout_id=b.rollout_id,
                desired_generation=b.desired_generation, percent=None, step=None,
                open_prompt=None, deferred_until=None)
            return st.results[d.deployment_id]
        await self.phase(phase_of(f.status), last_result=f.status, message=f.message,
                         system=current or st.system,
                         generation=st.generation, needs_reboot=f.needs_reboot, percent=None,
                         step=None, open_prompt=None, deferred_until=None)
        return st.results[d.deployment_id]


def new_nonce() -> str:
    return uuid.uuid4().hex
