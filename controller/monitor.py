"""Live progress rendering (rich) and plain summaries for `deploy` and `watch`."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable

from rich.console import Console, Group
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from controller.view import HostView

PHASE_STYLE = {"succeeded": "green", "failed": "red", "rolled_back": "yellow",
               "timed_out": "red", "rejected": "red", "awaiting_choice": "magenta",
               "awaiting_approval": "magenta", "cancelled": "dim", "skipped": "dim"}
MAX_ROWS = 25


def phase_label(v: HostView) -> str:
    if v.result is not None:
        return v.result
    if v.phase in ("awaiting_choice", "choose"):
        return "awaiting choice"
    if v.phase == "migrate" and v.step:
        return f"migrating {v.step}"
    if v.deployment_id is None:
        return "not started"
    if v.online is False and v.phase == "published":
        return "offline (queued)"
    return v.phase


def render(views: Iterable[HostView], title: str, batches: list[list[str]] | None = None,
           now: float | None = None) -> Group:
    now = now or time.time()
    hosts = list(views)
    counts = Counter(phase_label(v) for v in hosts)
    done = sum(1 for v in hosts if v.result is not None)
    parts: list[object] = [Text(f"{title}  {done}/{len(hosts)} finished", style="bold")]
    for i, batch in enumerate(batches or []):
        members = [v for v in hosts if v.host in set(batch)]
        finished = sum(1 for v in members if v.result is not None)
        row = Table.grid(padding=(0, 1))
        row.add_row(Text(f"batch {i + 1:>2}"), ProgressBar(total=len(members), completed=finished,
                                                           width=30),
                    Text(f"{finished}/{len(members)}"))
        parts.append(row)
    parts.append(Text("  ".join(f"{k}: {n}" for k, n in sorted(counts.items()))))
    table = Table(show_header=True, header_style="bold", expand=False)
    for col in ("host", "phase", "progress", "elapsed", "message"):
        table.add_column(col)
    active = sorted(hosts, key=lambda v: (v.result is not None, -v.elapsed(now)))
    for v in active[:MAX_ROWS]:
        label = phase_label(v)
        pct = f"{v.percent:.0f}%" if v.percent is not None else ""
        table.add_row(v.host, Text(label, style=PHASE_STYLE.get(label, "")), pct,
                      f"{v.elapsed(now):.1f}s", v.message[:60])
    if len(hosts) > MAX_ROWS:
        table.caption = f"{len(hosts) - MAX_ROWS} more hosts not shown (slowest first)"
    parts.append(table)
    failures = [v for v in hosts if v.result not in (None, "succeeded", "skipped")][-5:]
    for v in failures:
        parts.append(Text(f"✗ {v.host}: {v.message}", style="red"))
        for line in v.log_tail[-3:]:
            parts.append(Text(f"    {line}", style="dim"))
    return Group(*parts)  # type: ignore[arg-type]


def print_summary(console: Console, views: Iterable[HostView], status: str,
                  duration: float) -> None:
    hosts = list(views)
    c = Counter(v.result or "not started" for v in hosts)
    console.print(f"[bold]rollout {status}[/] in {duration:.1f}s: "
                  + ", ".join(f"{k} {n}" for k, n in sorted(c.items())))
    for v in hosts:
        if v.result not in ("succeeded", None, "skipped"):
            console.print(f"  {v.host}: {v.result}: {v.message}")
