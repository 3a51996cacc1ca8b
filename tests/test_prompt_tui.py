"""`fleet-agent prompt` (issue 6): a real terminal (pexpect) against a real control socket."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest

from client.ask import prompt_tui as tui
from client.ask.control import ControlServer, socket_path
from protocol.models import Choice, HostState, Prompt, ReportItem

REPO = Path(__file__).resolve().parents[1]
HOST = "web1"


def choice_prompt(deadline: float | None = None) -> Prompt:
    return Prompt(
        host=HOST, prompt_id="p-7", deployment_id="d-7", generation=7, created_at=time.time(),
        deadline=deadline,
        items=[
            ReportItem(step="postgres", id="major", severity="warning",
                       message="PostgreSQL 15 -> 16 needs a data migration",
                       choices=[Choice(id="migrate", label="Migrate in place",
                                       description="runs pg_upgrade; keeps all data"),
                                Choice(id="fresh", label="Start empty",
                                       description="drops every database", destructive=True)],
                       default="migrate"),
            ReportItem(step="nextcloud", id="apps", severity="recommendation",
                       message="3 apps are incompatible",
                       choices=[Choice(id="disable"), Choice(id="keep")], default="disable"),
            ReportItem(step="nginx", id="tls", severity="warning", message="old ciphers used"),
        ])


class Agent:
    """AgentControl for the terminal tests; records what arrives."""

    def __init__(self, prompts: list[Prompt]) -> None:
        self.prompts = prompts
        self.answers: list[tuple[str, dict[str, str], str]] = []
        self.approvals: list[str] = []
        self.refuse: str | None = None

    async def list_prompts(self) -> list[Prompt]:
        return list(self.prompts)

    async def answer(self, prompt_id: str, choices: dict[str, str],
                     source: str) -> tuple[bool, str]:
        if self.refuse:
            return False, self.refuse
        self.answers.append((prompt_id, choices, source))
        return True, f"{prompt_id} answered"

    async def approve(self, source: str, defer: str | None = None) -> tuple[bool, str]:
        self.approvals.append(source)
        return True, "deployment approved"

    async def status(self) -> HostState:
        return HostState(host=HOST, phase="idle", updated_at=1.0)


class ServerThread:
    """The control socket served from its own event loop, so tests may block freely."""

    def __init__(self, state_dir: Path, agent: Agent) -> None:
        self.path = socket_path(state_dir)
        self.agent = agent
        self.ready = threading.Event()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stop_event: asyncio.Event | None = None
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.stop_event = asyncio.Event()
        async with ControlServer(self.path, self.agent, group=None):
            self.ready.set()
            await self.stop_event.wait()

    def __enter__(self) -> ServerThread:
        self.thread.start()
        assert self.ready.wait(10), "control server did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.loop is not None and self.stop_event is not None
        self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(10)


@pytest.fixture
def agent() -> Agent:
    return Agent([choice_prompt(deadline=time.time() + 3600)])


@pytest.fixture
def server(tmp_path: Path, agent: Agent) -> Iterator[ServerThread]:
    with ServerThread(tmp_path, agent) as s:
        yield s


def spawn(state_dir: Path) -> pexpect.spawn:
    child = pexpect.spawn(sys.executable, ["-m", "client", "prompt", "--state-dir",
                                           str(state_dir)], cwd=str(REPO), encoding="utf-8",
                          timeout=15, dimensions=(40, 160))
    return child


def finish(child: pexpect.spawn) -> int:
    child.expect(pexpect.EOF)
    child.close()
    assert "Traceback" not in (child.before or "")
    return int(child.exitstatus)


def script(state_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "client", "prompt", "--state-dir",
                           str(state_dir), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=30, stdin=subprocess.DEVNULL)


# -- interactive, through a pseudo-terminal --------------------------------------------------

def test_interactive_answer_with_a_destructive_choice(tmp_path: Path, server: ServerThread,
                                                      agent: Agent) -> None:
    child = spawn(tmp_path)
    child.expect(r"Host web1: prompt p-7 \(choice\) for deployment d-7, generation 7")
    child.expect(r"Deadline: .* \(in (59m|1h 00m)")
    child.expect(r"note nginx.tls \(warning\): old ciphers used")
    child.expect(r"\[1/2\] postgres.major \(warning\): PostgreSQL 15 -> 16")
    child.expect(r"1\) migrate - Migrate in place \(default\)")
    child.expect("runs pg_upgrade; keeps all data")
    child.expect(r"2\) fresh - Start empty  \[DESTRUCTIVE\]")
    child.expect("drops every database")
    child.expect(r"Choice for postgres.major \[Enter = migrate\]: ")
    child.sendline("7")  # out of range: asked again
    child.expect("please type a number 1-2 or a choice id")
    child.expect(r"Choice for postgres.major \[Enter = migrate\]: ")
    child.sendline("2")
    child.expect(r"\[2/2\] nextcloud.apps")
    child.expect(r"Choice for nextcloud.apps \[Enter = disable\]: ")
    child.sendline("")  # the default
    child.expect("postgres.major = fresh")
    child.expect("nextcloud.apps = disable")
    child.expect("This includes DESTRUCTIVE choices: postgres.major=fresh")
    child.expect("Type 'yes' to send these answers: ")
    child.sendline("yes")
    child.expect("accepted: p-7 answered")
    assert finish(child) == 0
    [(prompt_id, choices, source)] = agent.answers
    assert (prompt_id, choices) == ("p-7", {"postgres.major": "fresh",
                                            "nextcloud.apps": "disable"})
    assert source.startswith("local:")  # who answered, from the socket's peer credentials


def test_interactive_defaults_and_plain_confirmation(tmp_path: Path, server: ServerThread,
                                                     agent: Agent) -> None:
    child = spawn(tmp_path)
    child.expect(r"Choice for postgres.major \[Enter = migrate\]: ")
    child.sendline("")
    child.expect(r"Choice for nextcloud.apps \[Enter = disable\]: ")
    child.sendline("keep")  # a choice id works as well as a number
    child.expect(r"Send these answers\? \[y/N\] ")
    child.sendline("y")
    child.expect("accepted:")
    assert finish(child) == 0
    assert agent.answers[0][1] == {"postgres.major": "migrate", "nextcloud.apps": "keep"}


def test_interactive_cancel_sends_nothing(tmp_path: Path, server: ServerThread,
                                          agent: Agent) -> None:
    child = spawn(tmp_path)
    child.expect("Choice for postgres.major")
    child.sendline("2")
    child.expect("Choice for nextcloud.apps")
    child.sendline("1")
    child.expect("Type 'yes' to send these answers: ")
    child.sendline("y")  # not "yes": a destructive choice needs the whole word
    child.expect("cancelled: nothing was sent")
    assert finish(child) == 1
    assert agent.answers == []


def test_interactive_told_when_someone_else_answered_first(tmp_path: Path,
                                                           server: ServerThread,
                                                           agent: Agent) -> None:
    agent.refuse = "already answered by homeassistant"
    child = spawn(tmp_path)
    child.expect("Choice for postgres.major")
    child.sendline("")
    child.expect("Choice for nextcloud.apps")
    child.sendline("")
    child.expect(r"Send these answers\? \[y/N\] ")
    child.sendline("y")
    child.expect("refused: already answered by homeassistant")
    assert finish(child) == 1


def test_interactive_approval(tmp_path: Path) -> None:
    approval = Prompt(host=HOST, prompt_id="a-1", deployment_id="d-9", generation=9,
                      kind="approval", created_at=time.time())
    agent = Agent([approval])
    with ServerThread(tmp_path, agent):
        child = spawn(tmp_path)
        child.expect(r"prompt a-1 \(approval\) for deployment d-9")
        child.expect(r"Approve deployment d-9\? \[y/N\] ")
        child.sendline("y")
        child.expect("accepted: deployment approved")
        assert finish(child) == 0
    assert len(agent.approvals) == 1


def test_interactive_nothing_open(tmp_path: Path) -> None:
    with ServerThread(tmp_path, Agent([])):
        child = spawn(tmp_path)
        child.expect(r"No open prompts on web1 \(phase: idle\)\.")
        assert finish(child) == 0


def test_ctrl_d_cancels(tmp_path: Path, server: ServerThread, agent: Agent) -> None:
    child = spawn(tmp_path)
    child.expect("Choice for postgres.major")
    child.sendeof()
    child.expect("cancelled: nothing was sent")
    assert finish(child) == 1
    assert agent.answers == []


# -- scripted ---------------------------------------------------------------------------------

def test_scripted_answer_accepted(tmp_path: Path, server: ServerThread, agent: Agent) -> None:
    r = script(tmp_path, "--answer", "p-7", "postgres.major=migrate", "nextcloud.apps=keep")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "accepted: p-7 answered\n"
    assert agent.answers[0][:2] == ("p-7", {"postgres.major": "migrate",
                                            "nextcloud.apps": "keep"})


@pytest.mark.parametrize(("args", "rc", "stream", "text"), [
    (["--answer", "p-7", "postgres.major=nope"], 1, "stdout",
     "refused: postgres.major has no choice nope (choices: migrate, fresh)\n"),
    (["--answer", "p-8", "postgres.major=migrate"], 1, "stdout",
     "refused: no open prompt p-8 (open: p-7)\n"),
    (["--answer", "p-7", "nginx.tls=x"], 1, "stdout", "refused: prompt p-7 has no open item"),
    (["--answer", "p-7"], 2, "stderr", "needs PROMPT_ID and at least one STEP.ITEM=CHOICE"),
    (["--answer", "p-7", "postgres.major"], 2, "stderr", "expected STEP.ITEM=CHOICE"),
    (["--answer", "p-7", "x=1", "--approve"], 2, "stderr", "not allowed with argument"),
    ([], 2, "stderr", "stdin is not a terminal"),
])
def test_scripted_refusals_and_usage(tmp_path: Path, server: ServerThread, agent: Agent,
                                     args: list[str], rc: int, stream: str, text: str) -> None:
    r = script(tmp_path, *args)
    assert r.returncode == rc, (r.stdout, r.stderr)
    out = r.stdout if stream == "stdout" else r.stderr
    assert text in out
    assert "Traceback" not in r.stdout + r.stderr
    assert agent.answers == []


def test_scripted_refused_by_the_agent(tmp_path: Path, server: ServerThread,
                                       agent: Agent) -> None:
    agent.refuse = "already answered by admin@controller"
    r = script(tmp_path, "--answer", "p-7", "postgres.major=migrate")
    assert (r.returncode, r.stdout) == (1, "refused: already answered by admin@controller\n")


def test_scripted_approve(tmp_path: Path, server: ServerThread, agent: Agent) -> None:
    r = script(tmp_path, "--approve")
    assert (r.returncode, r.stdout) == (0, "accepted: deployment approved\n")


def test_no_agent_is_one_line_exit_3(tmp_path: Path) -> None:
    r = script(tmp_path, "--answer", "p-7", "a.b=c")
    assert r.returncode == 3
    assert r.stderr.count("\n") == 1 and "no control socket at" in r.stderr


# -- pure helpers -----------------------------------------------------------------------------

def test_parse_pairs() -> None:
    assert tui.parse_pairs(["p", "a.b=c", "d.e=f"]) == ("p", {"a.b": "c", "d.e": "f"})
    for bad in (["p"], ["a.b=c", "d.e=f"], ["p", "=c"], ["p", "a.b="], ["p", "a=1", "a=2"]):
        with pytest.raises(tui.Usage):
            tui.parse_pairs(bad)


def test_pick_choice() -> None:
    item = choice_prompt().items[0]
    assert tui.pick_choice(item, "") == "migrate"
    assert tui.pick_choice(item, " 2 ") == "fresh"
    assert tui.pick_choice(item, "fresh") == "fresh"
    assert tui.pick_choice(item, "3") is None and tui.pick_choice(item, "Fresh") is None
    no_default = choice_prompt().items[1].model_copy(update={"default": None})
    assert tui.pick_choice(no_default, "") is None


def test_deadline_line() -> None:
    p = choice_prompt(deadline=10_000.0)
    assert "(in 1h 00m)" in (tui.deadline_line(p, 10_000.0 - 3600) or "")
    assert "(in 5m 00s)" in (tui.deadline_line(p, 10_000.0 - 300) or "")
    assert "(passed 30s ago)" in (tui.deadline_line(p, 10_030.0) or "")
    assert tui.deadline_line(choice_prompt(), 0) is None
