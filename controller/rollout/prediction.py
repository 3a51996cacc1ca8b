"""`fleetctl deploy --check`: fold CheckReports into a fleet go/no-go verdict (pure)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from rich.console import Console

from controller.follow.view import HostView


def go_no_go(views: Iterable[HostView]) -> dict[str, Any]:
    hosts: list[dict[str, Any]] = []
    go = True
    for v in views:
        row: dict[str, Any] = {"host": v.host, "errors": [], "warnings": [],
                               "recommendations": [], "open_choices": []}
        for item in v.check_items:
            entry = {"step": item.step, "id": item.id, "message": item.message}
            bucket = {"error": "errors", "warning": "warnings",
                      "recommendation": "recommendations"}[item.severity]
            row[bucket].append(entry)
            if item.key in v.open_choices:
                row["open_choices"].append(entry)
        if not v.checked:
            row["errors"].append({"step": "-", "id": "no-report",
                                  "message": f"no check report ({v.result or v.phase}: "
                                             f"{v.message})"})
        if row["errors"] or v.result not in ("succeeded", None):
            go = False
        hosts.append(row)
    return {"go": go and bool(hosts), "hosts": hosts}


def print_prediction(console: Console, verdict: dict[str, Any]) -> None:
    from rich.table import Table
    t = Table(show_header=True, header_style="bold")
    for col in ("host", "errors", "warnings", "recommendations", "open choices"):
        t.add_column(col)
    for h in verdict["hosts"]:
        def cell(items: list[dict[str, str]]) -> str:
            return "\n".join(f"{i['step']}.{i['id']}: {i['message']}" for i in items) or "-"
        t.add_row(h["host"], cell(h["errors"]), cell(h["warnings"]),
                  cell(h["recommendations"]), cell(h["open_choices"]))
    console.print(t)
    console.print("[bold green]GO[/]" if verdict["go"] else "[bold red]NO-GO[/]")
