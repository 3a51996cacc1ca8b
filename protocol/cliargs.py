"""What both programs' command lines share: one-line usage errors, how `--help` shows
defaults, and the option types that check a value before anything runs.

A number an option takes is checked when it is parsed, by the checks of
`protocol.numbers` (a count is a whole number with a lower bound, a duration a finite
number of seconds), so a value from the environment or a file gets the same message as
one typed after the option.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from protocol.broker import shown_urls
from protocol.errors import UsageError
from protocol.mqtt import MqttVersion, parse_mqtt_version
from protocol.numbers import seconds, share, whole

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


def path(text: str) -> Path:
    """A path option: an empty one is refused (Path("") would be the current directory)."""
    if not text:
        raise argparse.ArgumentTypeError("is empty: give a path")
    return Path(text)


SECONDS = option(seconds)
SECONDS_OR_ZERO = option(seconds, zero=True)
COUNT = option(whole)
AT_LEAST_ONE = option(whole, minimum=1)
SHARE = option(share)
MQTT_VERSION: Callable[[str], MqttVersion] = option(parse_mqtt_version)
