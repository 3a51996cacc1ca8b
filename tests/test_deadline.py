"""Prompt deadlines (issue 6): when the policy takes the defaults, and which."""

from __future__ import annotations

from typing import Any

import pytest

from client.ask.deadline import deadline_answer, deadline_outcome, effective_deadline, seconds_left
from protocol.models import Choice, DeployPolicy, Prompt, ReportItem

AB = [Choice(id="a"), Choice(id="b")]


def prompt(deadline: float | None = 100.0, items: list[ReportItem] | None = None) -> Prompt:
    return Prompt(host="h1", prompt_id="p", deployment_id="d", generation=1, created_at=10.0,
                  deadline=deadline, items=items if items is not None else [
                      ReportItem(step="s", id="x", severity="warning", message="m", choices=AB,
                                 default="b"),
                      ReportItem(step="s", id="y", severity="warning", message="m", choices=AB,
                                 default=None),
                      ReportItem(step="t", id="z", severity="error", message="no choices"),
                  ])


TAKE = DeployPolicy(take_default_on_deadline=True)
KEEP = DeployPolicy(take_default_on_deadline=False)
WITH_S = DeployPolicy(take_default_on_deadline=True, prompt_deadline_s=50)

CASES: list[tuple[str, Prompt, DeployPolicy, float, Any]] = [
    ("before the deadline", prompt(), TAKE, 99.9, None),
    ("at the deadline", prompt(), TAKE, 100.0, {"s.x": "b"}),
    ("after the deadline", prompt(), TAKE, 500.0, {"s.x": "b"}),
    ("policy keeps waiting", prompt(), KEEP, 500.0, None),
    ("no deadline anywhere", prompt(deadline=None), TAKE, 1e12, None),
    ("deadline from policy: created_at + 50", prompt(deadline=None), WITH_S, 59.0, None),
    ("deadline from policy passed", prompt(deadline=None), WITH_S, 60.0, {"s.x": "b"}),
    ("prompt deadline beats policy", prompt(deadline=200.0), WITH_S, 100.0, None),
    ("no item has a default", prompt(items=[ReportItem(step="s", id="y", severity="warning",
                                                         message="m", choices=AB)]),
     TAKE, 500.0, None),
    ("default that is not a choice is not taken",
     prompt(items=[ReportItem(step="s", id="q", severity="warning", message="m", choices=AB,
                              default="c")]), TAKE, 500.0, None),
    ("every default taken", prompt(items=[
        ReportItem(step="a", id="1", severity="warning", message="m", choices=AB, default="a"),
        ReportItem(step="b", id="2", severity="recommendation", message="m", choices=AB,
                   default="b")]), TAKE, 500.0, {"a.1": "a", "b.2": "b"}),
]


@pytest.mark.parametrize(("what", "p", "policy", "now", "expected"), CASES,
                         ids=[c[0] for c in CASES])
def test_deadline_outcome(what: str, p: Prompt, policy: DeployPolicy, now: float,
                          expected: Any) -> None:
    assert deadline_outcome(p, policy, now) == expected


def test_deadline_answer_is_recorded_as_taken_by_deadline() -> None:
    answer = deadline_answer(prompt(), TAKE, 150.0)
    assert answer is not None
    assert answer.answered_by == "deadline" and answer.choices == {"s.x": "b"}
    assert (answer.host, answer.prompt_id, answer.issued_at) == ("h1", "p", 150.0)
    assert deadline_answer(prompt(), TAKE, 50.0) is None


def test_effective_deadline_and_seconds_left() -> None:
    assert effective_deadline(prompt(deadline=None), WITH_S) == 60.0
    assert effective_deadline(prompt(deadline=None), TAKE) is None
    assert seconds_left(prompt(), TAKE, 70.0) == 30.0
    assert seconds_left(prompt(), TAKE, 170.0) == 0.0
    assert seconds_left(prompt(), KEEP, 70.0) is None  # nothing will happen: wait forever
