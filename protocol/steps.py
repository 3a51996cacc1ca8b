"""The state-step declaration a system carries as `$toplevel/flotilla/steps.json`.

Module authors declare steps; the agent runs the *new* system's checks against the
current host, asks for choices, dumps, migrates and restores according to them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from protocol.models import Choice, Severity

STEP_NAME = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$"
ANY_CHOICE = "*"


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StepDecl(StrictModel):
    name: str = Field(pattern=STEP_NAME)
    after: list[str] = Field(default_factory=list)
    user: str | None = None
    phase: Literal["before-switch", "after-switch"] = "after-switch"
    revision: str = Field(default="0", pattern=r"^[A-Za-z0-9_.+-]{1,64}$")
    idempotent: bool = False
    check: str | None = None
    migrations: dict[str, str] = Field(default_factory=dict)
    dump: str | None = None
    restore: str | None = None
    paths: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _dump_pair(self) -> StepDecl:
        if (self.dump is None) != (self.restore is None):
            raise ValueError(f"step {self.name}: dump and restore go together")
        if self.dump is not None and self.paths:
            raise ValueError(f"step {self.name}: use either dump/restore or paths, not both")
        return self

    @property
    def stateful(self) -> bool:
        return self.dump is not None or bool(self.paths)


class StepsFile(StrictModel):
    steps: list[StepDecl] = Field(default_factory=list)

    @model_validator(mode="after")
    def _graph(self) -> StepsFile:
        names = [s.name for s in self.steps]
        if len(set(names)) != len(names):
            raise ValueError("step names must be unique")
        for step in self.steps:
            for dep in step.after:
                if dep not in names:
                    raise ValueError(f"step {step.name} is after unknown step {dep}")
        return self

    def by_name(self) -> dict[str, StepDecl]:
        return {s.name: s for s in self.steps}


class CheckItem(StrictModel):
    """One finding a check program prints."""

    id: str = Field(pattern=r"^[A-Za-z0-9_:-]{1,64}$")
    severity: Severity
    message: str = Field(max_length=4096)
    choices: list[Choice] = Field(default_factory=list)
    default: str | None = None

    @model_validator(mode="after")
    def _default_is_a_choice(self) -> CheckItem:
        if self.default is not None and self.default not in {c.id for c in self.choices}:
            raise ValueError(f"item {self.id}: default {self.default!r} is not one of its choices")
        return self


class CheckOutput(StrictModel):
    items: list[CheckItem] = Field(default_factory=list)
