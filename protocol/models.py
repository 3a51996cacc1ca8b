"""The wire schema: every message on a Flotilla topic is one of these models.

Each model names its envelope `type` in `TYPE`; the codec refuses anything else.
Event models (sent by an agent on its `events` topic) carry the deployment id,
generation and a per-host sequence number so the controller can order and dedupe.
"""

from __future__ import annotations

import re
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from protocol.numbers import MAX_SECONDS
from protocol.outcomes import ResultStatus as ResultStatus  # the vocabulary lives there
from protocol.topics import HOST_NAME_RE

Action = Literal["switch", "boot", "test", "dry-activate"]
Severity = Literal["error", "warning", "recommendation"]
Stage = Literal[
    "fetch", "check", "choose", "approve", "dump", "migrate", "switch", "reboot", "confirm",
    "rollback",
]
HostPhase = Literal[
    "idle", "received", "acked", "fetched", "checked", "awaiting_choice", "awaiting_approval",
    "dumped", "migrating", "switched", "migrated", "awaiting_reboot", "confirmed", "done", "failed",
    "rolling_back", "rolled_back", "rejected", "cancelled", "blocked",
]
WAITING_PHASES: frozenset[str] = frozenset({"awaiting_choice", "awaiting_approval",
                                           "awaiting_reboot"})
"""Phases in which a deployment waits for someone (an answer) or something (a reboot)."""
PromptKind = Literal["choice", "step_failure", "approval", "reboot"]
Host = Annotated[str, Field(pattern=HOST_NAME_RE.pattern)]
Id = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:@-]+$")]
MAX_GENERATION = 2**53 - 1
"""The largest generation (and event sequence number) on the wire: above it a JSON
reader (the web page, Home Assistant) loses precision, and msgpack ends at 2**64."""
Generation = Annotated[int, Field(ge=0, le=MAX_GENERATION)]
HHMM = r"([01]\d|2[0-3]):[0-5]\d"
REBOOT_POLICY_RE = re.compile(rf"^(never|ask|now|window {HHMM}-{HHMM})$")


class Model(BaseModel):
    """Strict base: unknown keys are refused so typos never pass silently, and so are
    non-finite numbers (msgpack carries NaN and infinities; an infinite timeout or an
    expiry at NaN would make an agent wait for ever or never expire)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    TYPE: ClassVar[str] = ""


class Choice(Model):
    id: Id
    label: str = ""
    description: str = ""
    destructive: bool = False


class DeployPolicy(Model):
    """How the agent decides on its own when nobody answers or something fails."""

    prompt_deadline_s: float | None = Field(default=None, gt=0, le=MAX_SECONDS)
    take_default_on_deadline: bool = False
    on_step_failure: Literal["ask", "retry", "skip", "rollback"] = "ask"
    reboot: str = "never"
    confirm: Literal["broker", "controller", "none"] = "broker"
    confirm_timeout_s: float = Field(default=60.0, gt=0, le=MAX_SECONDS)
    approval: Literal["none", "ask"] = "none"
    max_parallel_steps: int = Field(default=4, ge=1, le=64)

    @field_validator("reboot")
    @classmethod
    def _reboot(cls, v: str) -> str:
        if not REBOOT_POLICY_RE.fullmatch(v):
            raise ValueError("reboot policy must be never, ask, now or 'window HH:MM-HH:MM'")
        return v


NIX_PUBLIC_KEY_RE = re.compile(r"^[A-Za-z0-9._+-]{1,128}:[A-Za-z0-9+/]{43}=$")


class BinaryCache(Model):
    """The binary cache a host fetches its closure from, and the one key (Nix's
    `name:base64`) the closure must be signed with. Carried in the signed Desired, so a
    host substitutes only from the cache the controller named."""

    url: str = Field(min_length=1, max_length=2048, pattern=r"^[A-Za-z][A-Za-z0-9+.-]*://\S+$")
    public_key: str = Field(pattern=NIX_PUBLIC_KEY_RE.pattern)


class Desired(Model):
    """What the controller wants a host to run; signed, retained on `desired`."""

    TYPE: ClassVar[str] = "desired"
    host: Host
    deployment_id: Id
    rollout_id: Id | None = None
    generation: int = Field(ge=1, le=MAX_GENERATION)
    system: str = Field(min_length=1, max_length=4096)
    action: Action = "switch"
    issued_at: float
    expires_at: float | None = None
    check_only: bool = False
    rollback: bool = False
    choices: dict[str, Id] = Field(default_factory=dict)
    policy: DeployPolicy = Field(default_factory=DeployPolicy)
    cache: BinaryCache | None = None
    install_bootloader: bool = False
    key_id: str = ""
    signature: bytes = b""


class Answer(Model):
    """A person's (or policy's) choices for an open prompt; signed."""

    TYPE: ClassVar[str] = "answer"
    host: Host
    prompt_id: Id
    choices: dict[str, Id] = Field(default_factory=dict)
    approve: bool = False
    answered_by: str = Field(default="", max_length=256)
    issued_at: float
    key_id: str = ""
    signature: bytes = b""


class Cancel(Model):
    """`fleetctl cancel`: withdraw a desired state and end the wait of a deployment (for an
    approval, a choice or a reboot); signed like an answer, sent on the answer topic.
    Without `deployment_id` it cancels whatever this host has in flight."""

    TYPE: ClassVar[str] = "cancel"
    host: Host
    deployment_id: Id | None = None
    reason: str = Field(default="", max_length=500)
    cancelled_by: str = Field(default="", max_length=256)
    issued_at: float
    key_id: str = ""
    signature: bytes = b""


LogStream = Literal["stdout", "stderr", "agent"]
MAX_LOG_LINE = 2000
MAX_LOG_BATCH = 500


class LogLine(Model):
    """One line a program (or the agent itself) printed during a deployment."""

    time: float
    stream: LogStream = "stdout"
    source: str = Field(default="", max_length=128)
    text: str = Field(max_length=MAX_LOG_LINE)


class Event(Model):
    host: Host
    deployment_id: Id | None = None
    generation: Generation = 0
    seq: int = Field(default=0, ge=0, le=MAX_GENERATION)
    time: float


class Ack(Event):
    TYPE: ClassVar[str] = "ack"


class Rejected(Event):
    """A desired state (or answer) the agent refused. When its signature did not verify,
    `deployment_id` and `generation` are still those its body claims, so the controller
    can count that host as rejected at once; `unverified` says they are only claims."""

    TYPE: ClassVar[str] = "rejected"
    reason: str
    message: str
    unverified: bool = False


class Progress(Event):
    """Where a deployment is. It also carries the output lines held since the previous
    event (`lines`, `dropped`: see Log), so a slow deployment sends one message a
    second, not two."""

    TYPE: ClassVar[str] = "progress"
    stage: Stage
    message: str = ""
    percent: float | None = Field(default=None, ge=0, le=100)
    step: str | None = None
    # Set while the deployment waits for an answer to this prompt (who answers how).
    prompt_id: Id | None = None
    prompt_kind: PromptKind | None = None
    deferred_until: float | None = None
    """Set while the host's user deferred the deploy ("not now") until then."""
    lines: list[LogLine] = Field(default_factory=list, max_length=MAX_LOG_BATCH)
    dropped: int = Field(default=0, ge=0)


class ReportItem(Model):
    step: str
    id: str
    severity: Severity
    message: str
    choices: list[Choice] = Field(default_factory=list)
    default: str | None = None

    @property
    def key(self) -> str:
        return f"{self.step}.{self.id}"


class CheckReport(Event):
    TYPE: ClassVar[str] = "check_report"
    items: list[ReportItem] = Field(default_factory=list)
    open_choices: list[str] = Field(default_factory=list)
    check_only: bool = False


class Result(Event):
    """How a deployment ended; `lines`/`dropped` are its last output lines not sent yet
    (see Log), `log_tail` the last lines of all, for a quick look."""

    TYPE: ClassVar[str] = "result"
    status: ResultStatus
    message: str = ""
    system: str | None = None
    needs_reboot: bool = False
    log_tail: list[str] = Field(default_factory=list)
    lines: list[LogLine] = Field(default_factory=list, max_length=MAX_LOG_BATCH)
    dropped: int = Field(default=0, ge=0)


class Log(Event):
    """A batch of output lines; `dropped` counts lines the agent left out of its events
    (rate bound) since the previous batch: its local log file still has them. Lines
    ride on a Progress or Result that goes out anyway; a Log is sent only when none
    does (`carried_lines` reads them from any of the three)."""

    TYPE: ClassVar[str] = "log"
    lines: list[LogLine] = Field(default_factory=list, max_length=MAX_LOG_BATCH)
    dropped: int = Field(default=0, ge=0)


def carried_lines(ev: Event) -> tuple[list[LogLine], int]:
    """The output lines (and the count left out) an event carries."""
    if isinstance(ev, Log | Progress | Result):
        return ev.lines, ev.dropped
    return [], 0


class Prompt(Model):
    """Open question for a person; retained on `prompt` until answered."""

    TYPE: ClassVar[str] = "prompt"
    host: Host
    prompt_id: Id
    deployment_id: Id
    generation: Generation
    kind: PromptKind = "choice"
    items: list[ReportItem] = Field(default_factory=list)
    created_at: float
    deadline: float | None = None


class RejectNote(Model):
    """The last desired state this host refused, kept in the retained HostState so a
    controller that missed the event (shared subscription, overflowed queue) learns it."""

    deployment_id: Id
    generation: Generation
    reason: str
    message: str = ""


class HostState(Model):
    """What an agent reports about its host; retained on `state`."""

    TYPE: ClassVar[str] = "host_state"
    host: Host
    system: str | None = None
    generation: Generation = 0
    phase: HostPhase = "idle"
    deployment_id: Id | None = None
    rollout_id: Id | None = None
    desired_generation: Generation = 0
    last_result: ResultStatus | None = None
    message: str = ""
    needs_reboot: bool = False
    percent: float | None = None
    step: str | None = None
    open_prompt: str | None = None
    deferred_until: float | None = None
    """The host's user said "not now": the deployment proceeds by itself at this time."""
    rejected: RejectNote | None = None
    updated_at: float


class Confirm(Model):
    """Round-trip token proving the agent still reaches the broker after a switch."""

    TYPE: ClassVar[str] = "confirm"
    host: Host
    generation: Generation
    nonce: str
    source: Literal["agent", "controller"] = "agent"
    key_id: str = ""
    signature: bytes = b""


EVENT_TYPES: tuple[type[Event], ...] = (Ack, Rejected, Progress, CheckReport, Result, Log)
ALL_TYPES: tuple[type[Model], ...] = (
    Desired, Answer, Cancel, Prompt, HostState, Confirm, *EVENT_TYPES,
)
