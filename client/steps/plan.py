"""Pure planning of state steps: which items are open, which programs run, in what order.

No subprocess, no MQTT: facts (declared steps, check items, answers) in, decisions out.
"""

from __future__ import annotations

import graphlib
from dataclasses import dataclass

from protocol.models import ReportItem
from protocol.steps import ANY_CHOICE, StepDecl


@dataclass(frozen=True)
class Migration:
    step: str
    choice: str
    program: str


def open_items(items: list[ReportItem], answers: dict[str, str]) -> list[ReportItem]:
    """Items with choices nobody has answered yet."""
    return [i for i in items if i.choices and i.key not in answers]


def invalid_answers(items: list[ReportItem], answers: dict[str, str]) -> list[str]:
    """Answers naming an unknown item or a choice the item does not offer."""
    by_key = {i.key: i for i in items}
    bad = []
    for key, choice in answers.items():
        item = by_key.get(key)
        if item is not None and choice not in {c.id for c in item.choices}:
            bad.append(f"{key}={choice} (choices: {', '.join(c.id for c in item.choices)})")
    return bad


def blocking_errors(items: list[ReportItem]) -> list[ReportItem]:
    """Errors nobody can resolve by choosing: they block the deploy."""
    return [i for i in items if i.severity == "error" and not i.choices]


def migrations_for(step: StepDecl, items: list[ReportItem], answers: dict[str, str]
                   ) -> list[Migration]:
    """The programs a step runs: one per answered item (its choice's program, or '*'),
    or '*' alone when the step has no item with choices."""
    chosen = [(i.key, answers[i.key]) for i in items
              if i.step == step.name and i.choices and i.key in answers]
    if not chosen:
        program = step.migrations.get(ANY_CHOICE)
        return [Migration(step.name, "", program)] if program else []
    out = []
    for _key, choice in chosen:
        program = step.migrations.get(choice) or step.migrations.get(ANY_CHOICE)
        if program:
            out.append(Migration(step.name, choice, program))
    return out


def affected_steps(steps: list[StepDecl], items: list[ReportItem], answers: dict[str, str]
                   ) -> list[StepDecl]:
    """Stateful steps whose migrations will run: these are dumped before anything runs."""
    return [s for s in steps if s.stateful and migrations_for(s, items, answers)]


def phase_graph(steps: list[StepDecl], phase: str) -> dict[str, set[str]]:
    """Dependency graph of one phase (dependencies on other phases are already met)."""
    names = {s.name for s in steps if s.phase == phase}
    return {s.name: {d for d in s.after if d in names} for s in steps if s.phase == phase}


def dependents(graph: dict[str, set[str]], failed: str) -> set[str]:
    """Every step that (transitively) depends on `failed`."""
    out: set[str] = set()
    frontier = {failed}
    while frontier:
        nxt = {n for n, deps in graph.items() if deps & frontier and n not in out}
        out |= nxt
        frontier = nxt
    return out


def reverse_order(steps: list[StepDecl]) -> list[str]:
    """Reverse dependency order (for restoring dumps)."""
    graph = {s.name: set(s.after) & {t.name for t in steps} for s in steps}
    return list(reversed(list(graphlib.TopologicalSorter(graph).static_order())))


def cycle_error(steps: list[StepDecl]) -> str | None:
    graph = {s.name: set(s.after) for s in steps}
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as exc:
        return f"state steps form a cycle: {' -> '.join(exc.args[1])}"
    return None
