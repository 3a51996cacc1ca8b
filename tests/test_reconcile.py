"""Resuming a rollout: which lost desired states are sent again, which were superseded
(`controller.rollout.reconcile`, pure: one table)."""

from __future__ import annotations

import pytest

from controller.follow.view import HostView
from controller.rollout.reconcile import Reconciled, reconcile

OURS = ("r1.1", 3)


def view(acked: bool = False) -> HostView:
    return HostView(host="h", deployment_id=OURS[0], generation=OURS[1],
                    acked=100.0 if acked else None)


# (case, the broker's retained desired for h (None: none), acked, aborting, expected)
CASES: list[tuple[str, tuple[str, int] | None, bool, bool, Reconciled]] = [
    ("the broker holds ours", OURS, False, False, Reconciled((), ())),
    ("lost before the publish: send again", None, False, False, Reconciled(("h",), ())),
    ("the broker holds an older one: ours was lost", ("r0.1", 2), False, False,
     Reconciled(("h",), ())),
    ("acknowledged: the host has it, whatever the broker holds", None, True, False,
     Reconciled((), ())),
    ("acknowledged, then a newer one came: the host's own result decides", ("r2.1", 4),
     True, False, Reconciled((), ())),
    ("a newer generation took the host", ("r2.1", 4), False, False,
     Reconciled((), (("h", "superseded by deployment r2.1 (generation 4)"),))),
    ("superseded while aborting: still cancelled", ("r2.1", 4), False, True,
     Reconciled((), (("h", "superseded by deployment r2.1 (generation 4)"),))),
    ("aborting: a host that never got it is not started", None, False, True,
     Reconciled((), ())),
    ("same generation, another id (a cleared and reissued state): send ours", ("r9.1", 3),
     False, False, Reconciled(("h",), ())),
]


@pytest.mark.parametrize(("case", "held", "acked", "aborting", "expected"), CASES,
                         ids=[c[0] for c in CASES])
def test_reconcile(case: str, held: tuple[str, int] | None, acked: bool, aborting: bool,
                   expected: Reconciled) -> None:
    broker = {"h": held} if held is not None else {}
    assert reconcile([view(acked)], broker, aborting) == expected


def test_only_the_hosts_given_are_judged() -> None:
    hosts = [HostView(host=f"h{i}", deployment_id="r1.1", generation=1) for i in range(3)]
    held = {"h0": ("r1.1", 1), "h2": ("r5.1", 9), "other": ("r1.1", 1)}
    assert reconcile(hosts, held, aborted=False) == Reconciled(
        ("h1",), (("h2", "superseded by deployment r5.1 (generation 9)"),))
