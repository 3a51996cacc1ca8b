"""Checked numbers: a duration is a number of seconds up to MAX_SECONDS (30 days), a
count a whole number with a lower bound (and an upper one where needed), a share of
hosts a number from 0 to 1.

`float()` takes `nan`, `inf` and negatives, and an infinite timeout is an endless wait,
so every number a person gives (an option, the environment, a file) goes through one of
these. They raise UsageError; `protocol.cliargs` turns them into argparse types.
`--timeout 1e20` is as endless a wait as `inf`, hence the cap.
"""

from __future__ import annotations

from protocol.errors import UsageError

MAX_DAYS = 30
MAX_SECONDS = MAX_DAYS * 86400.0


def _number(text: str | float) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        raise UsageError(f"{text!r} is not a number") from None


def seconds(text: str | float, *, zero: bool = False) -> float:
    """A duration: more than 0 (or at least 0 with `zero`), at most MAX_SECONDS."""
    value = _number(text)
    if not 0 <= value <= MAX_SECONDS or (value == 0 and not zero):  # also refuses nan
        bound = ">= 0" if zero else "> 0"
        raise UsageError(f"must be a number of seconds {bound} and at most {MAX_SECONDS:.0f} "
                         f"({MAX_DAYS} days), not {text!r}")
    return value


def whole(text: str | int, *, minimum: int = 0, maximum: int | None = None) -> int:
    """A count: a whole number of at least `minimum` (and at most `maximum`, where a
    bigger one cannot be used, such as a date it would put past the calendar's end)."""
    bound = f">= {minimum}" if maximum is None else f"from {minimum} to {maximum}"
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise UsageError(f"must be a whole number {bound}, not {text!r}") from None
    if value < minimum or (maximum is not None and value > maximum):
        raise UsageError(f"must be a whole number {bound}, not {text!r}")
    return value


def share(text: str | float) -> float:
    """A share of hosts: from 0 to 1."""
    value = _number(text)
    if not 0 <= value <= 1:  # also refuses nan
        raise UsageError(f"must be a number from 0 to 1, not {text!r}")
    return value
