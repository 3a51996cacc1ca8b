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

`plan()` decides from scratch, O(hosts); the driver keeps a `Planner` (the same
rules over an index updated per host change), whose `plan()` is O(changes).
"""

from __future__ import annotations

import heapq
import math
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from controller.follow.view import HostView
from protocol.errors import UsageError
from protocol.numbers import seconds
from protocol.outcomes import NOT_EXECUTED, RETRYABLE, RolloutStatus, rollout_result_of_counts

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


def _check_seconds(name: str, value: object, zero: bool = False) -> None:
    """A duration as every duration option takes it (`protocol.numbers.seconds`), and a
    number, not a string a TOML file quoted."""
    option = f"--{name.replace('_', '-')}"
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise UsageError(f"{option} must be a number of seconds, not {value!r}")
    try:
        seconds(value, zero=zero)
    except UsageError as exc:
        raise UsageError(f"{option} {exc}") from None


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
        if self.host_timeout is not None:
            _check_seconds("host_timeout", self.host_timeout)
        _check_seconds("pause_between_batches", self.pause_between_batches, zero=True)
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



def _clock_start(v: HostView) -> float:
    """A host's in-progress timeout counts from its first report, or from the end of the
    deferral its user chose ("not now"): waiting for that is not being slow."""
    assert v.acked is not None
    return max(v.acked, v.deferred_until or 0.0)

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


def plan(policy: RolloutPolicy, views: list[HostView], batches: list[list[str]], now: float,
         deadline: float, progress: RolloutProgress | None = None, *,
         ack_grace: float = ACK_GRACE) -> list[Action]:
    """The decision from scratch: a fresh `Planner` over `views`, asked once."""
    return Planner(policy, views, batches, progress).plan(now, deadline, ack_grace=ack_grace)


_UNTOUCHED, _IN_FLIGHT, _RETRY, _FINAL = range(4)


class Planner:
    """The rules above over an index of the hosts, kept current by `update(view)`.

    The index holds, per host, only what the rules read (started or not, result, ack
    time, online) and the counters they need: hosts per class, results by value, final
    failures, per-batch final and touched counts, a heap of host-timeout due times and a
    cursor into the open batch. `plan()` then costs O(what changes this round), not
    O(hosts). The driver calls `update` after every change to a host's view or to
    `progress.attempts` for it; `plan()` itself changes nothing (a TimeOut it returns
    only takes effect once the driver applies it and updates the host), so asking twice
    gives the same answer. `plan(...)` above is this class built from scratch:
    `tests/test_planner.py` checks that a long-lived Planner fed random event sequences
    always answers like a fresh one.
    """

    def __init__(self, policy: RolloutPolicy, views: Iterable[HostView],
                 batches: list[list[str]], progress: RolloutProgress | None = None) -> None:
        self.policy = policy
        self.batches = batches
        self.progress = progress if progress is not None else RolloutProgress()
        self.views: dict[str, HostView] = {}
        self.order: dict[str, int] = {}
        for v in views:
            self.order.setdefault(v.host, len(self.order))
            self.views[v.host] = v
        self.canary = set(batches[0]) if policy.canary and batches else set()
        self.batch_of: dict[str, tuple[int, int]] = {}  # host -> (batch, position in it)
        self.members: list[list[str]] = []
        for index, batch in enumerate(batches):
            members = [h for h in batch if h in self.views and h not in self.batch_of]
            for pos, h in enumerate(members):
                self.batch_of[h] = (index, pos)
            self.members.append(members)
        self.final_in = [0] * len(batches)
        self.touched_in = [0] * len(batches)
        self.cursor = [0] * len(batches)  # members before it are not untouched
        self.first_open = 0  # batches before it are in progress.batch_done_at
        self.key: dict[str, tuple[Any, ...]] = {}
        self.cls: dict[str, int] = {}
        self.untouched = 0
        self.in_flight: set[str] = set()
        self.unacked: set[str] = set()  # in flight, never acknowledged
        self.retry: set[str] = set()
        self.results: Counter[str] = Counter()  # every host with a result, by result
        self.executed = self.failures = 0  # final outcomes only
        self.canary_failed: set[str] = set()
        self.due: list[tuple[float, int, str]] = []  # (acked + host_timeout, order, host)
        self.queued: set[tuple[float, int, str]] = set()  # the entries in `due`
        for v in self.views.values():
            self._add(v)

    # -- the index -------------------------------------------------------------------
    def update(self, view: HostView) -> None:
        """Re-index one host after its view (or its attempt count) changed."""
        host = view.host
        if host not in self.views:
            return
        self.views[host] = view
        if self._key(view) != self.key[host]:
            self._remove(host)
            self._add(view)

    def _key(self, v: HostView) -> tuple[Any, ...]:
        return (v.deployment_id is None, v.result, v.acked, v.started, v.online,
                self.progress.attempts.get(v.host, 1), v.deferred_until)

    def _classify(self, host: str, result: str | None, started: bool) -> int:
        if result is None:
            return _IN_FLIGHT if started else _UNTOUCHED
        if result in RETRYABLE and self.progress.attempts.get(host, 1) <= self.policy.retries:
            return _RETRY
        return _FINAL

    def _add(self, v: HostView) -> None:
        host = v.host
        key = self._key(v)
        self.key[host] = key
        cls = self.cls[host] = self._classify(host, v.result, v.deployment_id is not None)
        self._count(host, cls, v.result, +1)
        if cls == _IN_FLIGHT:
            self.in_flight.add(host)
            if v.acked is None:
                self.unacked.add(host)
            elif self.policy.host_timeout is not None:
                entry = (_clock_start(v) + self.policy.host_timeout, self.order[host], host)
                if entry not in self.queued:  # once per due time, however often re-added
                    self.queued.add(entry)
                    heapq.heappush(self.due, entry)
        elif cls == _UNTOUCHED and host in self.batch_of:
            index, pos = self.batch_of[host]
            self.cursor[index] = min(self.cursor[index], pos)

    def _remove(self, host: str) -> None:
        cls = self.cls[host]
        self._count(host, cls, self.key[host][1], -1)
        if cls == _IN_FLIGHT:
            self.in_flight.discard(host)
            self.unacked.discard(host)  # its heap entry goes stale, dropped when seen

    def _count(self, host: str, cls: int, result: str | None, sign: int) -> None:
        if cls == _UNTOUCHED:
            self.untouched += sign
        if result is not None:
            self.results[result] += sign
        if cls == _RETRY:
            if sign > 0:
                self.retry.add(host)
            else:
                self.retry.discard(host)
        elif cls == _FINAL and result not in NOT_EXECUTED:
            self.executed += sign
            if result != "succeeded":
                self.failures += sign
                if host in self.canary:
                    if sign > 0:
                        self.canary_failed.add(host)
                    else:
                        self.canary_failed.discard(host)
        if host in self.batch_of:
            index = self.batch_of[host][0]
            self.final_in[index] += sign * (cls == _FINAL)
            self.touched_in[index] += sign * (cls != _UNTOUCHED)

    def _timeouts_due(self, now: float) -> tuple[list[str], float | None]:
        """In-flight hosts whose host timeout fell due, and the next due time. Stale heap
        entries (the host moved on) are dropped; due ones stay until the host changes."""
        due: list[tuple[float, int, str]] = []
        wake = None
        while self.due:
            entry = self.due[0]
            at, _, host = entry
            v = self.views[host]
            if host not in self.in_flight or v.acked is None or \
                    _clock_start(v) + (self.policy.host_timeout or 0) != at:
                self.queued.discard(heapq.heappop(self.due))
                continue
            if now < at:
                wake = at
                break
            due.append(heapq.heappop(self.due))
        for entry in due:
            heapq.heappush(self.due, entry)
        return sorted((h for _, _, h in due), key=self.order.__getitem__), wake

    def _by_order(self, hosts: Iterable[str]) -> list[str]:
        return sorted(hosts, key=self.order.__getitem__)

    # -- the decision ----------------------------------------------------------------
    def plan(self, now: float, deadline: float, *, ack_grace: float = ACK_GRACE
             ) -> list[Action]:
        policy, pr = self.policy, self.progress
        actions: list[Action] = []
        wake: list[float] = []
        past_deadline = now >= deadline
        aborting = pr.aborted is not None
        attempts, retries = pr.attempts, policy.retries

        # 1. Timeouts: the whole rollout, then per host (counted from its first report).
        # They hold only for this answer, as overlays on the index.
        if past_deadline:
            timed_out = self._by_order(self.in_flight)
            reason = "no result before the rollout deadline"
        else:
            timed_out, next_due = self._timeouts_due(now)
            reason = TimeOut.reason
            if next_due is not None:
                wake.append(next_due)
        deadline_hit = past_deadline and bool(timed_out)
        executed, failures = self.executed, self.failures
        canary_failed = set(self.canary_failed)
        retry = set(self.retry)
        final_extra: Counter[int] = Counter()
        for h in timed_out:
            actions.append(TimeOut(h, reason))
            if attempts.get(h, 1) <= retries:
                retry.add(h)
                continue
            executed += 1
            failures += 1
            if h in self.canary:
                canary_failed.add(h)
            if h in self.batch_of:
                final_extra[self.batch_of[h][0]] += 1
        gone = set(timed_out)

        # 2. Thresholds: a final canary failure, or too many final failures.
        if not aborting:
            if canary_failed:
                first = min(canary_failed, key=self.order.__getitem__)
                res = "timed_out" if first in gone else self.views[first].result
                actions.append(Abort(f"canary host {first} failed ({res})"))
                aborting = True
            elif policy.threshold_exceeded(failures, executed):
                actions.append(Abort(f"{failures} of {executed} executed hosts failed, beyond "
                                     f"the threshold of {policy.describe_threshold()}"))
                aborting = True

        # 3. Abort: withdraw what was never acknowledged; running hosts finish.
        running = len(self.in_flight) - len(gone)
        if aborting:
            for h in self._by_order(self.unacked - gone):
                v = self.views[h]
                if v.online is not True or v.started is None or now >= v.started + ack_grace:
                    actions.append(Cancel(h, "rollout aborted before the host acknowledged"))
                    running -= 1
                else:
                    wake.append(v.started + ack_grace)

        # 4. Starts: retries, then the open batch, within max_parallel.
        skipped = 0
        starting = awaiting = False
        if not aborting and not past_deadline:
            slots = (policy.max_parallel or len(self.views)) - running
            for h in self._by_order(retry):
                if slots <= 0:
                    break
                actions.append(Start(h, attempts.get(h, 1) + 1))
                slots -= 1
                starting = True
            while self.first_open in pr.batch_done_at:
                self.first_open += 1
            last_done = pr.batch_done_at.get(self.first_open - 1, 0.0)
            for index in range(self.first_open, len(self.batches)):
                if index in pr.batch_done_at:  # seen complete: every member final, for good
                    last_done = pr.batch_done_at[index]
                    continue
                if self.final_in[index] + final_extra[index] == len(self.members[index]):
                    actions.append(BatchDone(index))
                    last_done = now
                    continue
                if index > 0 and self.touched_in[index] == 0:  # fresh
                    pause = policy.pause_between_batches
                    if pause and now < last_done + pause:
                        wake.append(last_done + pause)
                        break
                    if policy.confirm_batches and index not in pr.continued:
                        actions.append(AwaitContinue(index))
                        awaiting = True
                        break
                members, cls = self.members[index], self.cls
                pos = self.cursor[index]
                while pos < len(members) and cls[members[pos]] != _UNTOUCHED:
                    pos += 1
                self.cursor[index] = pos
                for h in members[pos:]:
                    if cls[h] != _UNTOUCHED:
                        continue
                    if policy.offline == "skip" and self.views[h].online is not True:
                        actions.append(Skip(h, "offline when its batch started"))
                        skipped += 1
                        continue
                    if slots <= 0:
                        break
                    actions.append(Start(h, 1))
                    starting = True
                    slots -= 1
                break

        # 5. Finish?
        if running == 0 and not starting and not awaiting:
            if aborting:
                actions.append(Finish("aborted"))
            else:
                unfinished = self.untouched - skipped > 0
                if past_deadline and (deadline_hit or unfinished):
                    actions.append(Finish("timed_out"))
                elif not unfinished:
                    actions.append(Finish(self._verdict(len(gone))))
        if wake:
            actions.append(Plan(min(wake)))
        return actions

    def _verdict(self, timed_out: int) -> RolloutStatus:
        """`rollout_result` over every host's result plus this round's timeouts."""
        return rollout_result_of_counts(self.results + Counter(timed_out=timed_out))
