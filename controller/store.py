"""The controller document kept in the event log, and the patches that change it.

Document shape (JSON):
    {_type, version,
     hosts:    {HOST: {generation, deployment_id, rollout_id, result, system}},
     rollouts: {ID: {id, selector, system, action, status, created, finished, policy,
                     hosts: {HOST: {generation, deployment_id, status, result, message,
                                    attempts, started, finished, batch}}}}}
Functions here are pure: they take the current document and return RFC 6902 ops.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

from controller.eventlog import Patch, escape

TERMINAL = {"succeeded", "failed", "rolled_back", "rejected", "cancelled", "blocked",
            "timed_out", "skipped"}


def new_rollout_id(now: float | None = None) -> str:
    t = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now or time.time()))
    return f"r{t}-{secrets.token_hex(3)}"


def host_generation(doc: dict[str, Any], host: str) -> int:
    return int(doc.get("hosts", {}).get(host, {}).get("generation", 0))


def create_rollout(doc: dict[str, Any], rollout_id: str, selector: str, system: str,
                   action: str, policy: dict[str, Any], batches: list[list[str]]) -> Patch:
    hosts = {h: {"generation": None, "deployment_id": None, "status": "pending",
                 "result": None, "message": "", "attempts": 0, "started": None,
                 "finished": None, "batch": i}
             for i, batch in enumerate(batches) for h in batch}
    value = {"id": rollout_id, "selector": selector, "system": system, "action": action,
             "status": "running", "created": time.time(), "finished": None,
             "policy": policy, "batches": len(batches), "hosts": hosts}
    return [{"op": "add", "path": f"/rollouts/{escape(rollout_id)}", "value": value}]


def start_host(doc: dict[str, Any], rollout_id: str, host: str, deployment_id: str
               ) -> tuple[int, Patch]:
    """Assign the host its next generation for this rollout attempt."""
    generation = host_generation(doc, host) + 1
    r = f"/rollouts/{escape(rollout_id)}/hosts/{escape(host)}"
    attempts = int(doc["rollouts"][rollout_id]["hosts"][host]["attempts"]) + 1
    entry = {"generation": generation, "deployment_id": deployment_id,
             "rollout_id": rollout_id, "result": None,
             "system": doc.get("hosts", {}).get(host, {}).get("system")}
    patch: Patch = [
        {"op": "add", "path": f"/hosts/{escape(host)}", "value": entry},
        {"op": "replace", "path": f"{r}/generation", "value": generation},
        {"op": "replace", "path": f"{r}/deployment_id", "value": deployment_id},
        {"op": "replace", "path": f"{r}/status", "value": "published"},
        {"op": "replace", "path": f"{r}/attempts", "value": attempts},
        {"op": "replace", "path": f"{r}/started", "value": time.time()},
    ]
    return generation, patch


def host_update(doc: dict[str, Any], rollout_id: str, host: str, status: str,
                message: str = "", system: str | None = None) -> Patch:
    r = f"/rollouts/{escape(rollout_id)}/hosts/{escape(host)}"
    cur = doc["rollouts"][rollout_id]["hosts"][host]
    patch: Patch = []
    if cur["status"] != status:
        patch.append({"op": "replace", "path": f"{r}/status", "value": status})
    if status in TERMINAL:
        patch += [{"op": "replace", "path": f"{r}/result", "value": status},
                  {"op": "replace", "path": f"{r}/message", "value": message[:500]},
                  {"op": "replace", "path": f"{r}/finished", "value": time.time()}]
        h = doc.get("hosts", {}).get(host)
        if h is not None and h.get("deployment_id") == cur["deployment_id"]:
            patch.append({"op": "replace", "path": f"/hosts/{escape(host)}/result",
                          "value": status})
            if status == "succeeded" and system is not None:
                patch.append({"op": "replace", "path": f"/hosts/{escape(host)}/system",
                              "value": system})
    return patch


def finish_rollout(rollout_id: str, status: str) -> Patch:
    r = f"/rollouts/{escape(rollout_id)}"
    return [{"op": "replace", "path": f"{r}/status", "value": status},
            {"op": "replace", "path": f"{r}/finished", "value": time.time()}]


def set_rollout_field(rollout_id: str, key: str, value: Any) -> Patch:
    return [{"op": "add", "path": f"/rollouts/{escape(rollout_id)}/{escape(key)}",
             "value": value}]
