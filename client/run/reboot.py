"""When to reboot after an activation: pure decisions from the deploy's reboot policy.

Policies (`DeployPolicy.reboot`): `never` (only report needs_reboot), `ask` (prompt),
`now`, `window HH:MM-HH:MM` (host-local wall clock; start inclusive, end exclusive;
a start after the end crosses midnight; equal start and end means the whole day).
The runner journals the decision (and `wait_until`) before acting on it, and asks
again with a fresh `now` after a restart, so a missed window simply waits for the next.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from protocol.errors import InputError

PolicyKind = Literal["never", "ask", "now", "window"]
Decision = Literal["none", "report", "ask", "now", "wait"]
WINDOW_RE = re.compile(r"^window ([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)$")
DAY = 24 * 60


@dataclass(frozen=True)
class RebootPolicy:
    kind: PolicyKind
    start: int = 0  # minutes after midnight (window only)
    end: int = 0


@dataclass(frozen=True)
class RebootDecision:
    action: Decision
    wait_until: datetime | None = None


def parse_reboot_policy(text: str) -> RebootPolicy:
    """Parse a policy string; anything else is a one-line InputError."""
    simple: dict[str, PolicyKind] = {"never": "never", "ask": "ask", "now": "now"}
    if text in simple:
        return RebootPolicy(simple[text])
    m = WINDOW_RE.fullmatch(text)
    if m is None:
        raise InputError(f"invalid reboot policy {text!r}: want never, ask, now or "
                         "'window HH:MM-HH:MM'")
    h1, m1, h2, m2 = (int(g) for g in m.groups())
    return RebootPolicy("window", h1 * 60 + m1, h2 * 60 + m2)


def in_window(start: int, end: int, minute: int) -> bool:
    """Is minute-of-day `minute` inside [start, end), the window possibly crossing midnight?"""
    if start == end:
        return True
    if start < end:
        return start <= minute < end
    return minute >= start or minute < end


def next_window_start(start: int, now: datetime) -> datetime:
    """The first moment at or after `now` at wall-clock minute `start` (keeps tzinfo)."""
    today = now.replace(hour=start // 60, minute=start % 60, second=0, microsecond=0)
    return today if today >= now else today + timedelta(days=1)


def reboot_decision(policy: str | RebootPolicy, needs_reboot: bool, now: datetime,
                    action: str = "switch") -> RebootDecision:
    """What to do about a reboot right now.

    `none`: no reboot needed. `report`: needed but not ours to do (never; and always
    after `test`, since a reboot would boot the profile and undo the test activation).
    `ask`: prompt a person. `now`: reboot. `wait`: until `wait_until`, then decide again.
    """
    p = policy if isinstance(policy, RebootPolicy) else parse_reboot_policy(policy)
    if not needs_reboot:
        return RebootDecision("none")
    if p.kind == "never" or action == "test":
        return RebootDecision("report")
    if p.kind == "ask":
        return RebootDecision("ask")
    if p.kind == "now" or in_window(p.start, p.end, now.hour * 60 + now.minute):
        return RebootDecision("now")
    return RebootDecision("wait", next_window_start(p.start, now))


def activation_needs_reboot(action: str, reboot_required: bool, boot_files_differ: bool,
                            running_system: str | None, toplevel: str) -> bool:
    """Does this activation need a reboot to be complete?

    switch-to-configuration's exit 100 or a different kernel/initrd/modules say so;
    after `boot` the new system runs only after a reboot, whatever its kernel.
    """
    if action == "boot":
        return running_system != toplevel or reboot_required or boot_files_differ
    return reboot_required or boot_files_differ
