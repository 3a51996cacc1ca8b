"""Live progress rendering (rich) and plain summaries for `deploy`, `resume` and `watch`.

`render` is O(hosts) (plus sorting the hosts shown), so refreshing it a few times a
second stays cheap at fleet scale: it shows at most MAX_BATCH_ROWS batch bars (finished
batches collapse into one line), counts by phase, the slowest running hosts, and the
most recent failures with their last log lines.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable
from typing import Any

from rich.console import Console, Group
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from controller.follow.view import HostView
from protocol.outcomes import counts_as_failure

PHASE_STYLE = {"succeeded": "green", "failed": "red", "rolled_back": "yellow",
               "timed_out": "red", "rejected": "red", "awaiting choice": "magenta",
               "awaiting approval": "magenta", "awaiting reboot": "magenta",
               "awaiting decision": "magenta", "cancelled": "dim", "skipped": "dim",
               "not started": "dim", "offline (queued)": "yellow"}
MAX_ROWS = 15
MAX_BATCH_ROWS = 6
MAX_FAILURES = 5
LOG_LINES = 5  # last output lines of each failed host in the final summary


def plural(n: int, word: str) -> str:
    """`1 host`, `2 hosts`, `1 batch`, `3 batches`."""
    if n == 1:
        return f"{n} {word}"
    return f"{n} {word}es" if word.endswith(("s", "ch", "sh", "x")) else f"{n} {word}s"


def refresh_interval(hosts: int) -> float:
    """Seconds between live redraws: a redraw is O(hosts), keep it a small CPU share."""
    return 0.2 if hosts <= 1000 else min(2.0, 0.2 * hosts / 1000)


AWAITING = {"choice": "awaiting choice", "approval": "awaiting approval",
            "reboot": "awaiting reboot", "step_failure": "awaiting decision"}
MAX_HINTS = 5


def phase_label(v: HostView) -> str:
    if v.result is not None:
        return v.result
    if v.prompt_id is not None:
        return AWAITING.get(v.prompt_kind or "choice", "awaiting choice")
    if v.phase == "awaiting_choice":
        return "awaiting choice"
    if v.phase == "awaiting_approval":
        return "awaiting approval"
    if v.phase in ("migrate", "migrating") and v.step:
        return f"migrating {v.step}"
    if v.deployment_id is None:
        return "not started"
    if v.online is not True and v.phase == "published":
        return "offline (queued)"
    return v.phase


def answer_hint(v: HostView) -> str | None:
    """The exact command that answers what this host waits for (None if it waits not)."""
    if v.result is not None or v.prompt_id is None:
        return None
    h, pid = v.host, v.prompt_id
    if v.prompt_kind == "approval":
        return f"{h} awaits approval: fleetctl approve {h}"
    if v.prompt_kind == "reboot":
        return f"{h} awaits a reboot decision: fleetctl answer {h} {pid} deploy.reboot=now|later"
    if v.prompt_kind == "step_failure":
        return (f"{h}: a migration failed: fleetctl answer {h} {pid} STEP.failed="
                "retry|skip|rollback (fleetctl prompts " + h + " names the steps)")
    wanted = set(v.open_choices)
    items = [i for i in v.check_items if i.choices and (not wanted or i.key in wanted)]
    args = " ".join(f"{i.key}={'|'.join(c.id for c in i.choices)}" for i in items) \
        or "STEP.ITEM=CHOICE"
    return f"{h} awaits a choice: fleetctl answer {h} {pid} {args} (fleetctl prompts {h})"


def answer_hints(hosts: Iterable[HostView]) -> list[str]:
    hints = [x for x in (answer_hint(v) for v in hosts) if x is not None]
    if len(hints) > MAX_HINTS:
        return [*hints[:MAX_HINTS], f"… and {len(hints) - MAX_HINTS} more waiting: "
                                    "fleetctl prompts lists them all"]
    return hints


class ChangeTracker:
    """Which hosts changed deployment, phase or result since they were last reported:
    one line per host change for `watch` and `deploy` when stdout is not a terminal."""

    def __init__(self) -> None:
        self._emitted: dict[str, tuple[str | None, str, str | None]] = {}

    def changes(self, views: Iterable[HostView]) -> list[HostView]:
        out = []
        for v in views:
            key = (v.deployment_id, phase_label(v), v.result)
            if self._emitted.get(v.host) != key:
                self._emitted[v.host] = key
                out.append(v)
        return out


def host_line(rollout_id: str, v: HostView) -> dict[str, Any]:
    """One JSON line per host change (`watch --json`, `deploy --json --stream`)."""
    return {"type": "host", "rollout": rollout_id, "host": v.host,
            "deployment_id": v.deployment_id, "generation": v.generation,
            "phase": phase_label(v), "result": v.result, "online": v.online,
            "message": v.message, "prompt_id": v.prompt_id, "answer": answer_hint(v),
            "elapsed": round(v.elapsed(), 3), "time": time.time()}


def plain_line(v: HostView) -> str:
    """One timestamped line per host change when stdout is not a terminal."""
    line = f"{time.strftime('%H:%M:%S')} {v.host} {phase_label(v)} {v.message}".rstrip()
    hint = answer_hint(v)
    return f"{line}\n{time.strftime('%H:%M:%S')}   {hint}" if hint else line


def _bar(label: str, total: int, finished: int, failed: int) -> Table:
    row = Table.grid(padding=(0, 1))
    extra = f" ({failed} failed)" if failed else ""
    row.add_row(Text(label), ProgressBar(total=max(total, 1), completed=finished, width=30),
                Text(f"{finished}/{total}{extra}"))
    return row


def render(views: Iterable[HostView], title: str, batches: list[list[str]] | None = None,
           now: float | None = None, notes: list[str] | None = None) -> Group:
    now = now or time.time()
    hosts = list(views)
    by_host = {v.host: v for v in hosts}
    counts = Counter(phase_label(v) for v in hosts)
    done = sum(1 for v in hosts if v.result is not None)
    parts: list[object] = [Text(f"{title}  {done}/{len(hosts)} finished", style="bold")]
    # Batch bars: finished batches collapse into one line; show the active ones.
    stats = []
    for i, batch in enumerate(batches or []):
        members = [by_host[h] for h in batch if h in by_host]
        finished = sum(1 for m in members if m.result is not None)
        failed = sum(1 for m in members if counts_as_failure(m.result))
        started = any(m.deployment_id is not None or m.result is not None for m in members)
        stats.append((i, len(members), finished, failed, started))
    complete = [s for s in stats if s[2] == s[1]]
    if len(complete) > 1:
        parts.append(_bar(f"{plural(len(complete), 'batch')} done", sum(s[1] for s in complete),
                          sum(s[2] for s in complete), sum(s[3] for s in complete)))
        stats = [s for s in stats if s[2] != s[1]]
    shown = stats[:MAX_BATCH_ROWS]
    for i, total, finished, failed, _started in shown:
        parts.append(_bar(f"batch {i + 1:>2}", total, finished, failed))
    if len(stats) > len(shown):
        rest = stats[len(shown):]
        parts.append(Text(f"  … {plural(len(rest), 'more batch')}, "
                          f"{plural(sum(s[1] for s in rest), 'host')}",
                          style="dim"))
    parts.append(Text("  ".join(f"{k}: {n}" for k, n in sorted(counts.items()))))
    for note in [*(notes or []), *answer_hints(hosts)]:
        parts.append(Text(note, style="bold yellow"))
    # Slowest running hosts first, then the most recently finished.
    running = sorted((v for v in hosts if v.result is None and v.deployment_id is not None),
                     key=lambda v: -v.elapsed(now))
    table = Table(show_header=True, header_style="bold", expand=False)
    for col in ("host", "phase", "progress", "elapsed", "message"):
        table.add_column(col)
    rows = running[:MAX_ROWS]
    if len(rows) < MAX_ROWS:
        recent = sorted((v for v in hosts if v.result is not None),
                        key=lambda v: -(v.finished or 0))
        rows += recent[:MAX_ROWS - len(rows)]
    for v in rows:
        label = phase_label(v)
        pct = f"{v.percent:.0f}%" if v.percent is not None else ""
        table.add_row(v.host, Text(label, style=PHASE_STYLE.get(label, "")), pct,
                      f"{v.elapsed(now):.1f}s", v.message[:60])
    if len(hosts) > len(rows):
        table.caption = (f"{len(running)} running (slowest first); "
                         f"{plural(len(hosts) - len(rows), 'more host')} not shown")
    parts.append(table)
    failures = sorted((v for v in hosts if counts_as_failure(v.result)),
                      key=lambda v: -(v.finished or 0))[:MAX_FAILURES]
    for v in failures:
        parts.append(Text(f"✗ {v.host}: {v.result}: {v.message}", style="red"))
        for line in v.log_tail[-3:]:
            parts.append(Text(f"    {line}", style="dim"))
    return Group(*parts)  # type: ignore[arg-type]


def print_summary(console: Console, views: Iterable[HostView], status: str,
                  duration: float) -> None:
    hosts = list(views)
    c = Counter(v.result or "not started" for v in hosts)
    console.print(f"[bold]rollout {status}[/] in {duration:.1f}s: "
                  + ", ".join(f"{k} {n}" for k, n in sorted(c.items())))
    failed = [v for v in hosts if counts_as_failure(v.result)]
    for v in failed[:20]:
        console.print(f"  {v.host}: {v.result}: {v.message}", markup=False)
        for line in v.log_tail[-LOG_LINES:]:
            console.print(f"      {line}", style="dim", markup=False, highlight=False)
    if len(failed) > 20:
        console.print(f"  … and {len(failed) - 20} more")
