"""The agent's stage machine for one deployment: facts in, the next step out. Pure.

`next_step` is the only place that knows the stage order, when a stage is needed,
which prompt to open, when a wait ends and how a deployment ends:

    fetch → check → choose → approve → dump → migrate(before-switch) → switch →
    reboot → migrate(after-switch) → confirm → done

Its facts are the journal (what began, what ended, answers, notes), the desired state,
the new system's declared steps, the host's boot id and the clock. Answers, approvals,
deferrals, reboot decisions and cancellations are journaled by the runner the moment
they arrive and read here fresh on every call, never copied, so an answer given while
a prompt is open counts exactly like a pre-answer. The runner (`client.run.runner`) only
executes the step it gets, journals, and asks again.

Waits (`Ask`) end when an answer arrives, when `wake_at` passes (a prompt deadline, a
deferral, a reboot window), or when the deployment is cancelled: `fleetctl cancel`, a
newer desired state and `fleetctl rollback` journal a `cancel` note, which ends the next
wait: before the switch the deployment ends `cancelled` (or rolls back what it touched),
a reboot wait ends as "later", a step-failure prompt rolls back.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from client.ask.deadline import deadline_outcome, effective_deadline
from client.journal import ActiveDeployment
from client.run.reboot import reboot_decision
from client.steps import plan
from protocol import prompts as P
from protocol.models import Desired, HostPhase, Prompt, ReportItem
from protocol.steps import StepsFile

INTERRUPTED = "interrupted while running (the step is not idempotent)"
DID_NOT_REBOOT = "a reboot was requested but the host did not reboot"


# -- facts ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Facts:
    desired: Desired
    active: ActiveDeployment
    steps: StepsFile | None
    """The new system's declared steps; None until fetched."""
    boot_id: str
    clock: datetime
    """The host's local time, tz-aware (reboot windows and deferrals are wall-clock)."""
    tonight: str = P.DEFAULT_TONIGHT

    @property
    def now(self) -> float:
        return self.clock.timestamp()


# -- steps ------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunStage:
    """Run one stage body (journaled begin/end by the runner)."""

    name: str


@dataclass(frozen=True)
class RunSteps:
    """Run these steps' migrations of `phase` in dependency order (journaled per step)."""

    phase: str
    names: tuple[str, ...]


@dataclass(frozen=True)
class Record:
    """Journal these records (a decision the machine took), then ask again."""

    records: tuple[tuple[str, dict[str, Any]], ...]
    message: str = ""


@dataclass(frozen=True)
class Ask:
    """Keep the prompt open (journal it first) and wait for an answer or `wake_at`."""

    prompt_id: str
    kind: str
    items: tuple[ReportItem, ...]
    phase: HostPhase
    message: str
    wake_at: float | None = None
    needs_reboot: bool = False
    deferred_until: float | None = None


@dataclass(frozen=True)
class Reboot:
    """Journal the boot id, then reboot."""


@dataclass(frozen=True)
class RollBack:
    reason: str


@dataclass(frozen=True)
class Finish:
    status: str
    message: str
    system: str | None = None
    needs_reboot: bool = False
    installed: int | None = None
    """Set by `fleetctl rollback`: the generation the host runs now (0: none of ours)."""


Step = RunStage | RunSteps | Record | Ask | Reboot | RollBack | Finish


# -- derived facts ------------------------------------------------------------------------

def items_of(a: ActiveDeployment) -> list[ReportItem]:
    raw = (a.done.get("check") or {}).get("items")
    return [ReportItem.model_validate(i) for i in raw] if isinstance(raw, list) else []


def answers_of(d: Desired, a: ActiveDeployment) -> dict[str, str]:
    """Pre-answers, overridden by what was answered since: read fresh each time."""
    return {**d.choices, **a.answers}


def touched(a: ActiveDeployment) -> bool:
    """Did the deployment change the host (a migration began, or the switch)?"""
    return "switch" in a.started or any(s.startswith("step:") for s in a.started)


def needs_reboot(a: ActiveDeployment) -> bool:
    """After the switch, or as the boot left it once the host rebooted."""
    after = a.done.get("reboot") or {}
    if "needs_reboot" in after:
        return bool(after["needs_reboot"])
    if "needs_reboot" in a.notes:  # journals written before the machine
        return bool(a.notes["needs_reboot"])
    return bool((a.done.get("switch") or {}).get("needs_reboot"))


# -- the machine --------------------------------------------------------------------------

def next_step(f: Facts) -> Step:
    a, d = f.active, f.desired
    notes = a.notes
    # Endings already under way.
    reason = str(notes.get("rollback_reason", ""))
    if "rollback" in a.done:
        return Finish("rolled_back", reason or "rolled back")
    if "rollback_error" in notes:
        return Finish("failed", f"{reason}; rollback failed: {notes['rollback_error']}")
    if "rollback" in a.started or "rollback_reason" in notes:
        return RollBack(reason)
    error = notes.get("error")
    if isinstance(error, dict):
        message = str(error.get("message", "stage failed"))
        if error.get("status") == "blocked":
            return Finish("blocked", message)
        if d.rollback or not touched(a):
            return Finish("failed", message)
        return RollBack(message)
    if d.rollback:
        if "rollback-previous" not in a.done:
            return RunStage("rollback-previous")
        prev = a.done["rollback-previous"] or {}
        return Finish("succeeded", str(prev.get("message", "rolled back")),
                      system=prev.get("system"), installed=int(prev.get("generation") or 0))

    if "fetch" not in a.done:
        return RunStage("fetch")
    steps = f.steps or StepsFile()
    cycle = plan.cycle_error(steps.steps)
    if cycle:
        return Finish("blocked", cycle)
    if "check" not in a.done:
        return RunStage("check")
    if d.check_only:
        return Finish("succeeded", "checks ran; nothing was switched")
    if d.action == "dry-activate":
        if "dry-activate" not in a.done:
            return RunStage("dry-activate")
        would = (a.done["dry-activate"] or {}).get("would") or []
        return Finish("succeeded", "dry-activate: " + (
            "; ".join(would) if would else "nothing would change") + " (nothing was switched)")

    items, answers = items_of(a), answers_of(d, a)
    cancel = notes.get("cancel")

    # choose
    blocking = plan.blocking_errors(items)
    if blocking:
        return Finish("blocked", "blocked by check errors: " + "; ".join(
            f"{i.key}: {i.message}" for i in blocking))
    pending = plan.open_items(items, answers)
    if pending:
        if cancel:
            return _cancelled(a, str(cancel))
        return _ask(f, "choice", pending, "awaiting_choice",
                    "waiting for choices: " + ", ".join(i.key for i in pending))

    # approve (or "not now": a deferral proceeds by itself when it ends)
    if d.policy.approval == "ask" and answers.get(P.APPROVE_KEY) != P.APPROVE:
        if cancel:
            return _cancelled(a, str(cancel))
        until = notes.get("deferred_until")
        if not isinstance(until, int | float) or f.now < until:
            deferred = float(until) if isinstance(until, int | float) else None
            message = (f"deferred until {P.fmt_time(deferred)}" if deferred is not None
                       else "waiting for approval")
            return _ask(f, "approval", [P.approval_item(d.action, d.system, f.tonight)],
                        "awaiting_approval", message, wake_at=deferred,
                        deferred_until=deferred)

    # dump, before-switch migrations, switch
    if plan.affected_steps(steps.steps, items, answers) and "dump" not in a.done:
        return RunStage("dump")
    step = _migrations(f, steps, "before-switch", items, answers)
    if step is not None:
        return step
    if "switch" not in a.done:
        return RunStage("switch")

    # reboot
    needs = needs_reboot(a)
    if "reboot" not in a.done:
        step = _reboot(f, needs, answers)
        if step is not None:
            return step
    rebooted = bool((a.done.get("reboot") or {}).get("rebooted"))

    step = _migrations(f, steps, "after-switch", items, answers)
    if step is not None:
        return step
    if d.policy.confirm != "none" and (d.action != "boot" or rebooted) \
            and "confirm" not in a.done:
        return RunStage("confirm")
    return Finish("succeeded", f"{d.action} to generation {d.generation}", system=d.system,
                  needs_reboot=needs_reboot(a))


def _cancelled(a: ActiveDeployment, reason: str) -> Step:
    return RollBack(reason) if touched(a) else Finish("cancelled", reason)


def _reboot(f: Facts, needs: bool, answers: dict[str, str]) -> Step | None:
    a, d = f.active, f.desired
    before = a.notes.get("reboot_boot_id")
    if before is not None:
        if before == f.boot_id:
            return RollBack(DID_NOT_REBOOT)
        return RunStage("reboot")  # the host rebooted: record how the boot left it
    decision = reboot_decision(d.policy.reboot, needs, f.clock, d.action)
    if decision.action == "now":
        return Reboot()
    if decision.action not in ("ask", "wait"):
        return None
    choice = answers.get(P.REBOOT_KEY)
    if choice == P.REBOOT_NOW:
        return Reboot()
    if choice == P.REBOOT_LATER or a.notes.get("cancel"):
        return None
    if decision.action == "ask":
        return _ask(f, "reboot", [P.reboot_item()], "awaiting_reboot",
                    "the new system needs a reboot: reboot now or later?", needs_reboot=True)
    assert decision.wait_until is not None
    return _ask(f, "reboot", [P.reboot_item(decision.wait_until)], "awaiting_reboot",
                f"reboot window opens at {decision.wait_until:%H:%M}",
                wake_at=decision.wait_until.timestamp(), needs_reboot=True)


def _migrations(f: Facts, steps: StepsFile, phase: str, items: list[ReportItem],
                answers: dict[str, str]) -> Step | None:
    """Run what can run; when only failures are left, resolve them (policy or prompt)."""
    a = f.active
    by_name = steps.by_name()
    graph = plan.phase_graph(steps.steps, phase)
    todo = sorted(n for n in graph if plan.migrations_for(by_name[n], items, answers))
    failed: dict[str, str] = {}
    runnable: set[str] = set()
    for name in todo:
        key = f"step:{name}"
        if key in a.done:
            continue
        note = a.notes.get(f"failed:{name}")
        if key in a.started and (note is not None or not by_name[name].idempotent):
            failed[name] = str(note or INTERRUPTED)
        else:
            runnable.add(name)
    waiting = set().union(*(plan.dependents(graph, n) for n in failed))
    ready = runnable - waiting
    if ready:
        return RunSteps(phase, tuple(sorted(ready)))
    if not failed:
        return None
    return _resolve(f, failed)


def _failure_prompts(a: ActiveDeployment, deployment_id: str) -> list[str]:
    head = f"{deployment_id}.failure"
    ids = [p for p in a.prompts if p.startswith(head) and p[len(head):].isdigit()]
    return sorted(ids, key=lambda p: int(p[len(head):]))


def _resolve(f: Facts, failed: dict[str, str]) -> Step:
    a, d = f.active, f.desired
    reason = "migration failed: " + "; ".join(f"{n}: {m}" for n, m in sorted(failed.items()))
    if a.notes.get("cancel"):
        return RollBack(f"{reason}; {a.notes['cancel']}")
    ids = _failure_prompts(a, d.deployment_id)
    for pid in ids:  # answered, not acted on yet
        if pid in a.closed_prompts and f"resolved:{pid}" not in a.notes:
            got = a.prompt_answers.get(pid, {})
            return _apply({n: got.get(f"{n}.{P.FAILURE_ITEM}", P.ROLLBACK) for n in failed},
                          reason, resolved=pid)
    open_id = next((p for p in ids if p not in a.closed_prompts), None)
    policy = d.policy.on_step_failure
    runs = max(a.step_runs.get(f"step:{n}", 0) for n in failed)
    if policy == "ask" or open_id is not None or (policy == "retry" and runs > 2):
        n = len(ids) + 1 if open_id is None else len(ids)
        return _ask(f, "step_failure",
                    [P.failure_item(name, msg) for name, msg in sorted(failed.items())],
                    "awaiting_choice", reason, n=n)
    return _apply(dict.fromkeys(failed, policy), reason)


def _apply(decisions: dict[str, str], reason: str, resolved: str | None = None) -> Step:
    if P.ROLLBACK in decisions.values():
        return RollBack(reason)
    records: list[tuple[str, dict[str, Any]]] = []
    if resolved is not None:  # first: a crash after it asks again rather than re-applying
        records.append(("note", {"key": f"resolved:{resolved}", "value": True}))
    for name, decision in sorted(decisions.items()):
        if decision == P.SKIP:
            records.append(("end", {"stage": f"step:{name}", "data": {"status": "skipped"}}))
        else:  # retry: forget the failure, run it again
            records.append(("reset", {"stages": [f"step:{name}"], "notes": [f"failed:{name}"]}))
    return Record(tuple(records), "; ".join(f"{n}: {v}" for n, v in sorted(decisions.items())))


def _ask(f: Facts, kind: str, items: list[ReportItem], phase: HostPhase, message: str, *,
         wake_at: float | None = None, needs_reboot: bool = False,
         deferred_until: float | None = None, n: int = 0) -> Step:
    """Open (or keep open) a prompt; past its deadline the policy may take the defaults."""
    a, policy = f.active, f.desired.policy
    pid = P.prompt_id(f.desired.deployment_id, kind, n)
    journaled = a.prompts.get(pid)
    if journaled is not None and kind != "approval":
        prompt = Prompt.model_validate(journaled)
        got = a.prompt_answers.get(pid, {})
        taken = {k: v for k, v in (deadline_outcome(prompt, policy, f.now) or {}).items()
                 if k not in got}
        if taken:
            have = {**got, **taken}
            complete = all(i.key in have for i in prompt.items if i.choices)
            return Record((("answer", {"prompt_id": pid, "choices": taken,
                                       "source": "deadline", "by": "deadline",
                                       "complete": complete}),),
                          f"deadline passed: took defaults {taken}")
        deadline = effective_deadline(prompt, policy) if policy.take_default_on_deadline \
            else None
        if deadline is not None and deadline > f.now:
            wake_at = deadline if wake_at is None else min(wake_at, deadline)
    return Ask(pid, kind, tuple(items), phase, message, wake_at, needs_reboot, deferred_until)
