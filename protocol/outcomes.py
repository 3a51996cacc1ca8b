"""The one outcome vocabulary: how a deployment ends on a host, and how a rollout ends.

Pure. An agent reports a `ResultStatus`; the controller adds two outcomes of its own
(`timed_out`: no result in time, `skipped`: never started). Everything that asks "is
this host finished?", "did it fail?", "does a rollout of these results succeed?" asks
here: the planner, `fleetctl watch`, the store's counts, the live views, Home Assistant
and the agent's runner.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Literal, get_args

ResultStatus = Literal["succeeded", "failed", "rolled_back", "rejected", "cancelled", "blocked"]
"""How a deployment ended, as the agent reports it (Result.status, HostState.last_result)."""

HostOutcome = Literal["succeeded", "failed", "rolled_back", "rejected", "cancelled", "blocked",
                      "timed_out", "skipped"]
"""A host's final outcome in a rollout: an agent result or one the controller decided."""

RolloutStatus = Literal["succeeded", "failed", "aborted", "timed_out"]
"""How a whole rollout ended."""

CountKey = Literal["succeeded", "failed", "timed_out", "not_started", "running"]

AGENT_RESULTS: frozenset[str] = frozenset(get_args(ResultStatus))
FINISHED: frozenset[str] = frozenset(get_args(HostOutcome))
"""A host with one of these has a final outcome for its deployment."""
FAILURES: frozenset[str] = frozenset({"failed", "rolled_back", "rejected", "timed_out", "blocked"})
"""Outcomes that count as failures (thresholds, canaries, exit codes, summaries)."""
RETRYABLE: frozenset[str] = frozenset({"failed", "rolled_back", "timed_out"})
"""Failures a new attempt may fix (a rejection or a block will not change by retrying)."""
NOT_EXECUTED: frozenset[str] = frozenset({"skipped", "cancelled"})
"""Neither success nor failure: the deployment never ran (or was withdrawn)."""
ROLLOUT_FINAL: frozenset[str] = frozenset(get_args(RolloutStatus))
COUNT_KEYS: tuple[CountKey, ...] = ("succeeded", "failed", "timed_out", "not_started")

# The HostState phase that shows a result: every result is its own phase, except success.
_PHASE = {"succeeded": "done"}
_RESULT_OF_PHASE = {"done": "succeeded", **{r: r for r in AGENT_RESULTS if r != "succeeded"}}


def is_finished(result: str | None) -> bool:
    return result in FINISHED


def counts_as_failure(result: str | None) -> bool:
    return result in FAILURES


def phase_of(result: str) -> str:
    """The HostState phase an agent shows once a deployment ended with `result`."""
    return _PHASE.get(result, result)


def result_of_phase(phase: str) -> str | None:
    """The result a final HostState phase stands for; None for a phase still in flight."""
    return _RESULT_OF_PHASE.get(phase)


def rollout_result(results: Iterable[str]) -> Literal["succeeded", "failed"]:
    """A rollout whose hosts all finished: `succeeded` when at least one host executed and
    every executed host succeeded; hosts that never executed (skipped, cancelled) count
    neither way. A rollout in which nothing executed did not deploy anything: `failed`."""
    return rollout_result_of_counts(Counter(results))


def rollout_result_of_counts(counts: Mapping[str, int]) -> Literal["succeeded", "failed"]:
    """`rollout_result` from the number of hosts per result (the planner keeps counts)."""
    executed = sum(n for r, n in counts.items() if r not in NOT_EXECUTED)
    return "succeeded" if executed and counts.get("succeeded", 0) == executed else "failed"


def count_key(result: str | None, started: bool) -> CountKey:
    """Which summary count a host's outcome falls in (`running` while it has none)."""
    if result == "succeeded":
        return "succeeded"
    if result == "timed_out":
        return "timed_out"
    if result in NOT_EXECUTED or (result is None and not started):
        return "not_started"
    if result is None:
        return "running"
    return "failed"
