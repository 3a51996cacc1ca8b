"""Running state-step programs: checks, dumps, migrations and restores.

Decisions come from `client.steps.plan` (pure); this module runs programs through the
SystemBackend and turns every way a program can misbehave (crash, timeout, bad
JSON) into a report item or a step failure, never an agent crash.
"""

from __future__ import annotations

import asyncio
import graphlib
import json
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from client.host.backend import (
    STDOUT_CAP,
    BackendError,
    ProgramResult,
    SystemBackend,
    program_owner,
)
from client.steps.dumps import DumpStore
from client.steps.plan import Migration, dependents
from protocol.models import Desired, ReportItem
from protocol.steps import CheckOutput, StepDecl, StepsFile

STEPS_FILE = "flotilla/steps.json"
CHECK_TIMEOUT = 120.0
PROGRAM_TIMEOUT = 3600.0


def load_steps(toplevel: str) -> StepsFile:
    """The new system's declared steps; a system without the file has none."""
    path = Path(toplevel) / STEPS_FILE
    if not path.is_file():
        return StepsFile()
    try:
        return StepsFile.model_validate_json(path.read_bytes())
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise BackendError(f"{path} is invalid: {where}: {first['msg']}") from None
    except OSError as exc:
        raise BackendError(f"cannot read {path}: {exc.strerror}") from None


@dataclass
class StepEnv:
    host: str
    old_system: str | None
    desired: Desired

    def for_step(self, step: StepDecl, choice: str = "", dump_dir: str = "") -> dict[str, str]:
        return {
            "FLOTILLA_STEP": step.name, "FLOTILLA_HOST": self.host,
            "FLOTILLA_OLD_SYSTEM": self.old_system or "",
            "FLOTILLA_NEW_SYSTEM": self.desired.system, "FLOTILLA_CHOICE": choice,
            "FLOTILLA_DUMP_DIR": dump_dir,
            "FLOTILLA_GENERATION": str(self.desired.generation),
        }


def _tail(result: ProgramResult, n: int = 400) -> str:
    return result.tail_text(n)


def _leftovers(program: str, result: ProgramResult) -> str:
    n = result.leftovers
    return f"{program} left {n} background process{'es' if n != 1 else ''} behind; killed"


async def run_check(backend: SystemBackend, step: StepDecl, env: StepEnv) -> list[ReportItem]:
    """Run one check program; any misbehaviour becomes an error item."""
    assert step.check is not None

    def error(item_id: str, message: str) -> list[ReportItem]:
        return [ReportItem(step=step.name, id=item_id, severity="error", message=message)]

    try:
        result = await backend.run_program([step.check], env.for_step(step), step.user,
                                           CHECK_TIMEOUT)
    except BackendError as exc:
        return error("check-failed", str(exc))
    if result.timed_out:
        return error("check-timeout", f"check {step.check} timed out after {CHECK_TIMEOUT:.0f}s")
    left = ([ReportItem(step=step.name, id="check-left-processes", severity="warning",
                        message=_leftovers(f"check {step.check}", result))]
            if result.leftovers else [])
    if result.stdout_overflow:
        return left + error("check-output-too-large",
                            f"check {step.check} printed {result.stdout_size} bytes on stdout,"
                            f" more than the {STDOUT_CAP} a report may have")
    try:
        output = CheckOutput.model_validate_json(result.stdout or b"{}")
    except ValidationError as exc:
        first = exc.errors()[0]
        return left + error("check-invalid-output",
                            f"check {step.check} printed invalid output ({first['msg']}); "
                            f"exit {result.exit_code}: {_tail(result)}")
    items = left + [ReportItem(step=step.name, id=i.id, severity=i.severity, message=i.message,
                        choices=list(i.choices), default=i.default) for i in output.items]
    if result.exit_code != 0:
        items += error("check-failed", f"check {step.check} exited {result.exit_code}: "
                                       f"{_tail(result)}")
    return items


async def run_migration(backend: SystemBackend, step: StepDecl, m: Migration, env: StepEnv
                        ) -> str | None:
    """Run one migration program; None on success, else why it failed."""
    try:
        result = await backend.run_program([m.program], env.for_step(step, m.choice), step.user,
                                           PROGRAM_TIMEOUT)
    except BackendError as exc:
        return str(exc)
    if result.timed_out:
        return f"migration {m.program} timed out"
    if result.exit_code != 0:
        return f"migration {m.program} exited {result.exit_code}: {_tail(result)}"
    return None


async def dump_step(backend: SystemBackend, store: DumpStore, step: StepDecl, revision: str,
                    env: StepEnv) -> str:
    """Make the rollback point of one step; returns the archive path."""
    slot = store.slot(step.name, revision, env.desired.generation)
    if step.dump is not None:
        scratch = await asyncio.to_thread(store.scratch, slot, program_owner(step.user))
        result = await backend.run_program([step.dump], env.for_step(step, dump_dir=str(scratch)),
                                           step.user, PROGRAM_TIMEOUT)
        if result.exit_code != 0 or result.timed_out:
            await asyncio.to_thread(store.discard, scratch)
            raise BackendError(f"dump of {step.name} failed: {_tail(result)}")
        archive = await asyncio.to_thread(store.seal_dir, slot, scratch)
    else:
        archive = await asyncio.to_thread(store.seal_paths, slot, list(step.paths))
    return str(archive)


async def restore_step(backend: SystemBackend, store: DumpStore, step: StepDecl, archive: str,
                       env: StepEnv) -> None:
    path = Path(archive)
    if step.restore is not None:
        staging = await asyncio.to_thread(store.staging, path, program_owner(step.user))
        try:
            result = await backend.run_program([step.restore],
                                               env.for_step(step, dump_dir=str(staging)),
                                               step.user, PROGRAM_TIMEOUT)
        finally:
            await asyncio.to_thread(store.discard, staging)
        if result.exit_code != 0 or result.timed_out:
            raise BackendError(f"restore of {step.name} failed: {_tail(result)}")
    else:
        await asyncio.to_thread(store.restore_paths, path, list(step.paths))


async def run_graph(graph: dict[str, set[str]], parallel: int,
                    run: Callable[[str], Coroutine[Any, Any, bool]],
                    skip: Callable[[str, str], None]) -> None:
    """Run nodes in dependency order, up to `parallel` at once. `run` returns False on
    failure; every (transitive) dependent of a failed node is skipped, not run."""
    sorter = graphlib.TopologicalSorter(graph)
    sorter.prepare()
    doomed: dict[str, str] = {}
    running: dict[asyncio.Task[bool], str] = {}
    ready: list[str] = []
    while sorter.is_active():
        ready += sorter.get_ready()
        while ready and len(running) < parallel:
            node = ready.pop(0)
            if node in doomed:
                skip(node, doomed[node])
                sorter.done(node)
                continue
            running[asyncio.create_task(run(node), name=f"step-{node}")] = node
        if not running:
            if ready:
                continue
            break
        done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            node = running.pop(task)
            if not task.result():
                for dep in dependents(graph, node):
                    doomed.setdefault(dep, node)
            sorter.done(node)


def decode_items(raw: object) -> list[ReportItem]:
    if not isinstance(raw, list):
        return []
    return [ReportItem.model_validate(i) for i in raw]


def encode_items(items: list[ReportItem]) -> list[dict[str, object]]:
    return [json.loads(i.model_dump_json()) for i in items]
