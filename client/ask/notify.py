"""Tell the people on a host that a deploy waits for them (off by default: servers).

- desktop: `notify-send` to every logged-in local graphical user (x11/wayland
  sessions from `loginctl`), run as that user with their session bus
  (`DBUS_SESSION_BUS_ADDRESS=unix:path=/run/user/UID/bus`) through `runuser`;
- terminal: one `wall` message.

Both name the command that answers (`fleet-agent prompt`). Commands go through an
injectable async runner, so tests check the exact argv without running anything,
and a missing program or a failing command is logged, never raised: a notification
must not be able to break a deploy.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from protocol.models import Prompt

log = logging.getLogger(__name__)

Runner = Callable[[Sequence[str]], Awaitable[tuple[int, str]]]
GRAPHICAL = frozenset({"x11", "wayland", "mir"})
COMMAND_TIMEOUT = 10.0


@dataclass(frozen=True)
class NotifyConfig:
    desktop: bool = False
    wall: bool = False
    command: str = "fleet-agent prompt"
    """What a person runs to answer (add --state-dir if the agent uses another one)."""

    @property
    def enabled(self) -> bool:
        return self.desktop or self.wall


@dataclass(frozen=True)
class GraphicalUser:
    name: str
    uid: int


async def run_command(argv: Sequence[str]) -> tuple[int, str]:
    """Default runner: (exit status, stdout); 127 when the program is missing."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
    except FileNotFoundError:
        return 127, ""
    try:
        out, err = await asyncio.wait_for(proc.communicate(), COMMAND_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return 124, ""
    if proc.returncode:
        log.debug("%s exited %s: %s", argv[0], proc.returncode, err.decode(errors="replace"))
    return proc.returncode or 0, out.decode(errors="replace")


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M %Z", time.localtime(ts))


def prompt_message(prompt: Prompt, command: str) -> tuple[str, str]:
    """(title, body) naming what is asked, the deadline and the command to answer."""
    title = f"Flotilla: {prompt.host} needs a decision"
    if prompt.kind == "approval":
        lead = (f"Deployment {prompt.deployment_id} waits for approval.\nNot now? "
                f"{command} --defer defer-1h|defer-tonight|defer-tomorrow")
    else:
        keys = [i.key for i in prompt.items if i.choices]
        lead = (f"Deployment {prompt.deployment_id} waits for {len(keys)} choice(s): "
                + ", ".join(keys) + ".") if keys else f"Deployment {prompt.deployment_id} asks."
    lines = [lead]
    if prompt.deadline is not None:
        lines.append(f"Deadline: {_when(prompt.deadline)}.")
    lines.append(f"Answer with: {command}")
    return title, "\n".join(lines)


def parse_sessions(list_output: str) -> list[str]:
    """Session ids from `loginctl list-sessions --no-legend` (first column)."""
    ids = []
    for line in list_output.splitlines():
        fields = line.split()
        if fields and fields[0].isalnum():
            ids.append(fields[0])
    return ids


def parse_session(show_output: str) -> dict[str, str]:
    """KEY=VALUE lines of `loginctl show-session`."""
    props = {}
    for line in show_output.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            props[key.strip()] = value.strip()
    return props


def graphical_user(props: dict[str, str]) -> GraphicalUser | None:
    """The session's user if it is a local, live graphical session."""
    if props.get("Type") not in GRAPHICAL or props.get("Remote") == "yes":
        return None
    if props.get("State") not in (None, "active", "online"):
        return None
    try:
        uid = int(props["User"])
    except (KeyError, ValueError):
        return None
    name = props.get("Name", "")
    if not name:
        return None
    return GraphicalUser(name=name, uid=uid)


def desktop_argv(user: GraphicalUser, title: str, body: str) -> list[str]:
    return [
        "runuser", "-u", user.name, "--",
        "env", f"DBUS_SESSION_BUS_ADDRESS=unix:path=/run/user/{user.uid}/bus",
        "notify-send", "--app-name=Flotilla", "--urgency=critical",
        "--icon=system-software-update", title, body,
    ]


def wall_argv(title: str, body: str) -> list[str]:
    return ["wall", f"{title}\n{body}"]


async def graphical_users(runner: Runner) -> list[GraphicalUser]:
    """One entry per user with a local graphical session (several sessions: one entry)."""
    rc, out = await runner(["loginctl", "list-sessions", "--no-legend"])
    if rc != 0:
        log.warning("notify: loginctl list-sessions failed (%d); no desktop notifications", rc)
        return []
    users: dict[str, GraphicalUser] = {}
    for sid in parse_sessions(out):
        rc, show = await runner(["loginctl", "show-session", sid, "-p", "Name", "-p", "User",
                                 "-p", "Type", "-p", "State", "-p", "Remote"])
        if rc != 0:
            continue
        user = graphical_user(parse_session(show))
        if user is not None:
            users.setdefault(user.name, user)
    return list(users.values())


async def notify_prompt(prompt: Prompt, config: NotifyConfig,
                        runner: Runner = run_command) -> list[list[str]]:
    """Send the configured notifications; return the commands that ran successfully."""
    if not config.enabled:
        return []
    title, body = prompt_message(prompt, config.command)
    sent: list[list[str]] = []
    if config.desktop:
        for user in await graphical_users(runner):
            argv = desktop_argv(user, title, body)
            rc, _ = await runner(argv)
            if rc == 0:
                sent.append(argv)
            else:
                log.warning("notify: notify-send for %s failed (%d)", user.name, rc)
    if config.wall:
        argv = wall_argv(title, body)
        rc, _ = await runner(argv)
        if rc == 0:
            sent.append(argv)
        else:
            log.warning("notify: wall failed (%d)", rc)
    return sent


@dataclass
class PromptNotifier:
    """Notifies once per prompt id, however often the prompt is re-published."""

    config: NotifyConfig
    runner: Runner = run_command
    notified: set[str] = field(default_factory=set)

    async def prompt_opened(self, prompt: Prompt) -> list[list[str]]:
        if not self.config.enabled or prompt.prompt_id in self.notified:
            return []
        self.notified.add(prompt.prompt_id)
        try:
            return await notify_prompt(prompt, self.config, self.runner)
        except Exception:  # never let a notification break the deploy
            log.exception("notify: sending notifications for %s failed", prompt.prompt_id)
            return []
