"""The live view shows what an operator needs: who waits for a choice, which migration
step runs, which hosts failed and why (folded from real protocol messages)."""

from __future__ import annotations

import time

import pytest
from rich.console import Console

from controller.follow.monitor import render
from controller.follow.view import HostView, fold_event, fold_state
from protocol.models import HostState, Progress, Result


def text_of(views: list[HostView]) -> str:
    console = Console(record=True, width=160)
    console.print(render(views, "rollout r1", [[v.host for v in views]]))
    return console.export_text()


def test_live_view_shows_choices_migration_steps_and_failures() -> None:
    now = time.time()
    waiting, migrating, failed = HostView("pg1"), HostView("pg2"), HostView("pg3")
    for v in (waiting, migrating, failed):
        v.deployment_id, v.generation, v.started = "r1", 1, now - 5
    assert fold_state(waiting, HostState(host="pg1", phase="awaiting_choice", deployment_id="r1",
                                         open_prompt="r1.choose", updated_at=now))
    assert fold_event(migrating, Progress(host="pg2", deployment_id="r1", generation=1, seq=3,
                                          time=now, stage="migrate", step="postgresql",
                                          message="migrating postgresql"))
    assert fold_event(failed, Result(host="pg3", deployment_id="r1", generation=1, seq=9,
                                     time=now, status="rolled_back",
                                     message="migration failed: disk on fire",
                                     log_tail=["pg_upgrade: error 3"]))
    text = text_of([waiting, migrating, failed])
    assert "awaiting choice" in text
    assert "migrating postgresql" in text
    assert "rolled_back" in text and "disk on fire" in text
    assert "1/3" in text  # one host finished


def test_events_of_another_deployment_are_ignored() -> None:
    v = HostView("a")
    v.deployment_id, v.generation = "r2", 2
    assert not fold_event(v, Result(host="a", deployment_id="r1", generation=1, seq=1,
                                    time=time.time(), status="failed"))
    assert v.result is None


PLURALS = [
    ((1, "host"), "1 host"),
    ((2, "host"), "2 hosts"),
    ((1, "more host"), "1 more host"),
    ((0, "more host"), "0 more hosts"),
    ((1, "batch"), "1 batch"),
    ((3, "batch"), "3 batches"),
]


def test_counts_are_spelled_as_people_read_them() -> None:
    from controller.follow.monitor import plural
    assert [plural(*args) for args, _ in PLURALS] == [want for _, want in PLURALS]


def test_prompt_choices_keep_label_and_description_apart() -> None:
    from controller.commands.steps import choice_line
    line = choice_line({"id": "upgrade", "label": "Upgrade in place",
                        "description": "pg_upgrade --link, minutes", "destructive": False},
                       "upgrade")
    assert "upgrade: Upgrade in place — pg_upgrade --link, minutes" in line
    assert "(default)" in line and "(destructive)" not in line
    bare = choice_line({"id": "wipe", "label": "", "description": "", "destructive": True}, None)
    assert bare.strip().startswith("- wipe") and "(destructive)" in bare and ":" not in bare


# A retained HostState of another deployment: (ours, done already, theirs, their
# desired generation) -> what our view becomes. Only a newer deployment of another
# rollout supersedes ours: the agent runs the latest desired state only, so ours will
# never report. A retry of our own rollout (R.2) is a new attempt the rollout's log
# or desired state announces, never a reason to end the host.
SUPERSEDE_CASES = [
    ("r1", None, "r2", 5, "cancelled"),        # another rollout took the host
    ("r1", None, "r2", 3, None),               # an older deployment's state
    ("r1", None, "r0", 2, None),               # an older rollout's state
    ("r1", None, "r1.2", 5, None),             # our own retry: not superseded
    ("r1.2", None, "r1", 5, None),             # (attempts of one rollout never supersede)
    ("r1", "succeeded", "r2", 5, "succeeded"),  # finished before: stays as it ended
    (None, None, "r2", 5, None),               # not deployed here
]


@pytest.mark.parametrize(("ours", "done", "theirs", "gen", "expect"), SUPERSEDE_CASES)
def test_a_newer_rollout_supersedes_a_host(ours: str | None, done: str | None, theirs: str,
                                           gen: int, expect: str | None) -> None:
    v = HostView("a", deployment_id=ours, generation=3 if ours else 0, result=done)
    fold_state(v, HostState(host="a", deployment_id=theirs, rollout_id=theirs.split(".")[0],
                            desired_generation=gen, generation=gen, phase="switched",
                            updated_at=time.time()))
    assert v.result == expect
    if expect == "cancelled":
        assert v.message == f"superseded by deployment {theirs} (generation {gen})"
        assert v.done
