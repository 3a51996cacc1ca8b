"""Prompt notifications (issue 6): exact commands, through an injected runner."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from client.ask.notify import (
    NotifyConfig,
    PromptNotifier,
    graphical_user,
    notify_prompt,
    parse_session,
    parse_sessions,
    prompt_message,
)
from protocol.models import Choice, Prompt, ReportItem

LIST = """\
     2 1000 alice seat0 tty2 active no -
     5 1001 bob   -     pts/1 active no -
    c3 1002 carol seat0 tty3 online no -
     7 1003 dave  seat0 tty4 closing no -
     9 1000 alice -     -    active no -
"""
SHOW = {
    "2": "Name=alice\nUser=1000\nType=wayland\nState=active\nRemote=no\n",
    "5": "Name=bob\nUser=1001\nType=tty\nState=active\nRemote=yes\n",
    "c3": "Name=carol\nUser=1002\nType=x11\nState=online\nRemote=no\n",
    "7": "Name=dave\nUser=1003\nType=x11\nState=closing\nRemote=no\n",
    "9": "Name=alice\nUser=1000\nType=x11\nState=active\nRemote=no\n",
}


class FakeRunner:
    """Answers loginctl like a desktop with two graphical users; records every argv."""

    def __init__(self, fail: set[str] | None = None) -> None:
        self.calls: list[list[str]] = []
        self.fail = fail or set()

    async def __call__(self, argv: Sequence[str]) -> tuple[int, str]:
        argv = list(argv)
        self.calls.append(argv)
        if argv[0] in self.fail:
            return 1, ""
        if argv[:2] == ["loginctl", "list-sessions"]:
            return 0, LIST
        if argv[:2] == ["loginctl", "show-session"]:
            return 0, SHOW[argv[2]]
        return 0, ""


def prompt() -> Prompt:
    return Prompt(host="web1", prompt_id="p-1", deployment_id="d-7", generation=7,
                  created_at=0.0, items=[
                      ReportItem(step="pg", id="major", severity="warning", message="m",
                                 choices=[Choice(id="migrate")]),
                      ReportItem(step="ng", id="note", severity="warning", message="info"),
                  ])


TITLE = "Flotilla: web1 needs a decision"
BODY = "Deployment d-7 waits for 1 choice(s): pg.major.\nAnswer with: fleet-agent prompt"


def test_message_names_the_command() -> None:
    assert prompt_message(prompt(), "fleet-agent prompt") == (TITLE, BODY)
    with_deadline = prompt().model_copy(update={"deadline": 3600.0 * 24 * 365})
    assert "Deadline: " in prompt_message(with_deadline, "x")[1]
    approval = prompt().model_copy(update={"kind": "approval", "items": []})
    assert prompt_message(approval, "x")[1].startswith("Deployment d-7 waits for approval.")


async def test_off_by_default_runs_nothing() -> None:
    runner = FakeRunner()
    assert NotifyConfig().enabled is False
    assert await notify_prompt(prompt(), NotifyConfig(), runner) == []
    assert runner.calls == []


async def test_desktop_and_wall_exact_argv() -> None:
    runner = FakeRunner()
    sent = await notify_prompt(prompt(), NotifyConfig(desktop=True, wall=True), runner)

    def desktop(user: str, uid: int) -> list[str]:
        return ["runuser", "-u", user, "--", "env",
                f"DBUS_SESSION_BUS_ADDRESS=unix:path=/run/user/{uid}/bus", "notify-send",
                "--app-name=Flotilla", "--urgency=critical", "--icon=system-software-update",
                TITLE, BODY]

    # alice once (two sessions), carol; not bob (remote tty) nor dave (closing)
    assert sent == [desktop("alice", 1000), desktop("carol", 1002),
                    ["wall", f"{TITLE}\n{BODY}"]]
    assert runner.calls[0] == ["loginctl", "list-sessions", "--no-legend"]
    assert ["loginctl", "show-session", "2", "-p", "Name", "-p", "User", "-p", "Type", "-p",
            "State", "-p", "Remote"] in runner.calls


async def test_wall_only() -> None:
    runner = FakeRunner()
    sent = await notify_prompt(prompt(), NotifyConfig(wall=True, command="fleet-agent prompt"
                                                      " --state-dir /srv/f"), runner)
    assert runner.calls == sent and len(sent) == 1
    assert sent[0][1].endswith("Answer with: fleet-agent prompt --state-dir /srv/f")


async def test_failures_are_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    runner = FakeRunner(fail={"loginctl", "wall"})
    assert await notify_prompt(prompt(), NotifyConfig(desktop=True, wall=True), runner) == []
    assert "loginctl list-sessions failed" in caplog.text and "wall failed" in caplog.text


async def test_notifier_notifies_once_per_prompt() -> None:
    runner = FakeRunner()
    notifier = PromptNotifier(NotifyConfig(wall=True), runner)
    assert len(await notifier.prompt_opened(prompt())) == 1
    assert await notifier.prompt_opened(prompt()) == []  # re-published: no second wall
    assert len(await notifier.prompt_opened(prompt().model_copy(update={"prompt_id": "p-2"})
                                            )) == 1


async def test_notifier_survives_a_broken_runner() -> None:
    async def broken(argv: Sequence[str]) -> tuple[int, str]:
        raise RuntimeError("no fork for you")
    notifier = PromptNotifier(NotifyConfig(wall=True), broken)
    assert await notifier.prompt_opened(prompt()) == []


def test_session_parsing() -> None:
    assert parse_sessions(LIST) == ["2", "5", "c3", "7", "9"]
    assert parse_sessions("") == []
    props = parse_session(SHOW["2"])
    assert graphical_user(props) is not None
    assert graphical_user({**props, "User": "x"}) is None
    assert graphical_user({**props, "Type": "tty"}) is None


async def test_default_runner_reports_a_missing_program() -> None:
    from client.ask.notify import run_command
    assert (await run_command(["/nonexistent/flotilla-notify"]))[0] == 127
    assert await run_command(["sh", "-c", "echo hi"]) == (0, "hi\n")
