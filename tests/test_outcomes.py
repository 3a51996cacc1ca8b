"""The one outcome vocabulary (protocol/outcomes.py), and every reader agreeing on it."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from controller.follow.view import HostView
from controller.follow.watch import Watcher
from controller.rollout.planner import Finish, RolloutPolicy, plan
from controller.state.eventlog import EventLog
from protocol import outcomes

# (results of every host, rollout outcome)
ROLLOUTS = [
    (["succeeded", "succeeded"], "succeeded"),
    (["succeeded", "skipped"], "succeeded"),
    (["succeeded", "cancelled"], "succeeded"),
    (["succeeded", "failed"], "failed"),
    (["succeeded", "rolled_back"], "failed"),
    (["rejected"], "failed"),
    (["blocked", "succeeded"], "failed"),
    (["succeeded", "timed_out"], "failed"),
    (["skipped", "skipped"], "failed"),  # nothing deployed anywhere is no success
    (["cancelled"], "failed"),
]


@pytest.mark.parametrize(("results", "expected"), ROLLOUTS)
def test_rollout_result(results: list[str], expected: str) -> None:
    assert outcomes.rollout_result(results) == expected


def _views(results: list[str]) -> list[HostView]:
    return [HostView(f"h{i}", deployment_id=None if r == "skipped" else "R", result=r,
                     phase=r, started=1.0, acked=1.0, finished=2.0, online=True)
            for i, r in enumerate(results)]


def _watcher(tmp_path: Path, views: list[HostView]) -> Watcher:
    ctx: Any = SimpleNamespace(eventlog=EventLog(tmp_path))
    w = Watcher(ctx, "R")
    w.views = {v.host: v for v in views}
    return w


@pytest.mark.parametrize(("results", "expected"), ROLLOUTS)
def test_planner_and_watch_agree_on_a_finished_rollout(tmp_path: Path, results: list[str],
                                                       expected: str) -> None:
    """They disagreed on an all-skipped rollout (watch said succeeded, the planner failed)."""
    views = _views(results)
    finishes = [a for a in plan(RolloutPolicy(), views, [[v.host for v in views]], 10.0, 99.0)
                if isinstance(a, Finish)]
    assert finishes == [Finish(expected)]  # type: ignore[arg-type]
    assert _watcher(tmp_path, views).final_status() == expected


@pytest.mark.parametrize("result", sorted(outcomes.FINISHED))
def test_every_outcome_has_one_meaning(result: str) -> None:
    failure, not_run = outcomes.counts_as_failure(result), result in outcomes.NOT_EXECUTED
    assert outcomes.is_finished(result)
    assert not (failure and not_run)
    assert failure or not_run or result == "succeeded"
    key = outcomes.count_key(result, started=True)
    assert key == ("succeeded" if result == "succeeded" else "timed_out"
                   if result == "timed_out" else "not_started" if not_run else "failed")
    if result in outcomes.AGENT_RESULTS:
        assert outcomes.result_of_phase(outcomes.phase_of(result)) == result


def test_running_hosts_are_not_finished() -> None:
    assert not outcomes.is_finished(None)
    assert outcomes.count_key(None, started=True) == "running"
    assert outcomes.count_key(None, started=False) == "not_started"
    assert outcomes.result_of_phase("awaiting_reboot") is None
