"""What both programs' command lines share: one-line usage errors, how `--help` shows
defaults, and the option types that check a value before anything runs.

A number an option takes is checked when it is parsed: a count is a whole number with a
lower bound, a duration is a finite number of seconds (`nan`, `inf` and negatives are
refused: `float()` takes all three, and an infinite `--timeout` is an endless wait).
The checks raise UsageError, so a value from the environment or a file gets the same
message as one typed after the option.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

from protocol.broker import shown_urls
from protocol.errors import UsageError
from protocol.mqtt import MqttVersion, parse_mqtt_version

EXIT_USAGE = 2
T = TypeVar("T")


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless it has none or says it. The
    broker list is shown without credentials (FLEET_BROKER's may hold a password)."""

    def default_of(self, action: argparse.Action) -> Any:
        return action.default

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = self.default_of(action)
        if "default" in text or not action.option_strings \
                or default in (None, False, argparse.SUPPRESS):
            return text
        if action.dest == "broker":
            default = shown_urls(default)
        return f"{text} (default: {str(default).replace('%', '%%')})"


class Parser(argparse.ArgumentParser):
    """A usage error is one line (`PROG: error: ... (see --help)`) and exit 2, not the
    whole usage text."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _number(text: str | float) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        raise UsageError(f"{text!r} is not a number") from None


def seconds(text: str | float, *, zero: bool = False) -> float:
    """A duration: finite, more than 0 (or at least 0 with `zero`)."""
    value = _number(text)
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        bound = ">= 0" if zero else "> 0"
        raise UsageError(f"must be a finite number of seconds {bound}, not {text!r}")
    return value


def whole(text: str | int, *, minimum: int = 0) -> int:
    """A count: a whole number of at least `minimum`."""
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise UsageError(f"must be a whole number >= {minimum}, not {text!r}") from None
    if value < minimum:
        raise UsageError(f"must be a whole number >= {minimum}, not {text!r}")
    return value


def share(text: str | float) -> float:
    """A share of hosts: from 0 to 1."""
    value = _number(text)
    if not 0 <= value <= 1:  # also refuses nan
        raise UsageError(f"must be a number from 0 to 1, not {text!r}")
    return value


def option(parse: Callable[..., T], **bounds: Any) -> Callable[[str], T]:
    """`parse` as an argparse `type=`: its UsageError becomes argparse's
    `argument --NAME: MESSAGE`."""

    def convert(text: str) -> T:
        try:
            return parse(text, **bounds)
        except UsageError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = parse.__name__
    return convert


SECONDS = option(seconds)
SECONDS_OR_ZERO = option(seconds, zero=True)
COUNT = option(whole)
AT_LEAST_ONE = option(whole, minimum=1)
SHARE = option(share)
MQTT_VERSION: Callable[[str], MqttVersion] = option(parse_mqtt_version)
