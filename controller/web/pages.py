"""What the dashboard shows, as plain data: pure functions of the feed's folded state.

The JSON API returns these dicts; the HTML pages render them. Field names follow the
`--json` output of the matching commands (`fleetctl status`, `rollouts`, `rollout
show`, `prompts`), with a few additions the pages need (tags, live phase label,
progress, short system hash).
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from controller.follow.monitor import phase_label
from controller.follow.status import host_row
from controller.follow.view import HostView
from controller.rollout import steer as rollout_ops
from controller.rollout.answers import prompt_row
from controller.state import logs, store
from controller.state.inventory import Inventory
from controller.web.feed import Feed, HostLive
from protocol.outcomes import counts_as_failure

SORT_KEYS = ("host", "phase", "generation", "online", "result", "updated")
MAX_FAILURES = 20
LOG_LINES = 5


def short_system(system: str | None) -> str:
    """`/nix/store/<32-char hash>-name` -> the first 8 characters of the hash."""
    if not system:
        return "-"
    base = system.rstrip("/").rsplit("/", 1)[-1]
    head, _, _ = base.partition("-")
    return head[:8] if len(head) == 32 else base[:16]


def fleet_host(h: HostLive) -> dict[str, Any]:
    row = host_row(h.host, h.state, bool(h.online), h.prompt)
    v = h.view
    label = row["phase"] or "no state"
    percent = h.state.percent if h.state else None
    step = h.state.step if h.state else None
    if v is not None:
        label, percent, step = phase_label(v), v.percent, v.step
        if v.result is not None:
            row["result"] = v.result
            row["needs_reboot"] = row["needs_reboot"] or v.needs_reboot
            percent = None
        if v.message:
            row["message"] = v.message
        row["deployment"] = v.deployment_id
    if h.online is None:
        row["online"] = False
    row.update({"tags": list(h.tags), "phase": label, "percent": percent, "step": step,
                "rollout": h.rollout_id, "system_short": short_system(row["system"]),
                "prompt_kind": h.prompt.kind if h.prompt else None})
    return row


def select_hosts(feed: Feed, inventory: Inventory, selector: str | None) -> list[HostLive]:
    """Hosts named by `selector` (InputError for a bad one), all without."""
    names = inventory.resolve(selector) if selector else list(inventory.hosts)
    return [feed.hosts[n] for n in names if n in feed.hosts]


def sort_rows(rows: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    def k(r: dict[str, Any]) -> tuple[Any, ...]:
        if key == "phase":
            return (r["phase"], r["host"])
        if key == "generation":
            return (-(r["generation"] or 0), r["host"])
        if key == "online":
            return (bool(r["online"]), r["host"])
        if key == "result":
            return (r["result"] or "", r["host"])
        if key == "updated":
            return (-(r["updated_at"] or 0), r["host"])
        return (r["host"],)
    return sorted(rows, key=k)


def phase_counts(rows: list[dict[str, Any]]) -> list[tuple[str, int]]:
    return sorted(Counter(r["phase"] for r in rows).items())


def rollout_list(feed: Feed) -> list[dict[str, Any]]:
    """Newest first."""
    return [rollout_ops.with_driver(feed.log, store.rollout_row(r))
            for r in reversed(store.rollouts_by_age(feed.doc))]


def _live_view(feed: Feed, host: str, deployment_id: str | None) -> HostView | None:
    h = feed.hosts.get(host)
    if h is None or h.view is None or deployment_id is None:
        return None
    return h.view if h.view.deployment_id == deployment_id else None


def rollout_hosts(feed: Feed, r: dict[str, Any], now: float | None = None
                  ) -> list[dict[str, Any]]:
    """Each host of rollout `r`: the event log's record, made live by the host's view."""
    now = now or time.time()
    out = []
    for host, hr in r.get("hosts", {}).items():
        v = _live_view(feed, host, hr.get("deployment_id"))
        status = hr.get("result") or (phase_label(v) if v is not None else hr.get("status"))
        started, finished = hr.get("started"), hr.get("finished")
        if finished is None and v is not None and v.result is not None:
            finished = v.finished
        elapsed = None if started is None else max(0.0, (finished or now) - started)
        out.append({
            "host": host, "batch": int(hr.get("batch", 0)) + 1, "status": status,
            "result": hr.get("result") or (v.result if v is not None else None),
            "generation": hr.get("generation"), "deployment_id": hr.get("deployment_id"),
            "attempts": hr.get("attempts", 0),
            "percent": v.percent if v is not None and v.result is None else None,
            "message": hr.get("message") or (v.message if v is not None else ""),
            "started": started, "finished": finished,
            "elapsed": None if elapsed is None else round(elapsed, 1),
            "log_tail": list(v.log_tail[-5:]) if v is not None else [],
        })
    return out


def batch_bars(r: dict[str, Any], hosts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_host = {h["host"]: h for h in hosts}
    bars = []
    for i, members in enumerate(store.host_batches(r)):
        rows = [by_host[m] for m in members if m in by_host]
        finished = sum(1 for m in rows if m["result"] is not None)
        failed = sum(1 for m in rows if counts_as_failure(m["result"]))
        running = sum(1 for m in rows if m["result"] is None and m["deployment_id"])
        total = len(rows)
        starts = [m["started"] for m in rows if m["started"] is not None]
        bars.append({"batch": i + 1, "total": total, "finished": finished, "failed": failed,
                     "running": running, "started": min(starts) if starts else None,
                     "percent": round(100.0 * finished / total, 1) if total else 100.0,
                     "done_at": r.get("batch_done", {}).get(str(i))})
    return bars


def rollout_page(feed: Feed, r: dict[str, Any]) -> dict[str, Any]:
    """`fleetctl rollout show --json`, plus the live per-host picture and batch bars."""
    hosts = rollout_hosts(feed, r)
    failures = [h for h in hosts if counts_as_failure(h["result"])]
    failures.sort(key=lambda h: -(h["finished"] or 0))
    for h in failures[:MAX_FAILURES]:
        stored = failure_log(feed, r["id"], h["host"], h["deployment_id"])
        if stored:
            h["log_tail"] = stored
    detail = rollout_ops.with_driver(feed.log, store.rollout_detail(r))
    return {**detail, "live": hosts, "batch_bars": batch_bars(r, hosts),
            "failures": failures,
            "awaiting_batch": r.get("awaiting_batch"),
            "confirm_batches": bool(r.get("policy", {}).get("rollout", {})
                                    .get("confirm_batches"))}


def failure_log(feed: Feed, rollout_id: str, host: str, deployment_id: str | None
                ) -> list[str]:
    """The last lines of the host's deployment log, as `fleetctl logs` shows them."""
    return [logs.format_line(rec) for rec in logs.tail(feed.ctx.state_dir, rollout_id, host,
                                                       LOG_LINES, deployment_id)]


def host_log(feed: Feed, h: HostLive, n: int = 15) -> list[str]:
    """The last lines of the host's current (or last) deployment's stored log."""
    dep = h.view.deployment_id if h.view is not None else None
    if dep is None:
        return []
    return [logs.format_line(rec) for rec in logs.tail(feed.ctx.state_dir, logs.rollout_of(dep),
                                                       h.host, n, dep)]


def host_prompt(h: HostLive) -> dict[str, Any] | None:
    return prompt_row(h.host, h.prompt) if h.prompt is not None else None
