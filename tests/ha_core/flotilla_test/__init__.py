"""Test-only control channel into a real Home Assistant core (runs inside HA's own python).

A Unix socket speaking JSON lines, so the test suite (another venv, another pydantic)
can call HA services and read HA's state machine and entity registry:

  {"op": "ready"}                          -> {"ok": true, "mqtt": <connected>}
  {"op": "states"}                         -> {"ok": true, "states": [State.as_dict()...]}
  {"op": "entity_id", "domain": D, "unique_id": U}   -> {"ok": true, "entity_id": ...|null}
  {"op": "call", "domain": D, "service": S, "data": {...}}  -> {"ok": true}
  {"op": "stop"}                           -> {"ok": true}, then HA shuts down

Errors are `{"ok": false, "error": "Type: message"}`; the channel never closes on one.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from homeassistant.components import mqtt
from homeassistant.const import EVENT_HOMEASSISTANT_STOP
from homeassistant.core import Event, HomeAssistant
from homeassistant.helpers import entity_registry as er

DOMAIN = "flotilla_test"
log = logging.getLogger(__name__)


async def _answer(hass: HomeAssistant, req: dict[str, Any]) -> dict[str, Any]:
    op = req.get("op")
    if op == "ready":
        return {"ok": True, "mqtt": mqtt.is_connected(hass)}
    if op == "states":
        return {"ok": True, "states": [s.as_dict() for s in hass.states.async_all()]}
    if op == "entity_id":
        entity_id = er.async_get(hass).async_get_entity_id(req["domain"], "mqtt",
                                                           req["unique_id"])
        return {"ok": True, "entity_id": entity_id}
    if op == "call":
        await hass.services.async_call(req["domain"], req["service"], req.get("data") or {},
                                       blocking=True)
        return {"ok": True}
    if op == "stop":
        hass.async_create_task(hass.async_stop())
        return {"ok": True}
    return {"ok": False, "error": f"unknown op {op!r}"}


async def async_setup(hass: HomeAssistant, config: dict[str, Any]) -> bool:
    path = config[DOMAIN]["socket"]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                try:
                    out = await _answer(hass, json.loads(line))
                except Exception as exc:  # reported to the test, never fatal here
                    out = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
                writer.write(json.dumps(out, default=str).encode() + b"\n")
                await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_unix_server(handle, path)

    async def close(_event: Event) -> None:
        server.close()

    hass.bus.async_listen_once(EVENT_HOMEASSISTANT_STOP, close)
    log.info("flotilla test control channel on %s", path)
    return True
