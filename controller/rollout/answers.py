"""Reading open prompts and sending signed answers: shared by `fleetctl prompts|answer|
approve` and the web dashboard (`fleetctl serve`), so both sign exactly the same way."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiomqtt

from controller.follow.reader import MessageReader
from controller.mqtt.connection import (
    connect,
    messages_until,
    new_marker,
    read_retained,
    subscribe_and_sync,
)
from controller.rollout.driver import ControllerContext
from protocol.codec import decode, encode
from protocol.errors import ProtocolError, UsageError
from protocol.models import Answer, Cancel, Progress, Prompt, Rejected
from protocol.prompts import fmt_time
from protocol.signing import sign
from protocol.topics import Topics

ANSWER_WAIT_S = 10.0


async def open_prompts(ctx: ControllerContext, hosts: list[str]) -> dict[str, Prompt]:
    """The retained open prompt of each of `hosts` that has one."""
    t = ctx.topics
    async with connect(ctx.broker, **ctx.client_kwargs) as client:
        messages = await read_retained(client, t, [t.all_hosts("prompt")])
    return prompts_in(t, messages, set(hosts))


def prompts_in(topics: Topics, messages: list[aiomqtt.Message], hosts: set[str]
               ) -> dict[str, Prompt]:
    """The prompts of `hosts` among retained `prompt` messages (an empty one: none)."""
    prompts: dict[str, Prompt] = {}
    reader = MessageReader(topics)
    for m in messages:
        payload = m.payload if isinstance(m.payload, bytes) else b""
        msg = reader.read(str(m.topic), payload, hosts.__contains__)
        if msg is not None and isinstance(msg.body, Prompt):
            prompts[msg.host] = msg.body
    return prompts


def prompt_row(host: str, p: Prompt) -> dict[str, Any]:
    """One prompt as `fleetctl prompts --json` (and the web API) show it."""
    return {"host": host, "prompt_id": p.prompt_id, "kind": p.kind, "deadline": p.deadline,
            "items": [{"step": i.step, "id": i.id, "message": i.message,
                       "severity": i.severity,
                       "choices": [c.model_dump() for c in i.choices], "default": i.default}
                      for i in p.items]}


def check_choices(prompt: Prompt, choices: dict[str, str]) -> None:
    """UsageError unless every STEP.ITEM names an item of `prompt` and one of its choices
    (the agent checks again; this gives a clear message before anything is sent)."""
    items = {i.key: i for i in prompt.items}
    for key, choice in choices.items():
        item = items.get(key)
        if item is None:
            raise UsageError(f"prompt {prompt.prompt_id} has no item {key!r}")
        if choice not in {c.id for c in item.choices}:
            raise UsageError(f"{key}: {choice!r} is not one of "
                             f"{', '.join(c.id for c in item.choices) or 'no choices'}")


def destructive_choices(prompt: Prompt, choices: dict[str, str]) -> list[str]:
    """The `STEP.ITEM=CHOICE` picks among `choices` that are marked destructive."""
    out = []
    for item in prompt.items:
        for c in item.choices:
            if choices.get(item.key) == c.id and c.destructive:
                out.append(f"{item.key}={c.id}")
    return out


async def send_answer(ctx: ControllerContext, host: str, prompt_id: str,
                      choices: dict[str, str], approve: bool, answered_by: str
                      ) -> tuple[bool, str]:
    """Publish a signed answer and wait briefly to learn whether the agent took it."""
    if ctx.key is None:
        raise UsageError("no signing key: run `fleetctl keys init`")
    t = ctx.topics
    answer = sign(Answer(host=host, prompt_id=prompt_id, choices=choices, approve=approve,
                         answered_by=answered_by, issued_at=time.time()), ctx.key)
    async with connect(ctx.broker, **ctx.client_kwargs) as client:
        # The host's retained prompt says whether anyone waits for this answer. An agent
        # reads answers only while a deployment is active: one for a prompt that was
        # answered or whose deployment ended would go unheard, so it is refused here.
        # The same subscriptions then follow what the agent does with the answer.
        marker = new_marker(t)
        await subscribe_and_sync(client, [t.prompt(host), t.events(host)], marker)
        retained = [m for m in await messages_until(client, marker)
                    if str(m.topic) == t.prompt(host)]
        current = prompts_in(t, retained, {host}).get(host)
        if current is None or current.prompt_id != prompt_id:
            now = f"; its open prompt is {current.prompt_id}" if current is not None else \
                " (answered already, or its deployment ended)"
            return False, f"prompt {prompt_id} is not open on {host}{now}"
        await client.publish(t.answer(host), encode(answer), qos=1)
        try:
            return await asyncio.wait_for(_outcome(client, t.prompt(host), prompt_id),
                                          ANSWER_WAIT_S)
        except TimeoutError:
            return True, "sent; the host has not confirmed yet (offline?)"


async def _outcome(client: aiomqtt.Client, prompt_topic: str, prompt_id: str
                   ) -> tuple[bool, str]:
    async for m in client.messages:
        payload = m.payload if isinstance(m.payload, bytes) else b""
        if str(m.topic) == prompt_topic:
            if m.retain:
                continue  # the state before our answer
            if not payload:
                return True, "accepted"
            try:
                p: Prompt = decode(payload, expect=(Prompt,))
            except ProtocolError:
                continue
            if p.prompt_id != prompt_id:
                return True, "accepted"
            continue
        try:
            ev: Any = decode(payload)
        except ProtocolError:
            continue
        if isinstance(ev, Rejected) and ev.reason == "answer_refused" \
                and prompt_id in ev.message:
            return False, ev.message
        if isinstance(ev, Progress) and ev.prompt_id == prompt_id and ev.deferred_until:
            return True, f"deferred until {fmt_time(ev.deferred_until)}"  # the prompt stays
    return False, "connection closed"


async def send_cancel(ctx: ControllerContext, hosts: list[str], reason: str,
                      cancelled_by: str) -> None:
    """`fleetctl cancel`: withdraw each host's retained desired state (it never starts if
    it has not yet) and send a signed Cancel on its answer topic (QoS 1: an offline host
    gets it when it is back), which ends the running deployment's wait."""
    if ctx.key is None:
        raise UsageError("no signing key: run `fleetctl keys init`")
    t = ctx.topics
    async with connect(ctx.broker, **ctx.client_kwargs) as client:
        for host in hosts:
            cancel = sign(Cancel(host=host, reason=reason, cancelled_by=cancelled_by,
                                 issued_at=time.time()), ctx.key)
            await client.publish(t.desired(host), b"", qos=1, retain=True)
            await client.publish(t.answer(host), encode(cancel), qos=1)
