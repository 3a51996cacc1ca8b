"""Issue 4: the reboot policy is a pure decision of (policy, needs_reboot, now, action)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from client.run.reboot import (
    RebootDecision,
    RebootPolicy,
    activation_needs_reboot,
    in_window,
    parse_reboot_policy,
    reboot_decision,
)
from protocol.errors import InputError
from protocol.models import REBOOT_POLICY_RE


def at(hhmm: str, day: int = 10, second: int = 0) -> datetime:
    h, m = (int(x) for x in hhmm.split(":"))
    return datetime(2025, 3, day, h, m, second)


@pytest.mark.parametrize(("text", "expected"), [
    ("never", RebootPolicy("never")),
    ("ask", RebootPolicy("ask")),
    ("now", RebootPolicy("now")),
    ("window 02:00-04:30", RebootPolicy("window", 120, 270)),
    ("window 23:30-01:15", RebootPolicy("window", 1410, 75)),
    ("window 00:00-23:59", RebootPolicy("window", 0, 1439)),
])
def test_parse_reboot_policy(text: str, expected: RebootPolicy) -> None:
    assert parse_reboot_policy(text) == expected
    assert REBOOT_POLICY_RE.fullmatch(text)  # the wire schema accepts the same strings


@pytest.mark.parametrize("text", [
    "", "Now", "always", "window", "window 2:00-04:00", "window 24:00-01:00",
    "window 02:60-03:00", "window 02:00 - 03:00", "window 02:00-03:00 ", "window 02:00",
])
def test_bad_reboot_policy_is_one_line(text: str) -> None:
    with pytest.raises(InputError, match="invalid reboot policy") as exc:
        parse_reboot_policy(text)
    assert "\n" not in str(exc.value)
    assert not REBOOT_POLICY_RE.fullmatch(text)


@pytest.mark.parametrize(("start", "end", "minute", "inside"), [
    (120, 240, 119, False),   # 01:59 before 02:00-04:00
    (120, 240, 120, True),    # start is inclusive
    (120, 240, 239, True),
    (120, 240, 240, False),   # end is exclusive
    (1380, 120, 1379, False),  # 22:59, window 23:00-02:00 crosses midnight
    (1380, 120, 1380, True),
    (1380, 120, 1439, True),   # 23:59
    (1380, 120, 0, True),      # 00:00
    (1380, 120, 119, True),
    (1380, 120, 120, False),
    (1380, 120, 600, False),
    (300, 300, 0, True),       # equal start and end: the whole day
    (300, 300, 299, True),
])
def test_in_window(start: int, end: int, minute: int, inside: bool) -> None:
    assert in_window(start, end, minute) is inside


@pytest.mark.parametrize(("policy", "needs", "now", "action", "expected"), [
    # nothing to do when no reboot is needed, whatever the policy
    ("now", False, at("12:00"), "switch", RebootDecision("none")),
    ("window 02:00-04:00", False, at("03:00"), "switch", RebootDecision("none")),
    ("never", True, at("12:00"), "switch", RebootDecision("report")),
    ("ask", True, at("12:00"), "switch", RebootDecision("ask")),
    ("now", True, at("12:00"), "switch", RebootDecision("now")),
    ("now", True, at("12:00"), "boot", RebootDecision("now")),
    # a reboot after `test` boots the profile and undoes the test: only report
    ("now", True, at("12:00"), "test", RebootDecision("report")),
    ("ask", True, at("12:00"), "test", RebootDecision("report")),
    # a plain window
    ("window 02:00-04:00", True, at("01:59", second=59), "switch",
     RebootDecision("wait", at("02:00"))),
    ("window 02:00-04:00", True, at("02:00"), "switch", RebootDecision("now")),
    ("window 02:00-04:00", True, at("03:59", second=59), "switch", RebootDecision("now")),
    ("window 02:00-04:00", True, at("04:00"), "switch", RebootDecision("wait", at("02:00", 11))),
    ("window 02:00-04:00", True, at("23:59"), "switch", RebootDecision("wait", at("02:00", 11))),
    # crossing midnight
    ("window 23:00-02:00", True, at("22:59"), "boot", RebootDecision("wait", at("23:00"))),
    ("window 23:00-02:00", True, at("23:00"), "boot", RebootDecision("now")),
    ("window 23:00-02:00", True, at("00:30", 11), "boot", RebootDecision("now")),
    ("window 23:00-02:00", True, at("01:59", 11), "boot", RebootDecision("now")),
    ("window 23:00-02:00", True, at("02:00", 11), "boot", RebootDecision("wait", at("23:00", 11))),
    ("window 23:00-02:00", True, at("12:00"), "boot", RebootDecision("wait", at("23:00"))),
    # month end
    ("window 03:00-04:00", True, datetime(2025, 2, 28, 5, 0), "switch",
     RebootDecision("wait", datetime(2025, 3, 1, 3, 0))),
    ("window 03:00-03:00", True, at("17:45"), "switch", RebootDecision("now")),
])
def test_reboot_decision(policy: str, needs: bool, now: datetime, action: str,
                         expected: RebootDecision) -> None:
    assert reboot_decision(policy, needs, now, action) == expected


def test_wait_until_keeps_the_time_zone() -> None:
    tz = timezone(timedelta(hours=2))
    now = datetime(2025, 3, 10, 12, 0, tzinfo=tz)
    d = reboot_decision("window 02:00-04:00", True, now)
    assert d == RebootDecision("wait", datetime(2025, 3, 11, 2, 0, tzinfo=tz))
    assert d.wait_until is not None and d.wait_until.timestamp() - now.timestamp() == 14 * 3600


def test_bad_policy_string_reaches_the_caller_as_input_error() -> None:
    with pytest.raises(InputError):
        reboot_decision("sometimes", True, at("12:00"))


OLD, NEW = "/nix/store/old", "/nix/store/new"


@pytest.mark.parametrize(("action", "exit_100", "boot_differ", "running", "needed"), [
    ("switch", False, False, NEW, False),
    ("switch", False, True, NEW, True),
    ("switch", True, False, NEW, True),
    ("test", False, True, NEW, True),
    # `boot` activates nothing now: the new system needs a reboot to run at all
    ("boot", False, False, OLD, True),
    # after that reboot, it runs
    ("boot", False, False, NEW, False),
    ("boot", True, False, NEW, True),
])
def test_activation_needs_reboot(action: str, exit_100: bool, boot_differ: bool, running: str,
                                 needed: bool) -> None:
    assert activation_needs_reboot(action, exit_100, boot_differ, running, NEW) is needed
