"""Issue 11 item 7: a latest-value (QoS 0) message whose handler fails is handled again."""

from __future__ import annotations

import asyncio

import aiomqtt

from client.receive.session import AgentSession, Backoff, Retained
from protocol.broker import parse_broker_url


def session(handler):  # type: ignore[no-untyped-def]
    s = AgentSession(parse_broker_url("mqtt://127.0.0.1:1"), "c", [], handler,
                     Retained("t/online", b""), retry_latest=("t/desired",))
    s.retry_backoff = Backoff(base=0.01, cap=0.05)
    return s


def message(topic: str, payload: bytes) -> aiomqtt.Message:
    return aiomqtt.Message(topic, payload, 0, False, 1, None)


async def test_a_failed_latest_value_message_is_handled_again_until_it_succeeds() -> None:
    calls: list[bytes] = []
    done = asyncio.Event()

    async def handler(m: aiomqtt.Message) -> None:
        calls.append(bytes(m.payload))  # type: ignore[arg-type]
        if len(calls) < 3:
            raise OSError("journal: no space left")
        done.set()

    s = session(handler)
    await s._dispatch(None, message("t/desired", b"gen-1"))  # type: ignore[arg-type]
    await asyncio.wait_for(done.wait(), 30)
    assert calls == [b"gen-1"] * 3


async def test_a_newer_message_replaces_a_pending_retry_and_other_topics_are_not_retried(
        ) -> None:
    calls: list[bytes] = []
    newer = asyncio.Event()

    async def handler(m: aiomqtt.Message) -> None:
        calls.append(bytes(m.payload))  # type: ignore[arg-type]
        if m.payload == b"gen-2":
            newer.set()
            return
        raise OSError("transient")

    s = session(handler)
    s.retry_backoff = Backoff(base=5.0, cap=5.0)  # the retry would come much later
    await s._dispatch(None, message("t/answer", b"a"))  # type: ignore[arg-type]
    await s._dispatch(None, message("t/desired", b"gen-1"))  # type: ignore[arg-type]
    assert set(s._retries) == {"t/desired"}
    await s._dispatch(None, message("t/desired", b"gen-2"))  # type: ignore[arg-type]
    await asyncio.wait_for(newer.wait(), 30)
    assert s._retries == {}
    assert calls == [b"a", b"gen-1", b"gen-2"]
