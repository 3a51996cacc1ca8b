"""Steering a rollout through the event log: abort and continue.

Shared by `fleetctl rollout abort|continue` and the web dashboard. Both only append to
the event log; the driving controller polls it and acts within a second.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from controller.rollout.driver import DriverLock
from controller.state import store
from controller.state.eventlog import EventLog
from protocol import outcomes
from protocol.errors import InputError, UsageError


@dataclass(frozen=True)
class AbortOutcome:
    rollout_id: str
    already_requested: bool
    driver_running: bool


@dataclass(frozen=True)
class ContinueOutcome:
    rollout_id: str
    batch: int  # 0-based
    batches: int


def existing_log(log: EventLog) -> EventLog:
    if not log.exists():
        raise InputError(f"no controller state at {log.path} (set --state-dir or "
                         "FLEET_STATE_DIR); nothing was deployed from here yet")
    return log


def running(doc: dict[str, Any], ident: str) -> dict[str, Any]:
    """The rollout `ident` (a unique prefix will do), which must still be running."""
    r = store.find_rollout(doc, ident)
    if r.get("status") != "running":
        raise UsageError(f"rollout {r['id']} already finished ({r.get('status')})")
    return r


def request_abort(log: EventLog, ident: str, by: str) -> AbortOutcome:
    with existing_log(log).transaction() as txn:
        r = running(txn.doc, ident)
        already = bool(r.get("abort_requested"))
        if not already:
            txn.add("abort-requested", store.request_abort(r["id"], by))
    driven = DriverLock(log.dir, r["id"]).held_elsewhere()
    return AbortOutcome(r["id"], already, driven)


def release_batch(log: EventLog, ident: str, batch: int | None = None) -> ContinueOutcome:
    """Release batch `batch` (1-based; default: the next one) of a --confirm-batches
    rollout."""
    with existing_log(log).transaction() as txn:
        r = running(txn.doc, ident)
        if not r.get("policy", {}).get("rollout", {}).get("confirm_batches"):
            raise UsageError(f"rollout {r['id']} does not wait for confirmation "
                             "(it was not started with --confirm-batches)")
        total = int(r.get("batches", 0))
        if batch is not None:
            if not 2 <= batch <= total:
                raise UsageError(f"--batch must be between 2 and {total} for rollout {r['id']}")
            index: int | None = batch - 1
        else:
            index = store.next_batch_to_continue(r)
            if index is None:
                raise UsageError(f"rollout {r['id']} has no batch left to release")
        assert index is not None
        txn.add("batch-continued", store.continue_batch(txn.doc, r["id"], index))
    return ContinueOutcome(r["id"], index, total)


def driven(log: EventLog, rollout_id: str) -> bool:
    """True while some fleetctl process drives the rollout (holds its lock)."""
    return DriverLock(log.dir, rollout_id).held_elsewhere()


def with_driver(log: EventLog, row: dict[str, Any]) -> dict[str, Any]:
    """`row` plus `driven`: for a running rollout, whether a fleetctl process drives it
    now (None once it finished)."""
    running = row["status"] in ("running", "aborting")
    return {**row, "driven": driven(log, row["id"]) if running else None}


def undriven_note(rollout_id: str) -> str:
    return (f"no controller is driving rollout {rollout_id}: "
            f"`fleetctl rollout resume {rollout_id}`")


def close_if_complete(log: EventLog, rollout_id: str,
                      seen: dict[str, tuple[str, str]] | None = None) -> str | None:
    """Close a running rollout nobody drives once every host has a result (from the log,
    or `seen` {host: (result, message)} learnt from the broker by `watch`): record the
    results and the rollout's final status. Returns that status, or None if left open."""
    if not log.exists() or driven(log, rollout_id):
        return None
    with log.transaction() as txn:
        r = txn.doc.get("rollouts", {}).get(rollout_id)
        if r is None or r.get("status") != "running":
            return None
        results: dict[str, str] = {}
        for h, hr in r.get("hosts", {}).items():
            if hr.get("result") is not None:
                results[h] = hr["result"]
            elif seen and h in seen and hr.get("deployment_id") is not None:
                result, message = seen[h]
                txn.add(f"host-{result}", store.host_update(txn.doc, rollout_id, h, result,
                                                            message))
                results[h] = result
            else:
                return None
        status = "aborted" if r.get("abort_requested") or r.get("abort_reason") else \
            outcomes.rollout_result(results.values())
        txn.add("rollout-finished", store.finish_rollout(rollout_id, status))
    return status
