"""The rollout planner: a pure function of (policy, hosts, results so far, time).

No MQTT, no files: `plan()` looks at HostViews and returns actions for the driver
(start a host, time one out, skip one, wait for an operator, abort, finish). Modeled
on AWS IoT Jobs (rollout rate, abort thresholds, in-progress timeouts, retries) and
hawkBit (canary first group, group success threshold, confirmation between groups).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from controller.view import HostView
from protocol.errors import UsageError

FAILED = {"failed", "rolled_back", "rejected", "timed_out", "blocked", "cancelled"}
COUNT_RE = re.compile(r"^(\d+)(%?)$")


def parse_count(value: str | int | None, name: str) -> tuple[int, bool] | None:
    """'5' -> (5, False), '10%' -> (10, True), None -> None."""
    if value is None:
        return None
    m = COUNT_RE.fullmatch(str(value).strip())
    if not m or (m.group(2) and not 0 < int(m.group(1)) <= 100):
        raise UsageError(f"--{name} must be a number or a percentage like 10%, not {value!r}")
    return int(m.group(1)), bool(m.group(2))


def resolve_count(spec: tuple[int, bool] | None, total: int) -> int | None:
    if spec is None:
        return None
    n, pct = spec
    return max(1, math.ceil(total * n / 100)) if pct else n


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
        parse_count(self.batch, "batch")
        parse_count(self.max_failures, "max-failures")
        for name in ("canary", "min_executed", "retries"):
            if getattr(self, name) < 0:
                raise UsageError(f"--{name.replace('_', '-')} must not be negative")
        if self.max_parallel is not None and self.max_parallel < 1:
            raise UsageError("--max-parallel must be at least 1")
        if self.host_timeout is not None and self.host_timeout <= 0:
            raise UsageError("--host-timeout must be positive")
        if self.offline not in ("wait", "skip"):
            raise UsageError("--offline must be wait or skip")

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
        """Canary first (if any), then batches of `batch` hosts (default: all the rest)."""
        out: list[list[str]] = []
        rest = list(hosts)
        if self.canary:
            out.append(rest[: self.canary])
            rest = rest[self.canary:]
        size = resolve_count(parse_count(self.batch, "batch"), len(hosts)) or len(rest) or 1
        out += [rest[i:i + size] for i in range(0, len(rest), size)]
        return [b for b in out if b]


@dataclass(frozen=True)
class Start:
    host: str
    attempt: int


@dataclass(frozen=True)
class TimeOut:
    host: str


@dataclass(frozen=True)
class Skip:
    host: str
    reason: str


@dataclass(frozen=True)
class AwaitContinue:
    batch: int


@dataclass(frozen=True)
class Abort:
    reason: str


@dataclass(frozen=True)
class Plan:
    """Call `plan` again no later than `at` (a pause or a timeout falls due)."""

    at: float


@dataclass(frozen=True)
class Finish:
    status: Literal["succeeded", "failed", "aborted", "timed_out", "published"]


Action = Start | TimeOut | Skip | AwaitContinue | Abort | Plan | Finish


@dataclass
class RolloutProgress:
    """What the driver remembers between plan() calls (kept in the event log)."""

    aborted: str | None = None
    batch_done_at: dict[int, float] = field(default_factory=dict)
    continued: set[int] = field(default_factory=set)
    attempts: dict[str, int] = field(default_factory=dict)


def _failed(v: HostView) -> bool:
    return v.result in FAILED


def plan(policy: RolloutPolicy, views: list[HostView], batches: list[list[str]], now: float,
         deadline: float, progress: RolloutProgress | None = None) -> list[Action]:
    pr = progress or RolloutProgress()
    by_host = {v.host: v for v in views}
    actions: list[Action] = []
    wake: list[float] = []
    in_flight = [v for v in views if v.deployment_id is not None and v.result is None]

    # Timeouts: per host, then the whole rollout.
    for v in in_flight:
        if now >= deadline or (policy.host_timeout is not None and v.started is not None
                               and now >= v.started + policy.host_timeout):
            actions.append(TimeOut(v.host))
        elif policy.host_timeout is not None and v.started is not None:
            wake.append(v.started + policy.host_timeout)
    timed_out = {a.host for a in actions if isinstance(a, TimeOut)}
    running = [v for v in in_flight if v.host not in timed_out]

    def final_failure(v: HostView) -> bool:
        return (v.host in timed_out or _failed(v)) and pr.attempts.get(v.host, 1) > policy.retries

    # Retries of failed and timed-out hosts (not after an abort or the deadline).
    retry = [v for v in views if (v.host in timed_out or _failed(v))
             and pr.attempts.get(v.host, 1) <= policy.retries and not pr.aborted
             and now < deadline]

    retry_hosts = {v.host for v in retry}

    # Thresholds: canary failure, or too many failures once enough have run.
    executed = [v for v in views if v.deployment_id is not None
                and (v.result is not None or v.host in timed_out) and v.result != "skipped"]
    failures = [v for v in executed if final_failure(v)]
    total = len(views)
    limit = resolve_count(parse_count(policy.max_failures, "max-failures"), total)
    if not pr.aborted:
        canary = batches[0] if policy.canary and batches else []
        if any(final_failure(by_host[h]) for h in canary if h in by_host):
            actions.append(Abort("a canary host failed"))
        elif limit is not None and len(executed) >= policy.min_executed and len(failures) > limit:
            actions.append(Abort(f"{len(failures)} failures exceed the threshold of {limit}"))
    aborting = bool(pr.aborted) or any(isinstance(a, Abort) for a in actions)

    if not aborting and now < deadline:
        for v in retry:
            actions.append(Start(v.host, pr.attempts.get(v.host, 1) + 1))
        # Which batch is open: the first that is not complete.
        slots = (policy.max_parallel or total) - len(running) - len(retry)
        for index, batch in enumerate(batches):
            members = [by_host[h] for h in batch if h in by_host]
            complete = all(m.result is not None and m.host not in timed_out
                           and m.host not in retry_hosts for m in members)
            not_started = [m for m in members if m.deployment_id is None and m.result is None]
            if index > 0 and not_started:
                prev_done = pr.batch_done_at.get(index - 1)
                if prev_done is None:
                    break
                if policy.pause_between_batches and now < prev_done + policy.pause_between_batches:
                    wake.append(prev_done + policy.pause_between_batches)
                    break
                if policy.confirm_batches and index not in pr.continued:
                    actions.append(AwaitContinue(index))
                    break
            for m in not_started:
                if slots <= 0:
                    break
                if policy.offline == "skip" and m.online is False:
                    actions.append(Skip(m.host, "offline"))
                    continue
                actions.append(Start(m.host, 1))
                slots -= 1
            if not complete:
                break

    # Finished?
    starting = any(isinstance(a, Start) for a in actions)
    if not running and not starting and not any(isinstance(a, AwaitContinue) for a in actions):
        blocked = [v for v in views if v.result is None and v.deployment_id is None]
        skipped = {a.host for a in actions if isinstance(a, Skip)}
        if aborting:
            actions.append(Finish("aborted"))
        elif now >= deadline and (timed_out or blocked):
            actions.append(Finish("timed_out"))
        elif not [v for v in blocked if v.host not in skipped]:
            ok = all(v.result == "succeeded" for v in views
                     if v.host not in skipped and v.result != "skipped")
            actions.append(Finish("succeeded" if ok else "failed"))
    if wake:
        actions.append(Plan(min(wake)))
    return actions
