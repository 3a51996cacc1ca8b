"""The agent's Reporter sends what someone reads: held Progress and Log events (bounded
rate, log lines riding on the next Progress or Result), folded passing phases, no empty
check reports, no needless prompt clears. Unit tests with a recording publisher, then
one real deploy through Mosquitto."""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

from client.report.reporter import Reporter
from protocol.codec import decode, encode
from protocol.models import (
    EVENT_TYPES,
    MAX_LOG_BATCH,
    Ack,
    CheckReport,
    HostState,
    Log,
    LogLine,
    Progress,
    Prompt,
    ReportItem,
    Result,
)
from protocol.topics import Topics
from tests.helpers import Listener, publish

DEP, GEN = "r1", 3
TOPICS = Topics("fleet/v1")


class Wire:
    """Records what the Reporter publishes, decoded."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Any]] = []

    async def publish(self, topic: str, payload: bytes, qos: int = 1,
                      retain: bool = False) -> None:
        kind = topic.rsplit("/", 1)[-1]
        if kind == "events":
            self.sent.append((kind, decode(payload, expect=EVENT_TYPES)))
        elif kind == "state":
            self.sent.append((kind, decode(payload, expect=(HostState,))))
        else:
            self.sent.append((kind, payload))

    def events(self) -> list[Any]:
        return [m for k, m in self.sent if k == "events"]

    def states(self) -> list[str]:
        return [m.phase for k, m in self.sent if k == "state"]

    async def wait(self, predicate: Any, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, f"timed out; sent {self.sent}"
            await asyncio.sleep(0.02)


def line(text: str) -> LogLine:
    return LogLine(time=time.time(), stream="stdout", source="fetch", text=text)


async def quick_deploy(r: Reporter) -> None:
    """What a runner reports for a deploy that takes milliseconds."""
    await r.ack(DEP, GEN)
    await r.host_state(phase="acked", deployment_id=DEP)
    await r.progress(DEP, GEN, "fetch", "fetching /nix/store/x")
    await r.event(Log, DEP, GEN, lines=[line("fetching /nix/store/x")], dropped=0)
    await r.host_state(publish=False, phase="fetched")
    await r.progress(DEP, GEN, "check", "running 0 state check(s)")
    await r.check_report(DEP, GEN, [], [], check_only=False)
    await r.progress(DEP, GEN, "switch", "switch-to-configuration switch")
    await r.event(Log, DEP, GEN, lines=[line("switch-to-configuration switch")], dropped=0)
    await r.host_state(phase="switched")
    await r.result(DEP, GEN, "succeeded", "switch to generation 3", "/nix/store/x", False,
                   ["fetching /nix/store/x", "switch-to-configuration switch"])
    await r.prompt(None)
    await r.host_state(phase="done", last_result="succeeded")


async def test_a_quick_deploy_sends_an_ack_a_result_with_its_lines_and_one_state() -> None:
    wire = Wire()
    r = Reporter("web1", TOPICS, wire.publish, epoch=1, hold=60)
    await quick_deploy(r)
    await r.close()  # whatever is still held goes out now: nothing is
    events = wire.events()
    assert [type(e) for e in events] == [Ack, Result]
    assert [ln.text for ln in events[1].lines] == ["fetching /nix/store/x",
                                                   "switch-to-configuration switch"]
    assert [e.seq for e in events] == sorted(e.seq for e in events)
    assert events[1].log_tail[-1] == "switch-to-configuration switch"
    assert wire.states() == ["done"]
    assert [k for k, _ in wire.sent].count("prompt") == 1  # unknown after start: cleared
    # the next quick deploy: no prompt was set, so none is cleared
    wire.sent.clear()
    await quick_deploy(r)
    assert [k for k, _ in wire.sent] == ["events", "events", "state"]


async def test_held_lines_ride_on_the_held_progress_one_message_a_hold() -> None:
    wire = Wire()
    r = Reporter("web1", TOPICS, wire.publish, epoch=1, hold=0.2)
    await r.ack(DEP, GEN)
    await r.progress(DEP, GEN, "fetch", "fetching /nix/store/x")
    await r.event(Log, DEP, GEN, lines=[line("copying path a")], dropped=0)
    await r.event(Log, DEP, GEN, lines=[line("copying path b")], dropped=1)
    await wire.wait(lambda: len(wire.events()) == 2)
    held = wire.events()[1]
    assert isinstance(held, Progress) and held.stage == "fetch"
    assert [ln.text for ln in held.lines] == ["copying path a", "copying path b"]
    assert held.dropped == 1
    await r.close()
    assert len(wire.events()) == 2  # nothing else was held


async def test_lines_of_another_deployment_go_as_a_log_of_their_own() -> None:
    """Held lines ride only on their own deployment's events, and are never lost."""
    wire = Wire()
    r = Reporter("web1", TOPICS, wire.publish, epoch=1, hold=60)
    await r.event(Log, "r0", 1, lines=[line("late line of r0")], dropped=0)
    await r.ack(DEP, GEN)
    await r.event(Log, DEP, GEN, lines=[line(f"l{i}") for i in range(MAX_LOG_BATCH)],
                  dropped=0)
    await r.event(Log, DEP, GEN, lines=[line("one more")], dropped=0)  # a Log is full
    await r.result(DEP, GEN, "failed", "boom", None, False, [])
    events = wire.events()
    assert [type(e) for e in events] == [Log, Ack, Log, Result]
    assert events[0].deployment_id == "r0" and events[0].lines[0].text == "late line of r0"
    assert len(events[2].lines) == MAX_LOG_BATCH
    assert [ln.text for ln in events[3].lines] == ["one more"]


async def test_progress_is_held_then_sent_latest_first_and_at_a_bounded_rate() -> None:
    wire = Wire()
    r = Reporter("web1", TOPICS, wire.publish, epoch=1, hold=0.2)
    await r.ack(DEP, GEN)
    t0 = time.monotonic()
    for i in range(50):  # a chatty fetch
        await r.progress(DEP, GEN, "fetch", f"copying path {i}", percent=float(i))
    assert [type(e) for e in wire.events()] == [Ack]
    await wire.wait(lambda: len(wire.events()) == 2)
    held = wire.events()[1]
    assert isinstance(held, Progress) and held.message == "copying path 49"
    assert time.monotonic() - t0 >= 0.2 * 0.9
    await r.progress(DEP, GEN, "switch", "switch-to-configuration switch")
    await wire.wait(lambda: len(wire.events()) == 3)
    events = wire.events()
    assert events[2].stage == "switch"
    assert events[2].time - events[1].time >= 0.2 * 0.9  # one per hold, never faster


async def test_a_held_progress_is_dropped_when_the_deployment_ends_log_lines_never() -> None:
    wire = Wire()
    r = Reporter("web1", TOPICS, wire.publish, epoch=1, hold=60)
    await r.ack(DEP, GEN)
    await r.progress(DEP, GEN, "switch", "switching")
    await r.event(Log, DEP, GEN, lines=[line("a")], dropped=0)
    await r.event(Log, DEP, GEN, lines=[line("b")], dropped=2)
    await r.result(DEP, GEN, "failed", "boom", None, False, ["a", "b"])
    await r.close()
    events = wire.events()
    assert [type(e) for e in events] == [Ack, Result]
    assert [ln.text for ln in events[1].lines] == ["a", "b"] and events[1].dropped == 2


async def test_phases_someone_waits_on_are_published_at_once_passing_ones_folded() -> None:
    wire = Wire()
    r = Reporter("web1", TOPICS, wire.publish, epoch=1, hold=60)
    seen: list[str] = []
    r.listeners.append(lambda st: seen.append(st.phase))
    await r.host_state(phase="acked", deployment_id=DEP)
    await r.host_state(phase="awaiting_choice", open_prompt="p1")
    assert wire.states() == ["awaiting_choice"]
    prompt = Prompt(host="web1", prompt_id="p1", deployment_id=DEP, generation=GEN,
                    kind="choice", items=[], created_at=time.time())
    await r.prompt(prompt)
    await r.host_state(phase="acked", open_prompt=None)
    await r.prompt(None)  # a prompt was set: it is cleared
    assert [k for k, _ in wire.sent].count("prompt") == 2
    await r.progress(DEP, GEN, "check", "running checks")  # held, then superseded:
    await r.progress(DEP, GEN, "choose", "waiting for an answer to p2", prompt=prompt)
    assert [(e.stage, e.prompt_id) for e in wire.events()] == [("choose", "p1")]
    await r.host_state(phase="awaiting_reboot")
    await r.host_state(phase="failed", last_result="failed")
    assert wire.states() == ["awaiting_choice", "awaiting_reboot", "failed"]
    assert seen == ["acked", "awaiting_choice", "acked", "awaiting_reboot", "failed"]


async def test_a_passing_phase_that_lasts_is_published_after_the_hold() -> None:
    wire = Wire()
    r = Reporter("web1", TOPICS, wire.publish, epoch=1, hold=0.1)
    await r.host_state(phase="acked", deployment_id=DEP)
    await r.host_state(phase="fetched", publish=False)
    assert wire.states() == []
    await wire.wait(lambda: wire.states() == ["fetched"])
    await r.host_state(phase="done", last_result="succeeded")
    assert wire.states() == ["fetched", "done"]


async def test_check_reports_that_say_something_are_sent() -> None:
    wire = Wire()
    r = Reporter("web1", TOPICS, wire.publish, epoch=1, hold=60)
    item = ReportItem(step="db", id="schema", severity="warning", message="old schema")
    await r.check_report(DEP, GEN, [], [], check_only=False)
    await r.check_report(DEP, GEN, [], [], check_only=True)
    await r.check_report(DEP, GEN, [item], [], check_only=False)
    reports = wire.events()
    assert [type(e) for e in reports] == [CheckReport, CheckReport]
    assert reports[0].check_only and reports[1].items == [item]


async def test_a_real_quick_deploy_sends_an_ack_and_a_result_with_its_lines(make_fleet) -> None:  # type: ignore[no-untyped-def]
    """Through Mosquitto with a real agent: what one host sends for a quick deploy."""
    fleet = make_fleet({"solo": ["web"]})
    fleet.start_simulated(["solo"])
    async with Listener(fleet.broker_url, f"{fleet.prefix}/host/solo/events") as events:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "controller", "deploy", "solo", "--system",
            "/nix/store/q-sys", "--json", env=fleet.env(), stdout=asyncio.subprocess.DEVNULL)
        assert await asyncio.wait_for(proc.wait(), 60) == 0
        await events.wait(lambda e: isinstance(e, Result))
        kinds = [type(e) for e in events.events if e.deployment_id is not None]
        result = events.events[-1]
    assert kinds[0] is Ack and kinds[-1] is Result
    # (a Progress, carrying the lines so far, only if the deploy outlasted the hold)
    assert Log not in kinds and CheckReport not in kinds and len(kinds) <= 3
    assert any("fetching /nix/store/q-sys" in ln.text for ln in result.lines)


async def test_a_stale_prompt_is_cleared_at_start_and_a_deploy_that_asks_nothing_sends_none(make_fleet) -> None:  # type: ignore[no-untyped-def]
    """A retained prompt an earlier run left behind (it stopped between its Result and
    clearing the prompt) is cleared as soon as the agent is back with nothing in
    flight, not at the end of whatever deploy comes next; after that, a deploy that
    asks nothing publishes nothing on `prompt`."""
    fleet = make_fleet({"solo": ["web"]})
    base = f"{fleet.prefix}/host/solo"
    stale = Prompt(host="solo", prompt_id="p-old", deployment_id="r0", generation=1,
                   kind="approval", created_at=time.time())
    await publish(fleet.broker_url, f"{base}/prompt", encode(stale), retain=True)
    async with Listener(fleet.broker_url, f"{base}/+") as host:
        def on(kind: str) -> list[bytes]:
            return [p for t, p in host.raw if t == f"{base}/{kind}"]

        await wait_until(lambda: on("prompt") == [encode(stale)])
        fleet.start_simulated(["solo"])
        await wait_until(lambda: on("prompt")[-1:] == [b""])  # cleared, no deploy yet
        assert on("desired") == []
        cleared = len(on("prompt"))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "controller", "deploy", "solo", "--system",
            "/nix/store/q-sys", "--json", env=fleet.env(), stdout=asyncio.subprocess.DEVNULL)
        assert await asyncio.wait_for(proc.wait(), 60) == 0
        # the final state is published after anything the deploy sent on `prompt`
        await wait_until(lambda: any(decode(p, expect=(HostState,)).last_result == "succeeded"
                                     for p in on("state")))
        assert len(on("prompt")) == cleared


async def wait_until(predicate: Any, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)
