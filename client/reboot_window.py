"""Reboot windows `HH:MM-HH:MM` (may cross midnight): pure time arithmetic."""

from __future__ import annotations

import time


def _minutes(hhmm: str) -> int:
    h, m = hhmm.split(":")
    return int(h) * 60 + int(m)


def seconds_until_window(window: str, now: time.struct_time) -> float:
    """0 when `now` is inside the window, else seconds until it opens."""
    start_s, end_s = window.split("-")
    start, end = _minutes(start_s), _minutes(end_s)
    cur = now.tm_hour * 60 + now.tm_min
    inside = start <= cur < end if start <= end else (cur >= start or cur < end)
    if inside:
        return 0.0
    delta = (start - cur) % (24 * 60)
    return float(delta * 60 - now.tm_sec)
