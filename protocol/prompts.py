"""The one owner of prompts: their keys, their choices, and whether an answer fits.

Pure. The agent's stage machine builds prompts from here; the runner, the agent, the
local control socket, Home Assistant and `fleetctl approve` all read the same keys and
judge answers with `validate_answer`, so "approve", "reboot now" and "not now" mean the
same thing whichever way they arrive.

Prompt ids are derived from the deployment and the journal, never from a counter of
prompts issued: `DEP.choose`, `DEP.approve`, `DEP.reboot`, `DEP.failureN` (N = how many
failure prompts this deployment journaled before), so an id survives an agent restart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from protocol.models import Answer, Choice, Prompt, ReportItem

APPROVE_KEY = "deploy.approve"
REBOOT_KEY = "deploy.reboot"
FAILURE_ITEM = "failed"

APPROVE = "approve"
DEFER_HOUR = "defer-1h"
DEFER_TONIGHT = "defer-tonight"
DEFER_TOMORROW = "defer-tomorrow"
DEFERRALS = (DEFER_HOUR, DEFER_TONIGHT, DEFER_TOMORROW)
DEFAULT_TONIGHT = "22:00"

REBOOT_NOW = "now"
REBOOT_LATER = "later"

RETRY, SKIP, ROLLBACK = "retry", "skip", "rollback"
FAILURE_CHOICES = [
    Choice(id=RETRY, label="Retry", description="run the step again"),
    Choice(id=SKIP, label="Skip", description="mark the step done and go on"),
    Choice(id=ROLLBACK, label="Roll back", description="restore dumps and the previous "
                                                       "generation", destructive=True),
]


def prompt_id(deployment_id: str, kind: str, n: int = 0) -> str:
    suffix = {"choice": "choose", "approval": "approve", "reboot": "reboot"}.get(kind)
    return f"{deployment_id}.{suffix}" if suffix else f"{deployment_id}.failure{n}"


def approval_item(action: str, system: str, tonight: str = DEFAULT_TONIGHT) -> ReportItem:
    return ReportItem(
        step="deploy", id="approve", severity="recommendation",
        message=f"approve {action} to {system}",
        choices=[Choice(id=APPROVE, label="Approve now"),
                 Choice(id=DEFER_HOUR, label="In 1 hour"),
                 Choice(id=DEFER_TONIGHT, label=f"Tonight at {tonight}"),
                 Choice(id=DEFER_TOMORROW, label="Tomorrow (in 24 hours)")],
        default=None)


def reboot_item(window_opens: datetime | None = None) -> ReportItem:
    """`ask`: now or later. A reboot window: now, or wait for the window (no `later`)."""
    if window_opens is not None:
        return ReportItem(step="deploy", id="reboot", severity="recommendation",
                          message=f"the new system needs a reboot; the reboot window opens "
                                  f"at {window_opens:%H:%M}",
                          choices=[Choice(id=REBOOT_NOW, label="Reboot now", destructive=True)],
                          default=None)
    return ReportItem(step="deploy", id="reboot", severity="recommendation",
                      message="the new system needs a reboot",
                      choices=[Choice(id=REBOOT_NOW, label="Reboot now", destructive=True),
                               Choice(id=REBOOT_LATER, label="Later (report needs_reboot)")],
                      default=REBOOT_LATER)


def failure_item(step: str, message: str) -> ReportItem:
    return ReportItem(step=step, id=FAILURE_ITEM, severity="error", message=message,
                      choices=FAILURE_CHOICES, default=ROLLBACK)


def parse_hhmm(text: str) -> tuple[int, int]:
    """'22:00' -> (22, 0); ValueError otherwise."""
    hh, sep, mm = text.partition(":")
    if not sep or not (hh.isdigit() and mm.isdigit()) or len(mm) != 2:
        raise ValueError(f"want HH:MM, not {text!r}")
    h, m = int(hh), int(mm)
    if not (0 <= h < 24 and 0 <= m < 60):
        raise ValueError(f"want HH:MM, not {text!r}")
    return h, m


def deferred_until(choice: str, now: datetime, tonight: str = DEFAULT_TONIGHT) -> datetime:
    """When a deferral ends. `now` is the host's local time (tz-aware)."""
    if choice == DEFER_HOUR:
        return now + timedelta(hours=1)
    if choice == DEFER_TOMORROW:
        return now + timedelta(days=1)
    h, m = parse_hhmm(tonight)
    at = now.replace(hour=h, minute=m, second=0, microsecond=0)
    return at if at > now else at + timedelta(days=1)


@dataclass(frozen=True)
class AnswerVerdict:
    """What to journal for an answer, or why it is refused."""

    ok: bool
    message: str
    choices: dict[str, str] = field(default_factory=dict)
    complete: bool = False
    deferred_until: float | None = None


def refuse(message: str) -> AnswerVerdict:
    return AnswerVerdict(False, message)


def validate_answer(prompt: Prompt | None, answer: Answer, answered: dict[str, str],
                    now: datetime, tonight: str = DEFAULT_TONIGHT) -> AnswerVerdict:
    """Judge an answer to the open prompt. `answered` holds what this prompt got so far.

    `approve=True` (fleetctl approve, `fleet-agent prompt --approve`, Home Assistant's
    Install) means "approve" on an approval prompt and "reboot now" on a reboot prompt.
    A deferral answers an approval prompt without closing it: approving later still works.
    """
    if prompt is None or prompt.prompt_id != answer.prompt_id:
        return refuse(f"no open prompt {answer.prompt_id}")
    choices = dict(answer.choices)
    if answer.approve:
        if prompt.kind == "approval":
            choices.setdefault(APPROVE_KEY, APPROVE)
        elif prompt.kind == "reboot":
            choices.setdefault(REBOOT_KEY, REBOOT_NOW)
        else:
            return refuse(f"prompt {prompt.prompt_id} asks for choices, not an approval")
    if not choices:
        return refuse("invalid answer: no choices")
    items = {i.key: i for i in prompt.items if i.choices}
    problems = []
    for key, choice in choices.items():
        item = items.get(key)
        if item is None:
            problems.append(f"{key} is not asked here")
        elif choice not in {c.id for c in item.choices}:
            problems.append(f"{key}={choice} (choices: "
                            f"{', '.join(c.id for c in item.choices)})")
    if problems:
        return refuse("invalid answer: " + "; ".join(problems))
    until = None
    if prompt.kind == "approval" and choices.get(APPROVE_KEY) in DEFERRALS:
        until = deferred_until(choices[APPROVE_KEY], now, tonight).timestamp()
        return AnswerVerdict(True, f"deferred until {fmt_time(until)}", choices, False, until)
    have = {**answered, **choices}
    missing = [k for k in items if k not in have]
    if missing:
        return AnswerVerdict(True, f"accepted; still open: {', '.join(missing)}", choices)
    return AnswerVerdict(True, "accepted", choices, True)


def fmt_time(ts: float) -> str:
    return datetime.fromtimestamp(ts).astimezone().strftime("%Y-%m-%d %H:%M %Z")
