"""The controller document kept in the event log, and the patches that change it.

Document shape (JSON):
    {_type, version,
     hosts:    {HOST: {generation, deployment_id, rollout_id, result, system}},
     rollouts: {ID: {id, selector, system, action, status, created, finished, policy,
                     batches, continued, batch_done, awaiting_batch, abort_requested,
                     abort_reason,
                     hosts: {HOST: {generation, deployment_id, status, result, message,
                                    attempts, started, finished, batch}}}}}

`rollouts[ID].status` is running, succeeded, failed, aborted or timed_out; a host's
`status` is pending, published or its result. `hosts[HOST].generation` is the last
generation this controller gave the host (the next one is above it and above what the
broker says the host has seen: `next_generation`).
Functions here are pure: they take the current document and return RFC 6902 ops;
`shape.py` checks every entry against this shape as the log applies it.
"""

from __future__ import annotations

import difflib
import secrets
import time
from typing import Any

from controller.state.eventlog import Patch, escape
from protocol.errors import InputError, StateError, UnknownRolloutError
from protocol.models import MAX_GENERATION
from protocol.outcomes import COUNT_KEYS, count_key, is_finished


def new_rollout_id(now: float | None = None) -> str:
    t = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now or time.time()))
    return f"r{t}-{secrets.token_hex(3)}"


def deployment_id(rollout_id: str, attempt: int) -> str:
    """Attempt 1 deploys as the rollout id, a retry n as `ROLLOUT.n`."""
    return rollout_id if attempt <= 1 else f"{rollout_id}.{attempt}"


def host_generation(doc: dict[str, Any], host: str) -> int:
    return int(doc.get("hosts", {}).get(host, {}).get("generation", 0))


def next_generation(logged: int, seen: int = 0) -> int:
    """The generation a host is given next: above the last this log gave it (`logged`)
    and above the highest the broker says the host has seen (`seen`: its retained state
    and desired state, 0 when the broker holds neither). A log restored from an older
    backup is behind the host, whose agent refuses a generation not above the last it
    took (`stale_generation`)."""
    return max(logged, seen) + 1


def _r(rollout_id: str) -> str:
    return f"/rollouts/{escape(rollout_id)}"


def _rh(rollout_id: str, host: str) -> str:
    return f"{_r(rollout_id)}/hosts/{escape(host)}"


def create_rollout(doc: dict[str, Any], rollout_id: str, selector: str, system: str,
                   action: str, policy: dict[str, Any], batches: list[list[str]]) -> Patch:
    hosts = {h: {"generation": None, "deployment_id": None, "status": "pending",
                 "result": None, "message": "", "attempts": 0, "started": None,
                 "finished": None, "batch": i}
             for i, batch in enumerate(batches) for h in batch}
    value = {"id": rollout_id, "selector": selector, "system": system, "action": action,
             "kind": rollout_kind(policy), "status": "running", "created": time.time(),
             "finished": None,
             "policy": policy, "batches": len(batches), "continued": [], "batch_done": {},
             "awaiting_batch": None, "abort_requested": None, "abort_reason": None,
             "hosts": hosts}
    return [{"op": "add", "path": _r(rollout_id), "value": value}]


def rollout_kind(policy: dict[str, Any]) -> str:
    """deploy, check (`deploy --check`) or rollback (`fleetctl rollback`)."""
    if policy.get("check_only"):
        return "check"
    return "rollback" if policy.get("rollback") else "deploy"


def start_host(doc: dict[str, Any], rollout_id: str, host: str, attempt: int,
               now: float | None = None, seen: int = 0) -> tuple[str, int, Patch]:
    """Assign the host its next generation for this rollout attempt (write-ahead: the
    driver appends this before it publishes); `seen` is the highest generation the
    broker says the host has seen. Returns (deployment id, generation, ops)."""
    dep = deployment_id(rollout_id, attempt)
    generation = next_generation(host_generation(doc, host), seen)
    if generation > MAX_GENERATION:
        raise StateError(f"host {host!r} has no generation left: its retained state on the "
                         f"broker claims {seen:,}, the largest there is; find out who "
                         "published it (the ACL lets only the host), then clear it")
    r = _rh(rollout_id, host)
    before = doc.get("hosts", {}).get(host, {})
    if rollout_kind(doc["rollouts"][rollout_id].get("policy", {})) == "check":
        # A check uses up a generation (agents want them increasing) but is no deploy:
        # the host's last deployment, result and system stay as they were.
        entry = {"deployment_id": None, "rollout_id": None, "result": None, "system": None,
                 **before, "generation": generation}
    else:
        entry = {"generation": generation, "deployment_id": dep, "rollout_id": rollout_id,
                 "result": None, "system": before.get("system")}
    # Two operations per host (not one per field): 10,000 hosts start in one append.
    rollout_host = {**doc["rollouts"][rollout_id]["hosts"][host],
                    "generation": generation, "deployment_id": dep, "status": "published",
                    "result": None, "message": "", "attempts": attempt,
                    "started": now or time.time(), "finished": None}
    patch: Patch = [
        {"op": "add", "path": f"/hosts/{escape(host)}", "value": entry},
        {"op": "replace", "path": r, "value": rollout_host},
    ]
    return dep, generation, patch


def host_update(doc: dict[str, Any], rollout_id: str, host: str, status: str,
                message: str = "", system: str | None = None) -> Patch:
    r = _rh(rollout_id, host)
    cur = doc["rollouts"][rollout_id]["hosts"][host]
    patch: Patch = []
    if cur["status"] != status:
        patch.append({"op": "replace", "path": f"{r}/status", "value": status})
    if is_finished(status):
        patch += [{"op": "replace", "path": f"{r}/result", "value": status},
                  {"op": "replace", "path": f"{r}/message", "value": message[:500]},
                  {"op": "replace", "path": f"{r}/finished", "value": time.time()}]
        h = doc.get("hosts", {}).get(host)
        if h is not None and cur["deployment_id"] is not None \
                and h.get("deployment_id") == cur["deployment_id"]:
            patch.append({"op": "replace", "path": f"/hosts/{escape(host)}/result",
                          "value": status})
            if status == "succeeded" and system is not None:
                patch.append({"op": "replace", "path": f"/hosts/{escape(host)}/system",
                              "value": system})
    return patch


def finish_rollout(rollout_id: str, status: str) -> Patch:
    return [{"op": "replace", "path": f"{_r(rollout_id)}/status", "value": status},
            {"op": "replace", "path": f"{_r(rollout_id)}/finished", "value": time.time()},
            {"op": "replace", "path": f"{_r(rollout_id)}/awaiting_batch", "value": None}]


def set_rollout_field(rollout_id: str, key: str, value: Any) -> Patch:
    return [{"op": "add", "path": f"{_r(rollout_id)}/{escape(key)}", "value": value}]


def batch_done(rollout_id: str, index: int, at: float) -> Patch:
    return [{"op": "add", "path": f"{_r(rollout_id)}/batch_done/{index}", "value": at}]


def continue_batch(doc: dict[str, Any], rollout_id: str, index: int) -> Patch:
    r = doc["rollouts"][rollout_id]
    if index in r.get("continued", []):
        return []
    patch: Patch = []
    if "continued" not in r:
        patch.append({"op": "add", "path": f"{_r(rollout_id)}/continued", "value": []})
    patch.append({"op": "add", "path": f"{_r(rollout_id)}/continued/-", "value": index})
    return patch


def request_abort(rollout_id: str, by: str, now: float | None = None) -> Patch:
    return set_rollout_field(rollout_id, "abort_requested",
                             {"time": now or time.time(), "by": by})


# -- reading -----------------------------------------------------------------------------

def rollout_counts(r: dict[str, Any]) -> dict[str, int]:
    counts: dict[str, int] = dict.fromkeys((*COUNT_KEYS, "running"), 0)
    for h in r.get("hosts", {}).values():
        counts[count_key(h.get("result"), h.get("deployment_id") is not None)] += 1
    return counts


def display_status(r: dict[str, Any]) -> str:
    """A rollout's status as shown: `aborting` while an abort request is winding it down."""
    status = str(r.get("status"))
    if status == "running" and r.get("abort_requested"):
        return "aborting"
    return status


def rollouts_by_age(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return sorted(doc.get("rollouts", {}).values(), key=lambda r: r.get("created", 0))


def rollout_row(r: dict[str, Any]) -> dict[str, Any]:
    """One rollout as `fleetctl rollouts --json` (and the web API) list it."""
    return {"id": r["id"], "selector": r.get("selector"), "system": r.get("system"),
            "kind": rollout_kind(r.get("policy", {})), "status": display_status(r),
            "counts": rollout_counts(r),
            "hosts": len(r.get("hosts", {})), "created": r.get("created"),
            "finished": r.get("finished")}


def rollout_detail(r: dict[str, Any]) -> dict[str, Any]:
    """One rollout as `fleetctl rollout show --json` (and the web API) show it."""
    return {**r, "status": display_status(r), "counts": rollout_counts(r)}


def host_batches(r: dict[str, Any]) -> list[list[str]]:
    """The rollout's batches (host lists), rebuilt from each host's batch index."""
    out: list[list[str]] = [[] for _ in range(int(r.get("batches", 0)))]
    for h, hr in r.get("hosts", {}).items():
        i = int(hr.get("batch", 0))
        while i >= len(out):
            out.append([])
        out[i].append(h)
    return out


def find_rollout(doc: dict[str, Any], ident: str) -> dict[str, Any]:
    """A rollout by id or unique id prefix; UnknownRolloutError listing close matches
    (InputError if the prefix is ambiguous)."""
    rollouts: dict[str, Any] = doc.get("rollouts", {})
    if ident in rollouts:
        return dict(rollouts[ident])
    matches = [rid for rid in rollouts if rid.startswith(ident)]
    if len(matches) == 1:
        return dict(rollouts[matches[0]])
    if len(matches) > 1:
        raise InputError(f"rollout id {ident!r} is ambiguous: "
                         f"{', '.join(sorted(matches)[:5])}")
    close = difflib.get_close_matches(ident, list(rollouts), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else \
        ("; `fleetctl rollouts` lists them" if rollouts else "; no rollouts recorded yet")
    raise UnknownRolloutError(f"unknown rollout {ident!r}{hint}")


def latest_rollout(doc: dict[str, Any], running_only: bool = False) -> dict[str, Any] | None:
    rollouts = [r for r in doc.get("rollouts", {}).values()
                if not running_only or r.get("status") == "running"]
    return max(rollouts, key=lambda r: r.get("created", 0), default=None)


def superseded_by(doc: dict[str, Any], hosts: list[str]) -> dict[str, list[str]]:
    """The running rollouts a deploy to `hosts` takes hosts from: rollout id -> its hosts
    among `hosts` that have not finished there (a newer deployment supersedes them: they
    end cancelled in it)."""
    wanted = set(hosts)
    out: dict[str, list[str]] = {}
    for r in rollouts_by_age(doc):
        if r.get("status") != "running":
            continue
        taken = sorted(h for h, hr in r.get("hosts", {}).items()
                       if h in wanted and hr.get("result") is None)
        if taken:
            out[str(r["id"])] = taken
    return out


def next_batch_to_continue(r: dict[str, Any]) -> int | None:
    """The batch `fleetctl rollout continue` releases: the one the driver waits for,
    else the first later batch that has not started and is not released yet."""
    continued = set(r.get("continued", []))
    waiting = r.get("awaiting_batch")
    if waiting is not None and waiting not in continued:
        return int(waiting)
    started = {int(hr.get("batch", 0)) for hr in r.get("hosts", {}).values()
               if hr.get("deployment_id") is not None or hr.get("result") is not None}
    for i in range(1, int(r.get("batches", 0))):
        if i not in continued and i not in started:
            return i
    return None
