"""`fleetctl status`: retained HostState and online flags, read to the end."""

from __future__ import annotations

from typing import Any

from controller.follow.reader import MessageReader
from controller.mqtt.connection import connect, read_retained
from controller.rollout.driver import ControllerContext
from protocol.models import HostState, Prompt


async def fetch_states(ctx: ControllerContext, hosts: list[str]) -> list[dict[str, Any]]:
    t = ctx.topics
    async with connect(ctx.broker, **ctx.client_kwargs) as client:
        messages = await read_retained(
            client, t, [t.all_hosts("state"), t.all_hosts("online"), t.all_hosts("prompt")])
    states: dict[str, HostState] = {}
    online: dict[str, bool] = {}
    prompts: dict[str, Prompt] = {}
    reader = MessageReader(t)
    for m in messages:
        payload = m.payload if isinstance(m.payload, bytes) else b""
        msg = reader.read(str(m.topic), payload)
        if msg is None:
            continue
        if msg.online is not None:
            online[msg.host] = msg.online
        elif isinstance(msg.body, HostState):
            states[msg.host] = msg.body
        elif isinstance(msg.body, Prompt):
            prompts[msg.host] = msg.body
    return [host_row(h, states.get(h), online.get(h, False), prompts.get(h),
                     reader.unreadable.get((h, "state"))) for h in hosts]


def host_row(host: str, st: HostState | None, online: bool, prompt: Prompt | None,
             error: str | None = None) -> dict[str, Any]:
    """One host as `fleetctl status --json` (and the web API) show it. `error`: why its
    retained state could not be read (shown as phase `unreadable`, not as "no data")."""
    row: dict[str, Any] = {
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
    if st is None and error is not None:
        row.update(phase="unreadable", message=error, error=error)
    return row
