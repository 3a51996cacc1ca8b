"""How both programs' `--help` shows an option's default."""

from __future__ import annotations

import argparse
from typing import Any

from protocol.broker import shown_urls


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
