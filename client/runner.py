"""One deployment on one host, as a resumable pipeline of journaled stages.

fetch → check → choose → approve → dump → migrate(before) → switch → reboot →
migrate(after) → confirm. Each stage is journaled before it starts and after it ends;
on restart the runner skips what is done and resumes at the first unfinished stage.
Host side effects go through the SystemBackend; pure decisions live in
`client.decide` and `client.plan`; programs are run by `client.statesteps`.
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

from client import plan
from client.backend import BackendError, SystemBackend, program_output
from client.deadline import DEADLINE_SOURCE, deadline_answer, seconds_left
from client.deplog import DeploymentLog
from client.dumps import DumpStore
from client.journal import ActiveDeployment, Journal, RecordedResult
from client.reboot import activation_needs_reboot, reboot_decision
from client.report import Reporter
from client.statesteps import (
    StepEnv,
    decode_items,
    dump_step,
    encode_items,
    load_steps,
    restore_step,
    run_check,
    run_graph,
    run_migration,
)
from protocol.errors import FlotillaError, StateError
from protocol.models import Answer, Choice, Desired, Log, LogLine, Prompt, ReportItem
from protocol.outcomes import phase_of
from protocol.steps import StepDecl, StepsFile

log = logging.getLogger(__name__)

STAGE_PERCENT = {
    "fetch": 5, "check": 25, "choose": 30, "approve": 32, "dump": 35,
    "migrate:before-switch": 45, "switch": 60, "reboot": 70, "migrate:after-switch": 80,
    "confirm": 92, "rollback": 95,
}
PASSING_PHASES = {"fetched", "checked", "switched", "migrated", "confirmed"}
FAILURE_CHOICES = [
    Choice(id="retry", label="Retry", description="run the step again"),
    Choice(id="skip", label="Skip", description="mark the step done and go on"),
    Choice(id="rollback", label="Roll back", description="restore dumps and the previous "
                                                            "generation", destructive=True),
]


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
    dumps: DumpStore

    @property
    def state_dir(self) -> Path: ...

    async def round_trip(self, generation: int, timeout: float, controller: bool) -> bool: ...


class DeploymentRunner:
    def __init__(self, ctx: AgentContext, desired: Desired) -> None:
        self.ctx = ctx
        self.d = desired
        self.steps = StepsFile()
        self.prompt: Prompt | None = None
        self._answered: asyncio.Future[dict[str, str]] | None = None
        self.on_prompt: list[Callable[[Prompt | None], Awaitable[None]]] = []
        self.output = DeploymentLog(ctx.state_dir, desired.deployment_id, self._send_log)

    async def _send_log(self, lines: list[LogLine], dropped: int) -> None:
        await self.ctx.reporter.event(Log, self.d.deployment_id, self.d.generation,
                                      lines=lines, dropped=dropped)

    def _lines_to(self, source: str) -> None:
        """Programs run from here on (in this task) print into the log as `source`."""
        program_output.set(self.output.writer(source))

    @property
    def active(self) -> ActiveDeployment:
        a = self.ctx.journal.state.active
        assert a is not None and a.deployment_id == self.d.deployment_id
        return a

    # -- reporting and journaling helpers -------------------------------------------
    async def progress(self, stage: str, message: str = "", step: str | None = None,
                       percent: float | None = None, prompt: Prompt | None = None) -> None:
        if message:
            self.output.line("agent", stage.split(":")[0] + (f":{step}" if step else ""),
                             message)
        pct = percent if percent is not None else STAGE_PERCENT.get(stage)
        await self.ctx.reporter.progress(self.d.deployment_id, self.d.generation,
                                         stage.split(":")[0], message, pct, step, prompt)

    async def phase(self, phase: str, **extra: Any) -> None:
        """Update the HostState. Passing phases (fetched, checked, ...) are only published
        with the next one that matters: Progress events already carry them live, and the
        retained state is for catch-up."""
        await self.ctx.reporter.host_state(
            phase=phase, deployment_id=self.d.deployment_id, rollout_id=self.d.rollout_id,
            desired_generation=self.d.generation, publish=phase not in PASSING_PHASES, **extra)

    def _program_lines(self, source: str) -> Callable[[str], Awaitable[None]]:
        """A backend's ProgressFn: each line of its programs into the log (batched into
        Log events), never one event per line."""
        write = self.output.writer(source)

        async def line(msg: str) -> None:
            write("stdout", msg)

        return line

    def journal(self, kind: str, **fields: Any) -> None:
        self.ctx.journal.append(kind, deployment_id=self.d.deployment_id, **fields)

    async def stage(self, name: str, body: Callable[[], Awaitable[Any]],
                    needed: bool = True) -> Any:
        """Run `body` once: journaled before and after; skipped when already done.

        A stage with nothing to do (`needed` False, decided from journaled facts only) is
        not journaled at all: on resume the same facts give the same decision."""
        if name in self.active.done:
            return self.active.done[name]
        if not needed and name not in self.active.started:
            return None
        self.journal("begin", stage=name)
        token = program_output.set(self.output.writer(name))
        try:
            data = await body()
        finally:
            program_output.reset(token)
        self.journal("end", stage=name, data=data)
        return data

    @property
    def env(self) -> StepEnv:
        return StepEnv(self.ctx.host, self.active.previous_system, self.d)

    @property
    def items(self) -> list[ReportItem]:
        return decode_items((self.active.done.get("check") or {}).get("items"))

    @property
    def answers(self) -> dict[str, str]:
        return {**self.d.choices, **self.active.answers}

    # -- the pipeline ------------------------------------------------------------------
    async def run(self) -> RecordedResult:
        self.output.start()
        try:
            return await self._run()
        finally:
            await self.output.close()

    async def _run(self) -> RecordedResult:
        d = self.d
        try:
            try:
                await self._pipeline()
            except DeployFailed as exc:
                if exc.rollback:
                    return await self.roll_back(str(exc))
                return await self.finish(exc.status, str(exc))
            except (BackendError, OSError) as exc:
                message = str(exc) if isinstance(exc, BackendError) else \
                    f"host error: {exc.strerror}: {exc.filename or ''}".rstrip(": ")
                if "switch" in self.active.started or self.active.done.get("dump"):
                    return await self.roll_back(message)
                return await self.finish("failed", message)
            if d.check_only:
                return await self.finish("succeeded", "checks ran; nothing was switched")
            if d.action == "dry-activate":
                would = (self.active.done.get("dry-activate") or {}).get("would") or []
                return await self.finish("succeeded", "dry-activate: " + (
                    "; ".join(would) if would else "nothing would change") +
                    " (nothing was switched)")
            if d.rollback:
                prev = self.active.done.get("rollback-previous") or {}
                return await self.finish("succeeded", prev.get("message", "rolled back"),
                                         system=prev.get("system"))
            needs_reboot = self.needs_reboot
            return await self.finish("succeeded", f"{d.action} to generation {d.generation}",
                                     system=d.system, needs_reboot=needs_reboot)
        except StateError as exc:
            # The journal cannot record what we do: stop. If the failure itself can be
            # recorded (the reserve freed a little space) the deploy ends cleanly as failed;
            # otherwise we report and stop the agent, trusting nothing unwritten.
            log.error("%s: %s", self.ctx.host, exc)
            message = f"agent state unusable, deploy stopped: {exc}"
            try:
                return await self.finish("failed", message)
            except StateError:
                await self.ctx.reporter.result(d.deployment_id, d.generation, "failed",
                                               message, None, False, self.output.tail)
                await self.phase("failed", last_result="failed", message=message)
                raise

    async def _pipeline(self) -> None:
        if self.d.rollback:
            await self.stage("rollback-previous", self.rollback_previous)
            return
        toplevel = await self.stage("fetch", self.fetch)
        self.steps = load_steps(toplevel)
        cycle = plan.cycle_error(self.steps.steps)
        if cycle:
            raise DeployFailed(cycle, status="blocked")
        await self.stage("check", self.check)
        await self.phase("checked")
        if self.d.check_only:
            return
        if self.d.action == "dry-activate":
            await self.stage("dry-activate", lambda: self.dry_activate(toplevel))
            return
        items, answers = self.items, self.answers
        await self.stage("choose", self.choose, needed=bool(
            plan.blocking_errors(items) or plan.open_items(items, self.d.choices)))
        await self.stage("approve", self.approve, needed=self.d.policy.approval == "ask")
        await self.stage("dump", self.dump,
                         needed=bool(plan.affected_steps(self.steps.steps, items, self.answers)))
        await self.stage("migrate:before-switch", lambda: self.migrate("before-switch"),
                         needed=self.has_migrations("before-switch", answers))
        await self.stage("switch", lambda: self.switch(toplevel))
        await self.phase("switched")
        await self.stage("reboot", lambda: self.reboot(toplevel),
                         needed=self.needs_reboot or "reboot_boot_id" in self.active.notes)
        await self.stage("migrate:after-switch", lambda: self.migrate("after-switch"),
                         needed=self.has_migrations("after-switch", answers))
        await self.phase("migrated")
        rebooted = bool((self.active.done.get("reboot") or {}).get("rebooted"))
        await self.stage("confirm", self.confirm, needed=self.d.policy.confirm != "none" and (
            self.d.action != "boot" or rebooted))
        await self.phase("confirmed")

    @property
    def needs_reboot(self) -> bool:
        """After the switch (or, after a reboot, as the boot left it)."""
        notes = self.active.notes
        if "needs_reboot" in notes:
            return bool(notes["needs_reboot"])
        return bool((self.active.done.get("switch") or {}).get("needs_reboot"))

    def has_migrations(self, phase: str, answers: dict[str, str]) -> bool:
        by_name = self.steps.by_name()
        return any(plan.migrations_for(by_name[n], self.items, answers)
                   for n in plan.phase_graph(self.steps.steps, phase))

    async def fetch(self) -> str:
        await self.phase("acked")
        await self.progress("fetch", f"fetching {self.d.system}")

        line = self._program_lines("fetch")

        toplevel = await self.ctx.backend.fetch(self.d.system, self.ctx.host, line,
                                                cache=self.d.cache)
        await self.phase("fetched")
        return toplevel

    async def check(self) -> dict[str, Any]:
        """Run the NEW system's checks against this host, in parallel, and report."""
        checks = [s for s in self.steps.steps if s.check]
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

    async def choose(self) -> dict[str, Any]:
        items = self.items
        blocking = plan.blocking_errors(items)
        if blocking:
            raise DeployFailed("blocked by check errors: " + "; ".join(
                f"{i.key}: {i.message}" for i in blocking), status="blocked")
        pending = plan.open_items(items, self.d.choices)
        if pending:
            await self.ask(f"{self.d.deployment_id}.choose", "choice", pending)
        return {"answers": self.answers}

    async def approve(self) -> None:
        item = ReportItem(step="deploy", id="approve", severity="recommendation",
                          message=f"approve {self.d.action} to {self.d.system}",
                          choices=[Choice(id="approve", label="Approve")], default=None)
        await self.ask(f"{self.d.deployment_id}.approve", "approval", [item])

    async def dump(self) -> dict[str, Any]:
        affected = plan.affected_steps(self.steps.steps, self.items, self.answers)
        dumps: dict[str, str] = {}
        for step in affected:
            await self.progress("dump", f"dumping state of {step.name}", step=step.name)
            self._lines_to(f"dump:{step.name}")
            dumps[step.name] = await dump_step(self.ctx.backend, self.ctx.dumps, step,
                                               step.revision, self.env)
        return {"dumps": dumps}

    async def migrate(self, phase: str) -> dict[str, Any]:
        """Run this phase's migrations in dependency order, some in parallel."""
        by_name = self.steps.by_name()
        graph = plan.phase_graph(self.steps.steps, phase)
        todo = {n for n in graph if plan.migrations_for(by_name[n], self.items, self.answers)}
        if not todo:
            return {"steps": 0}
        rounds = 0
        while True:
            rounds += 1
            failed: dict[str, str] = {}
            await self._interrupted(todo, failed)

            async def run(name: str, failed: dict[str, str] = failed) -> bool:
                if name not in todo or f"step:{name}" in self.active.done or name in failed:
                    return name not in failed
                return await self._run_step(by_name[name], failed)

            def skip(name: str, because: str) -> None:
                if name in todo and f"step:{name}" not in self.active.done:
                    self.output.line("agent", f"migrate:{name}", f"skipped: {because} failed")

            await run_graph(graph, self.d.policy.max_parallel_steps, run, skip)
            if not failed:
                return {"steps": len(todo)}
            await self._resolve_failures(failed, rounds)

    async def _interrupted(self, todo: set[str], failed: dict[str, str]) -> None:
        """Steps begun but never ended: killed mid-run, or failed earlier."""
        for name in sorted(todo):
            key = f"step:{name}"
            if key in self.active.started and key not in self.active.done:
                note = self.active.notes.get(f"failed:{name}")
                step = self.steps.by_name()[name]
                if note is None and step.idempotent:
                    continue  # safe to run again
                failed[name] = note or "interrupted while running (the step is not idempotent)"

    async def _run_step(self, step: StepDecl, failed: dict[str, str]) -> bool:
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
                failed[step.name] = error
                return False
        self.journal("end", stage=key, data={"status": "ok"})
        await self.progress("migrate", f"{step.name} done", step=step.name)
        return True

    async def _resolve_failures(self, failed: dict[str, str], rounds: int) -> None:
        policy = self.d.policy.on_step_failure
        if policy == "ask" or (policy == "retry" and rounds > 2):
            items = [ReportItem(step=name, id="failed", severity="error", message=msg,
                                choices=FAILURE_CHOICES, default="rollback")
                     for name, msg in sorted(failed.items())]
            n = sum(1 for p in self.active.prompts if ".failure" in p) + 1
            answers = await self.ask(f"{self.d.deployment_id}.failure{n}", "step_failure", items)
            decisions = {name: answers.get(f"{name}.failed", "rollback") for name in failed}
        else:
            decisions = {name: policy for name in failed}
        if "rollback" in decisions.values():
            raise DeployFailed("migration failed: " + "; ".join(
                f"{n}: {m}" for n, m in failed.items()), rollback=True)
        for name, decision in decisions.items():
            key = f"step:{name}"
            if decision == "skip":
                self.journal("end", stage=key, data={"status": "skipped"})
            else:  # retry: forget the failure, run it again
                self.journal("reset", stages=[key], notes=[f"failed:{name}"])

    async def switch(self, toplevel: str) -> dict[str, Any]:
        await self.progress("switch", f"switch-to-configuration {self.d.action}")

        line = self._program_lines("switch")

        backend = self.ctx.backend
        outcome = await backend.switch(toplevel, self.d.action, line,
                                       install_bootloader=self.d.install_bootloader)
        if outcome.inhibited:
            raise DeployFailed(
                f"switch-to-configuration {self.d.action} refused by switch inhibitors "
                "(nothing was activated; the boot default is unchanged): deploy with "
                "--action boot and reboot to take this system", status="blocked")
        needs_reboot = activation_needs_reboot(self.d.action, outcome.reboot_required,
                                               backend.needs_reboot(toplevel),
                                               backend.current_system(), toplevel)
        if outcome.units_failed:
            await self.progress("switch", "switch-to-configuration: some units failed (exit 4)")
            raise DeployFailed("activation finished but some units failed (exit 4)",
                               rollback=True)
        return {"exit_code": outcome.exit_code, "needs_reboot": needs_reboot}

    async def dry_activate(self, toplevel: str) -> dict[str, Any]:
        """switch-to-configuration dry-activate: what a switch would stop, restart, start
        or reload, reported; nothing is switched and the profile is untouched."""
        await self.progress("switch", "switch-to-configuration dry-activate")
        would: list[str] = []

        async def line(msg: str) -> None:
            if msg.startswith("would "):
                would.append(msg)
            await self.progress("switch", msg)

        await self.ctx.backend.switch(toplevel, "dry-activate", line)
        return {"would": would}

    async def reboot(self, toplevel: str) -> dict[str, Any]:
        """Reboot when needed and the policy says so. The boot id is journaled first, so
        after the boot the agent sees the new id and finishes the deploy."""
        backend, notes = self.ctx.backend, self.active.notes
        before = notes.get("reboot_boot_id")
        if before is not None:
            if before == backend.boot_id():
                raise DeployFailed("a reboot was requested but the host did not reboot",
                                   rollback=True)
            self.journal("note", key="needs_reboot", value=backend.needs_reboot(toplevel))
            await self.progress("reboot", "host rebooted; finishing the deploy")
            return {"rebooted": True}
        while True:
            decision = reboot_decision(self.d.policy.reboot, self.needs_reboot,
                                       datetime.now().astimezone(), self.d.action)
            if decision.action in ("none", "report"):
                return {"rebooted": False}
            if decision.action == "ask":
                item = ReportItem(
                    step="deploy", id="reboot", severity="recommendation",
                    message="the new system needs a reboot",
                    choices=[Choice(id="now", label="Reboot now", destructive=True),
                             Choice(id="later", label="Later (report needs_reboot)")],
                    default="later")
                answers = await self.ask(f"{self.d.deployment_id}.reboot", "reboot", [item])
                if answers.get("deploy.reboot") != "now":
                    return {"rebooted": False}
                break
            if decision.action == "now":
                break
            assert decision.wait_until is not None
            await self.phase("awaiting_reboot",
                             message=f"reboot window opens at {decision.wait_until:%H:%M}")
            await self.progress("reboot", f"reboot window opens at {decision.wait_until:%H:%M}")
            await asyncio.sleep(max(0.0, decision.wait_until.timestamp() - time.time()))
        self.journal("note", key="reboot_boot_id", value=backend.boot_id())
        await self.phase("awaiting_reboot", message="rebooting")
        await self.progress("reboot", "rebooting")
        await backend.reboot()  # returns only if the host failed to go down (then it raises)
        return {"rebooted": False}

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
            raise DeployFailed(
                f"no confirmation through the broker within {policy.confirm_timeout_s:.0f}s",
                rollback=True)

    async def rollback_previous(self) -> dict[str, Any]:
        """`fleetctl rollback`: undo the last deployment, data (dumps) and code."""
        last = self.ctx.journal.state.last_deployment
        if last is None or "switch" not in last.started:
            raise DeployFailed("nothing to roll back: no earlier deployment switched here")
        await self.phase("rolling_back", message=f"rolling back {last.deployment_id}")
        steps = load_steps(str(last.done.get("fetch") or ""))
        by_name = steps.by_name()
        dumps: dict[str, str] = (last.done.get("dump") or {}).get("dumps") or {}
        env = StepEnv(self.ctx.host, last.previous_system, self.d)
        for name in plan.reverse_order([s for s in steps.steps if s.name in dumps]):
            await self.progress("rollback", f"restoring {name}", step=name)
            await restore_step(self.ctx.backend, self.ctx.dumps, by_name[name], dumps[name], env)

        await self.ctx.backend.rollback(last.previous_system, self._program_lines("rollback"))
        return {"system": last.previous_system,
                "message": f"rolled back deployment {last.deployment_id} "
                           f"(generation {last.generation})"}

    # -- prompts ---------------------------------------------------------------------
    async def ask(self, prompt_id: str, kind: str, items: list[ReportItem]) -> dict[str, str]:
        """Publish a retained prompt and wait (across restarts) for its answer."""
        a = self.active
        if prompt_id in a.closed_prompts:
            return self.answers
        if prompt_id not in a.prompts:
            deadline = (time.time() + self.d.policy.prompt_deadline_s
                        if self.d.policy.prompt_deadline_s else None)
            prompt = Prompt(host=self.ctx.host, prompt_id=prompt_id,
                            deployment_id=self.d.deployment_id, generation=self.d.generation,
                            kind=kind, items=items, created_at=time.time(),  # type: ignore[arg-type]
                            deadline=deadline)
            self.journal("prompt", prompt_id=prompt_id, prompt=prompt.model_dump(mode="json"))
        self.prompt = Prompt.model_validate(a.prompts[prompt_id])
        self._answered = asyncio.get_running_loop().create_future()
        try:
            await self.ctx.reporter.prompt(self.prompt)
            phase = "awaiting_approval" if kind == "approval" else "awaiting_choice"
            await self.phase(phase, open_prompt=prompt_id,
                             message=f"waiting for an answer to {prompt_id}")
            # Also as an event: a controller following events (not retained states)
            # learns that this host now waits, and for which prompt.
            stage = {"approval": "approve", "reboot": "reboot"}.get(kind, "choose")
            await self.progress(stage, f"waiting for an answer to {prompt_id}",
                                prompt=self.prompt)
            for cb in self.on_prompt:
                await cb(self.prompt)
            await self._wait_for_answer(self.prompt)
        finally:
            self.prompt, self._answered = None, None
        await self.ctx.reporter.prompt(None)
        for cb in self.on_prompt:
            await cb(None)
        await self.phase("acked", open_prompt=None, message="")
        return self.answers

    async def _wait_for_answer(self, prompt: Prompt) -> None:
        """Wait for answers; once the deadline passes (also while the host was down) the
        policy may take each item's default, recorded as taken by "deadline"."""
        assert self._answered is not None
        timeout = seconds_left(prompt, self.d.policy, time.time())
        try:
            await asyncio.wait_for(asyncio.shield(self._answered), timeout)
            return
        except TimeoutError:
            pass
        defaults = deadline_answer(prompt, self.d.policy, time.time())
        if defaults is not None and prompt.kind != "approval":
            _, message = await self.on_answer(defaults, DEADLINE_SOURCE)
            await self.progress("choose", f"deadline passed: took defaults {defaults.choices}"
                                          f" ({message})")
            if self._answered.done():
                return
        await self.progress("choose", "prompt deadline passed; still waiting for an answer")
        await self._answered

    async def on_answer(self, answer: Answer, source: str) -> tuple[bool, str]:
        """Apply an answer (remote, Home Assistant or local); the first one wins."""
        prompt = self.prompt
        a = self.active
        if answer.prompt_id in a.closed_prompts:
            return False, f"prompt {answer.prompt_id} was already answered"
        if prompt is None or prompt.prompt_id != answer.prompt_id:
            return False, f"no open prompt {answer.prompt_id}"
        if prompt.kind == "approval":
            if not answer.approve and answer.choices.get("deploy.approve") != "approve":
                return False, "an approval prompt needs approve"
            choices = {"deploy.approve": "approve"}
        else:
            choices = dict(answer.choices)
            keys = {i.key for i in prompt.items}
            unknown = [k for k in choices if k not in keys]
            bad = plan.invalid_answers(prompt.items, choices)
            if bad or unknown or not choices:
                return False, "invalid answer: " + "; ".join(
                    [*bad, *(f"{k} is not asked here" for k in unknown)] or ["no choices"])
        have = {**{k: v for k, v in a.answers.items() if k in {i.key for i in prompt.items}},
                **choices}
        missing = [i.key for i in prompt.items if i.key not in have]
        self.journal("answer", prompt_id=answer.prompt_id, choices=choices, source=source,
                     by=answer.answered_by, complete=not missing)
        who = answer.answered_by or source
        await self.progress("choose", f"answered by {who}: {choices}")
        if missing:
            for cb in self.on_prompt:
                await cb(prompt)
            return True, f"accepted; still open: {', '.join(missing)}"
        if self._answered is not None and not self._answered.done():
            self._answered.set_result(have)
        return True, "accepted"

    # -- endings ---------------------------------------------------------------------
    async def roll_back(self, reason: str) -> RecordedResult:
        """Restore dumps (reverse dependency order), then switch back to the previous
        generation: code and data return together."""
        a = self.active
        await self.phase("rolling_back", message=reason)
        self.journal("begin", stage="rollback")
        await self.progress("rollback", f"rolling back: {reason}")

        line = self._program_lines("rollback")
        self._lines_to("rollback")
        try:
            dumps: dict[str, str] = (a.done.get("dump") or {}).get("dumps") or {}
            by_name = self.steps.by_name()
            touched = {n for n in dumps if f"step:{n}" in a.started}
            for name in plan.reverse_order([s for s in self.steps.steps if s.name in dumps]):
                if name in touched:
                    await self.progress("rollback", f"restoring {name}", step=name)
                    self._lines_to(f"restore:{name}")
                    await restore_step(self.ctx.backend, self.ctx.dumps, by_name[name],
                                       dumps[name], self.env)
            if "switch" in a.started:
                await self.ctx.backend.rollback(a.previous_system, line)
        except (BackendError, OSError) as exc:
            return await self.finish("failed", f"{reason}; rollback failed: {exc}")
        self.journal("end", stage="rollback")
        return await self.finish("rolled_back", reason, system=None)

    async def finish(self, status: str, message: str, system: str | None = None,
                     needs_reboot: bool = False) -> RecordedResult:
        d = self.d
        self.journal("result", generation=d.generation, status=status, message=message,
                     system=system, needs_reboot=needs_reboot)
        st = self.ctx.journal.state
        await self.output.flush()  # the lines arrive before the Result that ends the host
        await self.ctx.reporter.result(d.deployment_id, d.generation, status, message,
                                       system or self.ctx.backend.current_system(),
                                       needs_reboot, self.output.tail)
        await self.ctx.reporter.prompt(None)
        await self.phase(phase_of(status), last_result=status, message=message,
                         system=self.ctx.backend.current_system() or st.system,
                         generation=st.generation, needs_reboot=needs_reboot, percent=None,
                         step=None, open_prompt=None)
        return st.results[d.deployment_id]


def new_nonce() -> str:
    return uuid.uuid4().hex
