"""The pure rollout planner: one table of single `plan()` calls, then whole rollouts
simulated step by step (hypothesis) against invariants."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller.follow.view import HostView
from controller.rollout.planner import (
    ACK_GRACE,
    Abort,
    Action,
    AwaitContinue,
    BatchDone,
    Cancel,
    Finish,
    Plan,
    Planner,
    RolloutPolicy,
    RolloutProgress,
    Skip,
    Start,
    TimeOut,
    plan,
)
from protocol.errors import UsageError

NOW = 1000.0
DEADLINE = 5000.0
HOST_TO = "no result before the host timeout"
DEADLINE_TO = "no result before the rollout deadline"


def hv(i: int, state: str) -> HostView:
    """Host h<i> in a state named by a token:
    -        not started, online          off   not started, offline
    ?        not started, never seen      run   running (acked 9 s ago)
    new      running, acked 2 s ago       queued  published 100 s ago, offline, no ack
    unacked  published 1 s ago, online, no ack   stale  published 10 s ago, online, no ack
    ok fail to rb rej skip cancelled     finished with that result
    """
    h = f"h{i}"
    dep = "R"
    base: dict[str, Any] = {"online": True}
    if state == "-":
        return HostView(h, **base)
    if state == "off":
        return HostView(h, online=False)
    if state == "?":
        return HostView(h, online=None)
    if state == "run":
        return HostView(h, deployment_id=dep, started=NOW - 10, acked=NOW - 9, phase="fetch",
                        **base)
    if state in ("deferred", "undeferred"):  # acked 9 s ago; the user said "not now"
        until = NOW + 100 if state == "deferred" else NOW - 2
        return HostView(h, deployment_id=dep, started=NOW - 10, acked=NOW - 9,
                        phase="awaiting_approval", deferred_until=until, **base)
    if state == "new":
        return HostView(h, deployment_id=dep, started=NOW - 3, acked=NOW - 2, phase="acked",
                        **base)
    if state == "queued":
        return HostView(h, deployment_id=dep, started=NOW - 100, phase="published",
                        online=False)
    if state == "unacked":
        return HostView(h, deployment_id=dep, started=NOW - 1, phase="published", **base)
    if state == "stale":
        return HostView(h, deployment_id=dep, started=NOW - 10, phase="published", **base)
    result = {"ok": "succeeded", "fail": "failed", "to": "timed_out", "rb": "rolled_back",
              "rej": "rejected", "cancelled": "cancelled"}.get(state)
    if state == "skip":
        return HostView(h, result="skipped", phase="skipped", **base)
    assert result is not None, state
    return HostView(h, deployment_id=dep, started=NOW - 20, acked=NOW - 19, finished=NOW - 5,
                    result=result, phase=result, **base)


def views(states: str) -> list[HostView]:
    return [hv(i, s) for i, s in enumerate(states.split())]


def run_plan(policy: dict[str, Any], states: str, now: float = NOW,
             progress: dict[str, Any] | None = None) -> list[Action]:
    vs = views(states)
    pol = RolloutPolicy(**policy)
    pr = RolloutProgress(**(progress or {}))
    if vs and "attempts" not in (progress or {}):
        pr.attempts = {v.host: 1 for v in vs if v.deployment_id is not None}
    return plan(pol, vs, pol.batches([v.host for v in vs]), now, DEADLINE, pr)


def S(i: int, attempt: int = 1) -> Start:
    return Start(f"h{i}", attempt)


CANARY_ABORT = "canary host h0 failed (failed)"

CASES: list[tuple[str, dict[str, Any], str, dict[str, Any], float, list[Action]]] = [
    # -- no policy: everything at once, then the verdict -----------------------------
    ("all start at once", {}, "- - - -", {}, NOW, [S(0), S(1), S(2), S(3)]),
    ("running: nothing to do", {}, "run run ok", {}, NOW, []),
    ("all succeeded", {}, "ok ok ok", {}, NOW, [BatchDone(0), Finish("succeeded")]),
    ("a failure fails the rollout", {}, "ok fail rb", {}, NOW,
     [BatchDone(0), Finish("failed")]),
    ("batch already noted", {}, "ok ok", {"batch_done_at": {0: NOW - 1}}, NOW,
     [Finish("succeeded")]),
    # -- canary ----------------------------------------------------------------------
    ("canary starts alone", {"canary": 1, "batch": "2"}, "- - - - -", {}, NOW, [S(0)]),
    ("canary running holds the rest", {"canary": 2}, "ok run - -", {}, NOW, []),
    ("canary success opens batch 1", {"canary": 1, "batch": "2"}, "ok - - - -", {}, NOW,
     [BatchDone(0), S(1), S(2)]),
    ("canary failure stops all, running canary finishes", {"canary": 2}, "fail run - - -",
     {}, NOW, [Abort(CANARY_ABORT)]),
    ("canary failure: aborted once the canary is done", {"canary": 2}, "fail ok - - -",
     {"aborted": CANARY_ABORT}, NOW, [Finish("aborted")]),
    ("canary failure with a retry left is retried, not fatal",
     {"canary": 2, "retries": 1}, "fail run - -", {}, NOW, [S(0, 2)]),
    ("canary failure after its last retry aborts", {"canary": 1, "retries": 1},
     "fail - -", {"attempts": {"h0": 2}}, NOW, [Abort(CANARY_ABORT), Finish("aborted")]),
    ("canary timeout counts as failure", {"canary": 1, "host_timeout": 5}, "run - -", {},
     NOW, [TimeOut("h0", HOST_TO), Abort("canary host h0 failed (timed_out)"),
           Finish("aborted")]),
    # -- batch sizes -----------------------------------------------------------------
    ("batch N", {"batch": "2"}, "- - - - -", {}, NOW, [S(0), S(1)]),
    ("batch P% of all hosts, rounded up", {"batch": "40%"}, "- - - - -", {}, NOW,
     [S(0), S(1)]),
    ("batch 50% of 5 is 3", {"batch": "50%"}, "- - - - -", {}, NOW, [S(0), S(1), S(2)]),
    ("batch incomplete holds the next", {"batch": "2"}, "ok run - - -", {}, NOW, []),
    ("batch complete (with a final failure) opens the next", {"batch": "2"},
     "ok fail - - -", {}, NOW, [BatchDone(0), S(2), S(3)]),
    ("last batch partial", {"batch": "2"}, "ok ok ok ok -", {"batch_done_at": {0: 1, 1: 2}},
     NOW, [S(4)]),
    # -- max_parallel ----------------------------------------------------------------
    ("max_parallel caps the first starts", {"max_parallel": 2}, "- - - - -", {}, NOW,
     [S(0), S(1)]),
    ("max_parallel refills one slot", {"max_parallel": 2}, "ok run - - -", {}, NOW, [S(2)]),
    ("max_parallel inside a batch", {"batch": "3", "max_parallel": 2}, "ok run - - - -", {},
     NOW, [S(2)]),
    ("max_parallel counts queued offline hosts", {"max_parallel": 2}, "queued run - -", {},
     NOW, []),
    ("max_parallel applies to retries too", {"max_parallel": 1, "retries": 1},
     "fail run -", {}, NOW, []),
    # -- failure thresholds ----------------------------------------------------------
    ("threshold not judged before min_executed", {"batch": "4", "max_failures": "1",
                                                  "min_executed": 4},
     "fail fail ok run - -", {}, NOW, []),
    ("threshold judged at min_executed: abort", {"batch": "4", "max_failures": "1",
                                                 "min_executed": 4},
     "fail fail ok ok - -", {}, NOW,
     [Abort("2 of 4 executed hosts failed, beyond the threshold of 1 host(s)"),
      Finish("aborted")]),
    ("at the threshold is not beyond it", {"batch": "4", "max_failures": "1"},
     "fail ok ok ok - -", {}, NOW, [BatchDone(0), S(4), S(5)]),
    ("abort lets running hosts finish", {"max_failures": "0"}, "fail run run", {}, NOW,
     [Abort("1 of 1 executed hosts failed, beyond the threshold of 0 host(s)")]),
    ("percentage of executed: 1 of 4 is not beyond 25%",
     {"max_parallel": 5, "max_failures": "25%", "min_executed": 4}, "fail ok ok ok run -",
     {}, NOW, [S(5)]),
    ("percentage of executed: 2 of 4 is beyond 25%",
     {"max_parallel": 5, "max_failures": "25%", "min_executed": 4}, "fail fail ok ok run -",
     {}, NOW, [Abort("2 of 4 executed hosts failed, beyond the threshold of 25% of "
                     "executed hosts")]),
    ("failures with a retry left do not count", {"max_failures": "0", "retries": 1},
     "fail ok -", {"attempts": {"h0": 1, "h1": 1}}, NOW, [S(0, 2), S(2)]),
    ("skipped and cancelled are not executed", {"max_failures": "0", "offline": "skip"},
     "skip ok", {}, NOW, [BatchDone(0), Finish("succeeded")]),
    # -- abort -----------------------------------------------------------------------
    ("aborted: unstarted hosts stay untouched, running ones finish", {"batch": "2"},
     "fail run - - -", {"aborted": "x"}, NOW, []),
    ("aborted: finish when nothing runs", {"batch": "2"}, "fail ok - - -",
     {"aborted": "x"}, NOW, [Finish("aborted")]),
    ("aborted: no retries", {"retries": 3}, "fail ok", {"aborted": "x"}, NOW,
     [Finish("aborted")]),
    ("aborted: cancel hosts that never acked (offline, or online past the grace)", {},
     "run stale queued -", {"aborted": "x"}, NOW,
     [Cancel("h1", "rollout aborted before the host acknowledged"),
      Cancel("h2", "rollout aborted before the host acknowledged")]),
    ("aborted: an online host gets a grace to ack", {}, "unacked ok", {"aborted": "x"}, NOW,
     [Plan(NOW - 1 + ACK_GRACE)]),
    # -- retries ---------------------------------------------------------------------
    ("retry a failed host (attempt 2)", {"retries": 2}, "fail ok", {}, NOW, [S(0, 2)]),
    ("retry again (attempt 3)", {"retries": 2}, "fail ok", {"attempts": {"h0": 2, "h1": 1}},
     NOW, [S(0, 3)]),
    ("no retry left: final", {"retries": 2}, "fail ok", {"attempts": {"h0": 3, "h1": 1}},
     NOW, [BatchDone(0), Finish("failed")]),
    ("retry a timed-out host", {"retries": 1}, "to ok", {}, NOW, [S(0, 2)]),
    ("retry a rolled-back host", {"retries": 1}, "rb ok", {}, NOW, [S(0, 2)]),
    ("a rejection is not retried", {"retries": 1}, "rej ok", {}, NOW,
     [BatchDone(0), Finish("failed")]),
    ("a batch waits for its retries", {"batch": "2", "retries": 1}, "fail ok - -", {}, NOW,
     [S(0, 2)]),
    # -- host timeout ----------------------------------------------------------------
    ("host timeout", {"host_timeout": 5}, "run ok", {}, NOW,
     [TimeOut("h0", HOST_TO), BatchDone(0), Finish("failed")]),
    ("host timeout then retry in the same round", {"host_timeout": 5, "retries": 1},
     "run ok", {}, NOW, [TimeOut("h0", HOST_TO), S(0, 2)]),
    ("host timeout not yet: wake up when due", {"host_timeout": 5}, "new ok", {}, NOW,
     [Plan(NOW - 2 + 5)]),
    ("a deferred host does not time out while deferred", {"host_timeout": 5}, "deferred ok",
     {}, NOW, [Plan(NOW + 105)]),
    ("after its deferral the host timeout counts from its end", {"host_timeout": 5},
     "undeferred ok", {}, NOW, [Plan(NOW + 3)]),
    ("a queued (never acked) host does not time out", {"host_timeout": 5}, "queued ok", {},
     NOW, []),
    # -- rollout deadline ------------------------------------------------------------
    ("deadline times out running and queued hosts", {"batch": "3"}, "run queued ok -", {},
     DEADLINE, [TimeOut("h0", DEADLINE_TO), TimeOut("h1", DEADLINE_TO),
                Finish("timed_out")]),
    ("deadline with unstarted hosts left", {"batch": "1"}, "ok - -",
     {"batch_done_at": {0: 1}}, DEADLINE, [Finish("timed_out")]),
    ("deadline: no retries", {"retries": 2}, "fail ok", {}, DEADLINE, [Finish("failed")]),
    ("deadline after everything finished", {}, "ok ok", {"batch_done_at": {0: 1}},
     DEADLINE + 1, [Finish("succeeded")]),
    # -- offline hosts ---------------------------------------------------------------
    ("offline wait: started (queued via retained), not failed", {}, "off - ?", {}, NOW,
     [S(0), S(1), S(2)]),
    ("offline wait: queued hosts are pending", {}, "queued ok", {}, NOW, []),
    ("offline skip: skipped when the batch opens", {"offline": "skip"}, "off - ?", {}, NOW,
     [Skip("h0", "offline when its batch started"), S(1),
      Skip("h2", "offline when its batch started")]),
    ("offline skip: only the open batch", {"offline": "skip", "batch": "2"}, "- off off -",
     {}, NOW, [S(0), Skip("h1", "offline when its batch started")]),
    ("offline skip: a rollout of skipped + ok succeeds", {"offline": "skip"}, "skip ok", {},
     NOW, [BatchDone(0), Finish("succeeded")]),
    ("offline skip: all skipped is not a success", {"offline": "skip"}, "skip skip", {},
     NOW, [BatchDone(0), Finish("failed")]),
    # -- pause between batches -------------------------------------------------------
    ("pause: batch just done, wake after the pause", {"batch": "1",
                                                      "pause_between_batches": 30},
     "ok - -", {}, NOW, [BatchDone(0), Plan(NOW + 30)]),
    ("pause: still pausing", {"batch": "1", "pause_between_batches": 30}, "ok - -",
     {"batch_done_at": {0: NOW - 10}}, NOW, [Plan(NOW + 20)]),
    ("pause: over, next batch starts", {"batch": "1", "pause_between_batches": 30},
     "ok - -", {"batch_done_at": {0: NOW - 31}}, NOW, [S(1)]),
    ("pause: not before the first batch", {"batch": "1", "pause_between_batches": 30},
     "- -", {}, NOW, [S(0)]),
    # -- confirm batches -------------------------------------------------------------
    ("confirm: first batch needs no confirmation", {"batch": "1", "confirm_batches": True},
     "- -", {}, NOW, [S(0)]),
    ("confirm: ask before batch 2", {"batch": "1", "confirm_batches": True}, "ok - -", {},
     NOW, [BatchDone(0), AwaitContinue(1)]),
    ("confirm: continued", {"batch": "1", "confirm_batches": True}, "ok - -",
     {"batch_done_at": {0: 1}, "continued": {1}}, NOW, [S(1)]),
    ("confirm: each batch asks", {"batch": "1", "confirm_batches": True}, "ok ok -",
     {"batch_done_at": {0: 1}, "continued": {1}}, NOW, [BatchDone(1), AwaitContinue(2)]),
    ("confirm after pause", {"batch": "1", "confirm_batches": True,
                             "pause_between_batches": 30},
     "ok - -", {"batch_done_at": {0: NOW - 40}}, NOW, [AwaitContinue(1)]),
]


@pytest.mark.parametrize(("policy", "states", "progress", "now", "expected"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_plan_table(policy: dict[str, Any], states: str, progress: dict[str, Any], now: float,
                    expected: list[Action]) -> None:
    assert run_plan(policy, states, now, progress) == expected


@pytest.mark.parametrize(("policy", "hosts", "sizes"), [
    ({}, 5, [5]),
    ({"canary": 1}, 5, [1, 4]),
    ({"canary": 2, "batch": "2"}, 7, [2, 2, 2, 1]),
    ({"batch": "10%"}, 25, [3] * 8 + [1]),
    ({"batch": "100%"}, 4, [4]),
    ({"canary": 9}, 3, [3]),
])
def test_batches(policy: dict[str, Any], hosts: int, sizes: list[int]) -> None:
    names = [f"h{i}" for i in range(hosts)]
    batches = RolloutPolicy(**policy).batches(names)
    assert [len(b) for b in batches] == sizes
    assert [h for b in batches for h in b] == names


@pytest.mark.parametrize(("policy", "fragment"), [
    ({"batch": "ten"}, "--batch"),
    ({"batch": "0"}, "--batch must be at least 1"),
    ({"batch": "0%"}, "--batch"),
    ({"batch": "101%"}, "--batch"),
    ({"max_failures": "-1"}, "--max-failures"),
    ({"max_parallel": 0}, "--max-parallel"),
    ({"canary": -1}, "--canary"),
    ({"canary": "2"}, "--canary"),
    ({"retries": 1.5}, "--retries"),
    ({"host_timeout": 0}, "--host-timeout"),
    ({"host_timeout": float("inf")}, "--host-timeout"),  # TOML has inf and nan
    ({"host_timeout": float("nan")}, "--host-timeout"),
    ({"pause_between_batches": -1}, "--pause-between-batches"),
    ({"pause_between_batches": float("nan")}, "--pause-between-batches"),
    ({"confirm_batches": "yes"}, "confirm_batches"),
    ({"offline": "maybe"}, "--offline"),
])
def test_policy_validation(policy: dict[str, Any], fragment: str) -> None:
    with pytest.raises(UsageError, match=fragment):
        RolloutPolicy(**policy)


def test_policy_round_trip_and_unknown_option() -> None:
    pol = RolloutPolicy(canary=1, batch="10%", max_failures="5%", min_executed=3, retries=2)
    assert RolloutPolicy.from_dict(pol.as_dict()) == pol
    with pytest.raises(UsageError, match="unknown rollout option"):
        RolloutPolicy.from_dict({"bacth": "5"})


class CountingDict(dict):  # type: ignore[type-arg]
    reads = 0

    def __getitem__(self, key: Any) -> Any:
        CountingDict.reads += 1
        return super().__getitem__(key)


def test_planning_10000_hosts_reads_only_what_changed() -> None:
    """10,000 hosts, 1,000 started, 900 done: the fresh and the incremental answer agree,
    and a round of the driver's Planner after one host finished reads a handful of
    hosts, not 10,000 (O(changes), counted, not timed)."""
    n = 10_000
    pol = RolloutPolicy(batch="10%", max_failures="5%", min_executed=100, host_timeout=60)
    vs = [HostView(f"h{i}", deployment_id="R" if i < 1000 else None, started=NOW - 1,
                   acked=NOW - 1 if i < 1000 else None, online=True,
                   result="succeeded" if i < 900 else None) for i in range(n)]
    batches = pol.batches([v.host for v in vs])
    pr = RolloutProgress(attempts={v.host: 1 for v in vs if v.deployment_id})
    assert plan(pol, vs, batches, NOW, DEADLINE, pr) == [Plan(NOW - 1 + 60)]
    planner = Planner(pol, vs, batches, pr)
    assert planner.plan(NOW, DEADLINE) == [Plan(NOW - 1 + 60)]
    vs[950].result = "succeeded"
    planner.update(vs[950])
    planner.views, planner.cls = CountingDict(planner.views), CountingDict(planner.cls)
    CountingDict.reads = 0
    assert planner.plan(NOW, DEADLINE) == [Plan(NOW - 1 + 60)]
    assert CountingDict.reads < 20
    assert plan(pol, vs, batches, NOW, DEADLINE, pr) == [Plan(NOW - 1 + 60)]


# -- whole rollouts, simulated ----------------------------------------------------------

@dataclass
class SimHost:
    """How a host behaves on each attempt: ('ok'|'fail'|'hang', duration)."""

    online: bool
    attempts: list[tuple[str, int]]


@dataclass
class SimRun:
    status: str | None = None
    starts: list[tuple[int, Start]] = field(default_factory=list)
    aborted_at: int | None = None
    max_running: int = 0
    log: list[tuple[int, Action]] = field(default_factory=list)


def simulate(policy: RolloutPolicy, hosts: list[SimHost], steps: int = 400) -> tuple[
        SimRun, dict[str, HostView], list[list[str]]]:
    names = [f"h{i}" for i in range(len(hosts))]
    spec = dict(zip(names, hosts, strict=True))
    vs = {h: HostView(h, online=spec[h].online) for h in names}
    batches = policy.batches(names)
    pr = RolloutProgress()
    run = SimRun()
    ends: dict[str, tuple[int, str]] = {}
    deadline = 300.0
    for t in range(steps):
        now = float(t)
        for h, (end, outcome) in list(ends.items()):
            v = vs[h]
            if now >= end and v.result is None and v.deployment_id is not None:
                v.result = "succeeded" if outcome == "ok" else "failed"
                del ends[h]
        actions = plan(policy, list(vs.values()), batches, now, deadline, pr)
        for a in actions:
            run.log.append((t, a))
            if isinstance(a, Start):
                assert run.aborted_at is None, "a host started after the abort"
                run.starts.append((t, a))
                pr.attempts[a.host] = a.attempt
                v = vs[a.host]
                v.deployment_id, v.started, v.result = f"R.{a.attempt}", now, None
                v.acked = now if v.online else None
                behaviour = spec[a.host].attempts[min(a.attempt, len(spec[a.host].attempts)) - 1]
                if v.online and behaviour[0] != "hang":
                    ends[a.host] = (t + behaviour[1], behaviour[0])
                else:
                    ends.pop(a.host, None)
            elif isinstance(a, (TimeOut, Skip, Cancel)):
                result = {TimeOut: "timed_out", Skip: "skipped", Cancel: "cancelled"}[type(a)]
                vs[a.host].result = result
                ends.pop(a.host, None)
            elif isinstance(a, BatchDone):
                pr.batch_done_at[a.batch] = now
            elif isinstance(a, AwaitContinue):
                pr.continued.add(a.batch)  # an operator says yes at once
            elif isinstance(a, Abort):
                pr.aborted = a.reason
                run.aborted_at = t
            elif isinstance(a, Finish):
                run.status = a.status
        running = sum(1 for v in vs.values() if v.deployment_id and v.result is None)
        run.max_running = max(run.max_running, running)
        if run.status is not None:
            break
    return run, vs, batches


host_strategy = st.builds(
    SimHost,
    online=st.booleans(),
    attempts=st.lists(st.tuples(st.sampled_from(["ok", "ok", "fail", "hang"]),
                                st.integers(1, 5)), min_size=1, max_size=3))
policy_strategy = st.builds(
    RolloutPolicy,
    canary=st.integers(0, 3),
    batch=st.none() | st.integers(1, 5).map(str) | st.sampled_from(["20%", "50%"]),
    max_parallel=st.none() | st.integers(1, 4),
    max_failures=st.none() | st.integers(0, 3).map(str) | st.sampled_from(["10%", "50%"]),
    min_executed=st.integers(0, 4),
    host_timeout=st.none() | st.sampled_from([3.0, 8.0]),
    retries=st.integers(0, 2),
    pause_between_batches=st.sampled_from([0.0, 2.0]),
    confirm_batches=st.booleans(),
    offline=st.sampled_from(["wait", "skip"]),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policy=policy_strategy, hosts=st.lists(host_strategy, min_size=1, max_size=12))
def test_simulated_rollouts_keep_the_rules(policy: RolloutPolicy, hosts: list[SimHost]) -> None:
    run, vs, batches = simulate(policy, hosts)
    assert run.status is not None, "the rollout never finished"
    # max_parallel is never exceeded
    if policy.max_parallel is not None:
        assert run.max_running <= policy.max_parallel
    # attempts: at most 1 + retries per host, numbered 1, 2, ...
    per_host: dict[str, list[int]] = {}
    for _, s in run.starts:
        per_host.setdefault(s.host, []).append(s.attempt)
    for attempts in per_host.values():
        assert attempts == list(range(1, len(attempts) + 1))
        assert len(attempts) <= policy.retries + 1
    # batch order: no host of batch i starts before every earlier batch completed
    batch_of = {h: i for i, b in enumerate(batches) for h in b}
    done_at = {a.batch: t for t, a in run.log if isinstance(a, BatchDone)}
    for t, s in run.starts:
        for earlier in range(batch_of[s.host]):
            assert earlier in done_at and done_at[earlier] <= t
    # canary: a final canary failure means nothing outside the canary ever started
    if policy.canary:
        canary = set(batches[0])
        canary_failed = any(vs[h].result not in ("succeeded", "skipped", None)
                            for h in canary)
        if canary_failed and run.status != "timed_out":
            assert run.status == "aborted"
            assert all(s.host in canary for _, s in run.starts)
    # the verdict matches the hosts
    results = [v.result for v in vs.values()]
    if run.status == "succeeded":
        assert all(r in ("succeeded", "skipped") for r in results)
        assert "succeeded" in results
    if run.status == "failed":
        assert None not in results
        assert any(r not in ("succeeded", "skipped") for r in results) \
            or "succeeded" not in results
    if run.status == "aborted":
        assert run.aborted_at is not None
        # hosts never started stay untouched
        for h, v in vs.items():
            if h not in per_host:
                assert v.deployment_id is None and v.result in (None, "skipped")
    if run.status != "aborted":
        assert run.aborted_at is None
    # offline skip never starts a host that was offline
    if policy.offline == "skip":
        for _, s in run.starts:
            assert vs[s.host].online
    # thresholds: if not aborted, the final failures never exceeded the threshold
    if run.status in ("succeeded", "failed") and policy.max_failures is not None:
        executed = [v for v in vs.values() if v.result not in (None, "skipped", "cancelled")]
        failures = sum(1 for v in executed if v.result != "succeeded")
        n = int(policy.max_failures.rstrip("%"))
        if len(executed) >= max(1, policy.min_executed):
            if policy.max_failures.endswith("%"):
                assert failures * 100 <= n * len(executed)
            else:
                assert failures <= n


# -- the incremental Planner answers like a fresh one ------------------------------------

event_strategy = st.lists(st.tuples(
    st.sampled_from(["tick", "ack", "result", "online", "offline", "abort"]),
    st.integers(0, 11),
    st.sampled_from(["succeeded", "failed", "rolled_back", "rejected", "blocked"]),
    st.sampled_from([0.5, 1.0, 3.0, 7.0])), max_size=80)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policy=policy_strategy, n=st.integers(1, 12), online=st.lists(st.booleans(),
       min_size=12, max_size=12), events=event_strategy)
def test_incremental_planner_equals_a_fresh_plan(policy: RolloutPolicy, n: int,
                                                 online: list[bool],
                                                 events: list[tuple[str, int, str, float]]
                                                 ) -> None:
    """A long-lived Planner, updated per host change the way the driver does, answers
    every round exactly like `plan()` from scratch, through random acks, results, hosts
    going on- and offline, operator aborts and the clock passing timeouts, pauses and
    the deadline; the driver applies every answer."""
    names = [f"h{i}" for i in range(n)]
    vs = {h: HostView(h, online=online[i]) for i, h in enumerate(names)}
    batches = policy.batches(names)
    pr = RolloutProgress()
    planner = Planner(policy, list(vs.values()), batches, pr)
    now, deadline = 0.0, 40.0
    for kind, i, result, dt in [*events, ("tick", 0, "", 50.0)]:
        v = vs[names[i % n]]
        if kind == "tick":
            now += dt
        elif kind == "ack" and v.deployment_id and v.result is None and v.acked is None:
            v.acked = now
        elif kind == "result" and v.deployment_id and v.result is None:
            v.acked = now if v.acked is None else v.acked
            v.result = result
        elif kind in ("online", "offline"):
            v.online = kind == "online"
        elif kind == "abort" and pr.aborted is None:
            pr.aborted = "aborted by the operator"
        planner.update(v)
        fresh = plan(policy, list(vs.values()), batches, now, deadline, pr)
        actions = planner.plan(now, deadline)
        assert actions == fresh
        assert planner.plan(now, deadline) == actions, "plan() changed the index"
        for a in actions:  # the driver applies the answer
            if isinstance(a, Start):
                pr.attempts[a.host] = a.attempt
                w = vs[a.host]
                w.deployment_id, w.started, w.result, w.acked = f"R.{a.attempt}", now, None, None
            elif isinstance(a, (TimeOut, Skip, Cancel)):
                vs[a.host].result = {TimeOut: "timed_out", Skip: "skipped",
                                     Cancel: "cancelled"}[type(a)]
            elif isinstance(a, BatchDone):
                pr.batch_done_at[a.batch] = now
            elif isinstance(a, AwaitContinue):
                pr.continued.add(a.batch)
            elif isinstance(a, Abort):
                pr.aborted = a.reason
            if isinstance(a, (Start, TimeOut, Skip, Cancel)):
                planner.update(vs[a.host])
        if any(isinstance(a, Finish) for a in actions):
            break
