"""The controller's live view of hosts in a rollout, folded from agent messages.

Pure: `fold_event` and `fold_state` take a message model and update a HostView.
Both the deploy driver and `fleetctl watch` use it.

Times: `started` is when the controller published the desired state, `acked` when the
controller first heard from the host about this deployment (its in-progress timeout
counts from there, so a host that is offline and queued does not time out), both on
the controller's clock; `finished` is the agent's clock.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from controller.state.logs import rollout_of
from protocol.models import (
    Ack,
    CheckReport,
    Desired,
    Event,
    HostState,
    Progress,
    Rejected,
    ReportItem,
    Result,
    carried_lines,
)
from protocol.outcomes import result_of_phase


@dataclass
class HostView:
    host: str
    deployment_id: str | None = None
    generation: int = 0
    phase: str = "pending"
    stage: str | None = None
    step: str | None = None
    percent: float | None = None
    message: str = ""
    started: float | None = None
    acked: float | None = None
    finished: float | None = None
    result: str | None = None
    system: str | None = None
    needs_reboot: bool = False
    deferred_until: float | None = None
    """The host's user deferred the deploy until then: its host timeout counts from it."""
    online: bool | None = None
    last_seq: int = -1
    log_tail: list[str] = field(default_factory=list)
    check_items: list[ReportItem] = field(default_factory=list)
    open_choices: list[str] = field(default_factory=list)
    checked: bool = False
    prompt_id: str | None = None  # the open prompt this host waits on, if any
    prompt_kind: str | None = None

    @property
    def done(self) -> bool:
        return self.result is not None

    def elapsed(self, now: float | None = None) -> float:
        if self.started is None:
            return 0.0
        return (self.finished or now or time.time()) - self.started


def _defer(view: HostView, until: float | None, received: float | None) -> None:
    """A deferral that ended early (approved now) ended now: the host timeout counts on
    from then, not from the first report."""
    if until is None and view.deferred_until is not None:
        now = received if received is not None else time.time()
        view.deferred_until = min(view.deferred_until, now)
    elif until is not None:
        view.deferred_until = until


def fold_event(view: HostView, ev: Event, received: float | None = None) -> bool:
    """Apply one event for this host's current deployment; False if it is not ours."""
    if ev.deployment_id != view.deployment_id or view.deployment_id is None:
        return False
    if view.acked is None:
        view.acked = received if received is not None else time.time()
    if ev.seq <= view.last_seq and not isinstance(ev, Result):
        return True  # duplicate (QoS1 redelivery) or out of order
    view.last_seq = max(view.last_seq, ev.seq)
    if view.done:
        return True
    lines, _ = carried_lines(ev)  # programs' output, riding on Log, Progress or Result
    texts = [f"{ln.source}: {ln.text}" if ln.source else ln.text for ln in lines
             if ln.stream != "agent"]
    if texts:
        view.log_tail = [*view.log_tail, *texts][-10:]
    if isinstance(ev, Ack):
        view.phase = "acked"
    elif isinstance(ev, Progress):
        view.phase = ev.stage
        view.prompt_id, view.prompt_kind = ev.prompt_id, ev.prompt_kind
        view.stage, view.step = ev.stage, ev.step
        _defer(view, ev.deferred_until, received)
        if ev.percent is not None:
            view.percent = ev.percent
        if ev.message:
            view.message = ev.message
            view.log_tail = [*view.log_tail[-9:], ev.message]
    elif isinstance(ev, CheckReport):
        view.check_items, view.open_choices = list(ev.items), list(ev.open_choices)
        view.checked = True
    elif isinstance(ev, Result):
        view.result, view.message, view.system = ev.status, ev.message, ev.system
        view.needs_reboot = ev.needs_reboot
        view.phase, view.finished, view.percent = ev.status, ev.time, 100.0
        view.prompt_id = view.prompt_kind = None
        if ev.log_tail:
            view.log_tail = list(ev.log_tail[-10:])
    elif isinstance(ev, Rejected):
        view.result, view.message, view.phase = "rejected", f"{ev.reason}: {ev.message}", \
            "rejected"
        view.finished = ev.time
    return True


def superseded_note(deployment_id: str, generation: int) -> str:
    return f"superseded by deployment {deployment_id} (generation {generation})"


def fold_superseded(view: HostView, deployment_id: str | None, generation: int,
                    at: float | None = None) -> bool:
    """A newer deployment of another rollout took the host (its retained state or desired
    state says so): the agent runs the latest desired state only, so ours will never
    report; the host ends `cancelled` in our rollout, as `rollout resume` decides. A
    newer attempt of our own rollout is announced by its log or desired state instead."""
    if (view.deployment_id is None or view.done or deployment_id is None
            or generation <= view.generation
            or rollout_of(deployment_id) == rollout_of(view.deployment_id)):
        return False
    view.result = view.phase = "cancelled"
    view.message = superseded_note(deployment_id, generation)
    view.prompt_id = view.prompt_kind = None
    view.finished = at if at is not None else time.time()
    return True


def seen_generation(body: HostState | Desired) -> int:
    """The highest generation a host's retained message says the host has seen: a
    Desired's own; a HostState's installed and desired ones (a check that finished
    reports the desired generation of the deploy before it again, so only the retained
    Desired tells the check's)."""
    if isinstance(body, Desired):
        return body.generation
    return max(body.generation, body.desired_generation)


def fold_state(view: HostView, st: HostState, received: float | None = None) -> bool:
    """Catch up from a retained HostState (we may have missed the events)."""
    if fold_superseded(view, st.deployment_id, st.desired_generation, st.updated_at):
        return True
    rej = st.rejected
    if (rej is not None and view.deployment_id is not None and not view.done
            and rej.deployment_id == view.deployment_id and rej.generation == view.generation):
        view.result, view.phase = "rejected", "rejected"
        view.message, view.finished = f"{rej.reason}: {rej.message}", st.updated_at
        return True
    if view.deployment_id is None or st.deployment_id != view.deployment_id:
        return False
    if view.done:
        return True
    if view.acked is None and st.phase != "idle":
        view.acked = received if received is not None else time.time()
    if result_of_phase(st.phase) is not None and st.last_result is not None:
        view.result = st.last_result
        view.phase, view.message, view.system = st.last_result, st.message, st.system
        view.needs_reboot, view.finished = st.needs_reboot, st.updated_at
    elif st.phase not in ("idle",):
        view.phase = st.phase
        _defer(view, st.deferred_until, received)
        view.prompt_id = st.open_prompt
        view.prompt_kind = None if st.open_prompt is None else (
            "approval" if st.phase == "awaiting_approval" else
            view.prompt_kind if view.prompt_kind not in (None, "approval") else "choice")
        view.percent = st.percent if st.percent is not None else view.percent
        view.step = st.step
    return True
