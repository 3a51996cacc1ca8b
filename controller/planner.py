"""The rollout planner: a pure function of (policy, hosts, results so far, time).

No MQTT, no files: `plan()` looks at HostViews and returns actions for the driver
(start a host, time one out, skip one, cancel an unacknowledged one, note that a batch
completed, wait for an operator, abort, finish). Modeled on AWS IoT Jobs (rollout
rate, abort thresholds judged after a minimum of executions, in-progress timeouts,
retries) and hawkBit (canary first group, confirmation between groups).

Rules, in the order `plan()` applies them:

1. Timeouts. Past the rollout deadline every in-flight host times out. Otherwise a host
   times out `host_timeout` seconds after it first reported (`HostView.acked`): a host
   that is offline and queued (published, never heard from) does not time out, and a
   host whose user deferred the deploy ("not now") counts from the end of the deferral.
2. Thresholds. A host's failure is *final* once it has no retry left. Any final failure
   in the canary batch aborts. `max_failures` N aborts when final failures exceed N;
   P% aborts when final failures exceed P% of the executed hosts (succeeded or finally
   failed). Neither is judged before `min_executed` hosts (at least one) executed.
3. Abort. Nothing new starts and nothing is retried; running hosts finish. Hosts that
   were sent a desired state but never acknowledged it are cancelled at once when
   offline, else after `ack_grace` seconds (an online host acks within milliseconds).
4. Starts. Retries first (a new attempt gets a new generation from the driver), then
   the open batch (the first one not complete), both within `max_parallel`. A batch is
   complete when every member has a final outcome (succeeded, skipped, cancelled or a
   failure with no retry left). Batch i > 0 opens only after batch i-1 completed, plus
   `pause_between_batches`, plus (with `confirm_batches`) an operator's continue.
   With `offline = skip`, a host not known to be online when its turn comes is skipped.
5. Finish, when nothing runs, nothing starts and nobody is asked: `aborted`, else
   `timed_out` if the deadline left hosts unfinished, else `succeeded` if every host
   that was not skipped succeeded (and at least one did), else `failed`.

Every call is O(hosts).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from controller.view import HostView
from protocol.errors import UsageError
from protocol.outcomes import NOT_EXECUTED, RETRYABLE, RolloutStatus, rollout_result

COUNT_RE = re.compile(r"^(\d+)(%?)$")
ACK_GRACE = 5.0


def parse_count(value: str | int | None, name: str) -> tuple[int, bool] | None:
    """'5' -> (5, False), '10%' -> (10, True), None -> None."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise UsageError(f"--{name} must be a number or a percentage like 10%, not {value!r}")
    m = COUNT_RE.fullmatch(str(value).strip())
    if not m or (m.group(2) and not 0 < int(m.group(1)) <= 100):
        raise UsageError(f"--{name} must be a number or a percentage like 10%, not {value!r}")
    return int(m.group(1)), bool(m.group(2))


def resolve_count(spec: tuple[int, bool] | None, total: int) -> int | None:
    if spec is None:
        return None
    n, pct = spec
    return max(1, math.ceil(total * n / 100)) if pct else n


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class RolloutPolicy:
    canary: int = 0
    batch: str | None = None
    max_parallel: int | None = None
    max_failures: str | None = None
    min_executed: int = 0
    host_timeout: float | None = None
    retries: int = 0
    pause_between_batches: float = 0.0
    confirm_batches: bool = False
    offline: Literal["wait", "skip"] = "wait"

    def __post_init__(self) -> None:
        batch = parse_count(self.batch, "batch")
        if batch is not None and batch[0] < 1:
            raise UsageError("--batch must be at least 1")
        parse_count(self.max_failures, "max-failures")
        for name in ("canary", "min_executed", "retries"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise UsageError(f"--{name.replace('_', '-')} must be a whole number >= 0, "
                                 f"not {value!r}")
        if self.max_parallel is not None and (not _is_int(self.max_parallel)
                                              or self.max_parallel < 1):
            raise UsageError(f"--max-parallel must be a whole number >= 1, "
                             f"not {self.max_parallel!r}")
        if self.host_timeout is not None and (not _is_number(self.host_timeout)
                                              or self.host_timeout <= 0):
            raise UsageError(f"--host-timeout must be a positive number of seconds, "
                             f"not {self.host_timeout!r}")
        if not _is_number(self.pause_between_batches) or self.pause_between_batches < 0:
            raise UsageError(f"--pause-between-batches must be seconds >= 0, "
                             f"not {self.pause_between_batches!r}")
        if not isinstance(self.confirm_batches, bool):
            raise UsageError("confirm_batches must be true or false")
        if self.offline not in ("wait", "skip"):
            raise UsageError(f"--offline must be wait or skip, not {self.offline!r}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RolloutPolicy:
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise UsageError(f"unknown rollout option(s): {', '.join(sorted(unknown))}")
        return cls(**data)

    def batches(self, hosts: list[str]) -> list[list[str]]:
        """Canary first (if any), then batches of `batch` hosts (default: all the rest).
        A percentage is of all hosts in the rollout."""
        out: list[list[str]] = []
        rest = list(hosts)
        if self.canary:
            out.append(rest[: self.canary])
            rest = rest[self.canary:]
        size = resolve_count(parse_count(self.batch, "batch"), len(hosts)) or len(rest) or 1
        out += [rest[i:i + size] for i in range(0, len(rest), size)]
        return [b for b in out if b]

    def threshold_exceeded(self, failures: int, executed: int) -> bool:
        """Judge the failure threshold (callers check `min_executed` first)."""
        spec = parse_count(self.max_failures, "max-failures")
        if spec is None or executed < max(1, self.min_executed):
            return False
        n, pct = spec
        return failures * 100 > n * executed if pct else failures > n

    def describe_threshold(self) -> str:
        spec = parse_count(self.max_failures, "max-failures")
        if spec is None:
            return "no threshold"
        n, pct = spec
        return f"{n}% of executed hosts" if pct else f"{n} host(s)"


@dataclass(frozen=True)
class Start:
    host: str
    attempt: int


@dataclass(frozen=True)
class TimeOut:
    host: str
    reason: str = "no result before the host timeout"


@dataclass(frozen=True)
class Skip:
    host: str
    reason: str


@dataclass(frozen=True)
class Cancel:
    """The host was sent a desired state but never acknowledged it: withdraw it."""

    host: str
    reason: str


@dataclass(frozen=True)
class BatchDone:
    """Batch `batch` (0-based) is complete; the driver notes the time (for pauses)."""

    batch: int


@dataclass(frozen=True)
class AwaitContinue:
    batch: int


@dataclass(frozen=True)
class Abort:
    reason: str


@dataclass(frozen=True)
class Plan:
    """Call `plan` again no later than `at` (a pause, timeout or grace falls due)."""

    at: float


@dataclass(frozen=True)
class Finish:
    status: RolloutStatus


Action = Start | TimeOut | Skip | Cancel | BatchDone | AwaitContinue | Abort | Plan | Finish


@dataclass
class RolloutProgress:
    """What the driver remembers between plan() calls (kept in the event log)."""

    aborted: str | None = None
    batch_done_at: dict[int, float] = field(default_factory=dict)
    continued: set[int] = field(default_factory=set)
    attempts: dict[str, int] = field(default_factory=dict)


def _clock_start(v: HostView) -> float:
    """A host's in-progress timeout counts from its first report, or from the end of the
    deferral its user chose ("not now"): waiting for that is not being slow."""
    assert v.acked is not None
    return max(v.acked, v.deferred_until or 0.0)


def plan(policy: RolloutPolicy, views: list[HostView], batches: list[list[str]], now: float,
         deadline: float, progress: RolloutProgress | None = None, *,
         ack_grace: float = ACK_GRACE) -> list[Action]:
    pr = progress or RolloutProgress()
    actions: list[Action] = []
    wake: list[float] = []
    past_deadline = now >= deadline
    aborting = pr.aborted is not None
    canary = set(batches[0]) if policy.canary and batches else set()
    attempts, retries, host_timeout = pr.attempts, policy.retries, policy.host_timeout

    # One pass over the hosts: 1. timeouts (the whole rollout, then per host, counted
    # from its first report) and the facts the thresholds need. `result` only holds
    # hosts that have one; `retry` the failed ones with a retry left.
    result: dict[str, str] = {}
    in_flight: list[HostView] = []
    retry: list[HostView] = []
    deadline_hit = False
    executed = failures = 0
    canary_failed: str | None = None
    for v in views:
        res = v.result
        if res is None:
            if v.deployment_id is None:
                continue
            if past_deadline:
                actions.append(TimeOut(v.host, "no result before the rollout deadline"))
                res, deadline_hit = "timed_out", True
            elif host_timeout is not None and v.acked is not None \
                    and now >= _clock_start(v) + host_timeout:
                actions.append(TimeOut(v.host))
                res = "timed_out"
            else:
                if host_timeout is not None and v.acked is not None:
                    wake.append(_clock_start(v) + host_timeout)
                in_flight.append(v)
                continue
        result[v.host] = res
        if res in RETRYABLE and attempts.get(v.host, 1) <= retries:
            retry.append(v)
        elif res not in NOT_EXECUTED:
            executed += 1
            if res != "succeeded":
                failures += 1
                if canary_failed is None and v.host in canary:
                    canary_failed = v.host

    # 2. Thresholds: a final canary failure, or too many final failures.
    if not aborting:
        if canary_failed is not None:
            actions.append(Abort(f"canary host {canary_failed} failed "
                                 f"({result[canary_failed]})"))
            aborting = True
        elif policy.threshold_exceeded(failures, executed):
            actions.append(Abort(f"{failures} of {executed} executed hosts failed, beyond "
                                 f"the threshold of {policy.describe_threshold()}"))
            aborting = True

    # 3. Abort: withdraw what was never acknowledged; running hosts finish.
    running = 0
    for v in in_flight:
        if aborting and v.acked is None:
            if v.online is not True or v.started is None or now >= v.started + ack_grace:
                actions.append(Cancel(v.host, "rollout aborted before the host acknowledged"))
                result[v.host] = "cancelled"
                continue
            wake.append(v.started + ack_grace)
        running += 1

    # 4. Starts: retries, then the open batch, within max_parallel.
    skipped: set[str] = set()
    starting = awaiting = False
    if not aborting and not past_deadline:
        slots = (policy.max_parallel or len(views)) - running
        not_final = {v.host for v in retry}
        for v in retry:
            if slots <= 0:
                break
            actions.append(Start(v.host, attempts.get(v.host, 1) + 1))
            slots -= 1
            starting = True
        by_host = {v.host: v for v in views}
        running_hosts = {v.host for v in in_flight}
        last_done = 0.0
        for index, batch in enumerate(batches):
            if index in pr.batch_done_at:  # seen complete: every member final, for good
                last_done = pr.batch_done_at[index]
                continue
            if all(h in result and h not in not_final for h in batch if h in by_host):
                actions.append(BatchDone(index))
                last_done = now
                continue
            untouched = [by_host[h] for h in batch if h in by_host and h not in result
                         and h not in running_hosts and by_host[h].deployment_id is None]
            fresh = not any(h in result or h in running_hosts for h in batch)
            if index > 0 and fresh:
                if policy.pause_between_batches and now < last_done + policy.pause_between_batches:
                    wake.append(last_done + policy.pause_between_batches)
                    break
                if policy.confirm_batches and index not in pr.continued:
                    actions.append(AwaitContinue(index))
                    awaiting = True
                    break
            for m in untouched:
                if policy.offline == "skip" and m.online is not True:
                    actions.append(Skip(m.host, "offline when its batch started"))
                    skipped.add(m.host)
                    continue
                if slots <= 0:
                    break
                actions.append(Start(m.host, 1))
                starting = True
                slots -= 1
            break

    # 5. Finish?
    if running == 0 and not starting and not awaiting:
        if aborting:
            actions.append(Finish("aborted"))
        else:
            unfinished = any(v.host not in result and v.host not in skipped for v in views)
            if past_deadline and (deadline_hit or unfinished):
                actions.append(Finish("timed_out"))
            elif not unfinished:
                actions.append(Finish(rollout_result(
                    result.get(v.host, "skipped") for v in views)))
    if wake:
        actions.append(Plan(min(wake)))
    return actions
