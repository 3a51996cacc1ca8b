"""`fleetctl status`: retained HostState and online flags, read to the end."""

from __future__ import annotations

from typing import Any

from controller.connection import connect, read_retained
from controller.deploy import ControllerContext
from protocol.codec import decode
from protocol.errors import ProtocolError
from protocol.models import HostState, Prompt


async def fetch_states(ctx: ControllerContext, hosts: list[str]) -> list[dict[str, Any]]:
    t = ctx.topics
    async with connect(ctx.broker, **ctx.client_kwargs) as client:
        messages = await read_retained(
            client, t, [t.all_hosts("state"), t.all_hosts("online"), t.all_hosts("prompt")])
    states: dict[str, HostState] = {}
    online: dict[str, bool] = {}
    prompts: dict[str, Prompt] = {}
    for m in messages:
        try:
            host, kind = t.parse(str(m.topic))
        except ProtocolError:
            continue
        payload = m.payload if isinstance(m.payload, bytes) else b""
        if kind == "online":
            online[host] = payload == b"online"
        elif kind == "state" and payload:
            try:
                states[host] = decode(payload, expect=(HostState,))
            except ProtocolError:
                continue
        elif kind == "prompt" and payload:
            try:
                prompts[host] = decode(payload, expect=(Prompt,))
            except ProtocolError:
                continue
    return [host_row(h, states.get(h), online.get(h, False), prompts.get(h)) for h in hosts]


def host_row(host: str, st: HostState | None, online: bool, prompt: Prompt | None
             ) -> dict[str, Any]:
    """One host as `fleetctl status --json` (and the web API) show it."""
    return {
        "host": host,
        "online": online,
        "system": st.system if st else None,
        "generation": st.generation if st else 0,
        "phase": st.phase if st else None,
        "result": st.last_result if st else None,
        "needs_reboot": st.needs_reboot if st else False,
        "deployment": st.deployment_id if st else None,
        "message": st.message if st else "",
        "open_prompt": prompt.prompt_id if prompt is not None else None,
        "updated_at": st.updated_at if st else None,
    }
