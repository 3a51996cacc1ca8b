"""The agent's stage machine (client/run/machine.py), without a broker: one table of single
`next_step` calls over resume points x answer sources x policies, then whole deployments
driven step by step and resumed from every journal prefix."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from client.journal import ActiveDeployment, JournalState, check_record
from client.run.machine import (
    Ask,
    Facts,
    Finish,
    Reboot,
    Record,
    RollBack,
    RunStage,
    RunSteps,
    Step,
    next_step,
)
from protocol import prompts as P
from protocol.codec import encode
from protocol.models import Answer, DeployPolicy, Desired, Prompt, ReportItem
from protocol.steps import StepsFile

CLOCK = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
NOW = CLOCK.timestamp()
DEP = "R1"
TOP = "/nix/store/top"
BOOT = "boot-1"

# db: per-choice migrations only (no "*"), dumped; app after db; cache idempotent.
STEPS = StepsFile.model_validate({"steps": [
    {"name": "db", "check": "/c", "paths": ["/var/db"],
     "migrations": {"upgrade": "/up", "dump-restore": "/dr"}},
    {"name": "app", "after": ["db"], "migrations": {"*": "/app"}},
    {"name": "cache", "idempotent": True, "migrations": {"*": "/cache"}},
]})
ONLY_DB = StepsFile.model_validate({"steps": [STEPS.steps[0].model_dump()]})
MAJOR = {"step": "db", "id": "major", "severity": "warning", "message": "15 -> 16",
         "choices": [{"id": "upgrade"}, {"id": "dump-restore", "destructive": True}],
         "default": "upgrade"}
ITEMS = [ReportItem.model_validate(MAJOR)]
ALL_AFTER = ("app", "cache", "db")


def desired(**kw: Any) -> Desired:
    policy = DeployPolicy(**kw.pop("policy", {}))
    return Desired(host="h1", deployment_id=DEP, generation=2, system="/nix/store/new",
                   issued_at=NOW - 100, policy=policy, **kw)


# -- journal records, short ---------------------------------------------------------------

def B(stage: str) -> dict[str, Any]:
    return {"kind": "begin", "stage": stage}


def E(stage: str, data: Any = None) -> dict[str, Any]:
    defaults: dict[str, Any] = {"fetch": TOP, "check": {"items": [MAJOR]},
                                "dump": {"dumps": {"db": "/dumps/db"}},
                                "switch": {"needs_reboot": False}}
    if data is None:
        data = defaults.get(stage, {"status": "ok"} if stage.startswith("step:") else None)
    return {"kind": "end", "stage": stage, "data": data}


def PR(kind: str, n: int = 0, deadline: float | None = None,
       items: list[ReportItem] | None = None) -> dict[str, Any]:
    pid = P.prompt_id(DEP, kind, n)
    prompt = Prompt(host="h1", prompt_id=pid, deployment_id=DEP, generation=2, kind=kind,  # type: ignore[arg-type]
                    items=items or ITEMS, created_at=NOW - 60, deadline=deadline)
    return {"kind": "prompt", "prompt_id": pid, "prompt": prompt.model_dump(mode="json")}


def AN(kind: str, choices: dict[str, str], n: int = 0, complete: bool = True,
       source: str = "remote", until: float | None = None) -> dict[str, Any]:
    return {"kind": "answer", "prompt_id": P.prompt_id(DEP, kind, n), "choices": choices,
            "source": source, "complete": complete, "deferred_until": until}


def N(key: str, value: Any) -> dict[str, Any]:
    return {"kind": "note", "key": key, "value": value}


def journal(d: Desired, records: list[dict[str, Any]]) -> ActiveDeployment:
    st = JournalState()
    for rec in [{"kind": "accept", "deployment_id": DEP, "generation": d.generation,
                 "desired": base64.b64encode(encode(d)).decode(), "previous": "/old"},
                *records]:
        rec = {"deployment_id": DEP, **rec}
        check_record(rec)
        st.apply(rec)
    assert st.active is not None
    return st.active


def facts(d: Desired, records: list[dict[str, Any]], *, steps: StepsFile = STEPS,
          clock: datetime = CLOCK, boot: str = BOOT) -> Facts:
    a = journal(d, records)
    return Facts(d, a, steps if "fetch" in a.done else None, boot, clock)


def show(step: Step) -> str:
    """A step as a short token for the table."""
    if isinstance(step, RunStage):
        return f"run {step.name}"
    if isinstance(step, RunSteps):
        return f"steps {step.phase} {','.join(step.names)}"
    if isinstance(step, Record):
        return "record " + " ".join(
            f"{k}:{f.get('stage') or f.get('key') or ','.join(f.get('stages', [])) or ''}"
            + (f"={f['choices']}" if k == "answer" else "") for k, f in step.records)
    if isinstance(step, Ask):
        extra = " deferred" if step.deferred_until else ""
        extra += f" wake+{step.wake_at - NOW:.0f}" if step.wake_at is not None else ""
        extra += " needs_reboot" if step.needs_reboot else ""
        return f"ask {step.prompt_id.removeprefix(DEP + '.')}{extra}"
    if isinstance(step, Reboot):
        return "reboot"
    if isinstance(step, RollBack):
        return f"rollback: {step.reason}"
    assert isinstance(step, Finish)
    return f"finish {step.status}" + (" needs_reboot" if step.needs_reboot else "") + (
        f" installed={step.installed}" if step.installed is not None else "")


FETCHED = [B("fetch"), E("fetch")]
CHECKED = [*FETCHED, B("check"), E("check")]
ANSWERED = [*CHECKED, PR("choice"), AN("choice", {"db.major": "upgrade"})]
DUMPED = [*ANSWERED, B("dump"), E("dump")]
SWITCHED = [*DUMPED, B("switch"), E("switch")]
SWITCHED_NR = [*DUMPED, B("switch"), E("switch", {"needs_reboot": True})]
MIGRATED = [*SWITCHED, *(r for s in ALL_AFTER for r in (B(f"step:{s}"), E(f"step:{s}")))]
WINDOW_OUT = "window 02:00-04:00"   # CLOCK is 12:00 UTC: the window opens in 14 h
WINDOW_IN = "window 11:00-13:00"
FAILED_DB = [*SWITCHED, B("step:cache"), E("step:cache"), B("step:db"),
             N("failed:db", "exit 3")]
INTERRUPTED_DB = [*SWITCHED, B("step:cache"), E("step:cache"), B("step:db")]

# (name, desired kwargs, journal records, expected step)
CASES: list[tuple[str, dict[str, Any], list[dict[str, Any]], str]] = [
    # resume points along the pipeline
    ("fresh", {}, [], "run fetch"),
    ("killed mid-fetch", {}, [B("fetch")], "run fetch"),
    ("after fetch", {}, FETCHED, "run check"),
    ("killed mid-check", {}, [*FETCHED, B("check")], "run check"),
    ("after check: open choice", {}, CHECKED, "ask choose"),
    ("prompt journaled, no answer yet", {}, [*CHECKED, PR("choice")], "ask choose"),
    ("answered while open: dump next", {}, ANSWERED, "run dump"),
    ("pre-answered: no prompt", {"choices": {"db.major": "upgrade"}}, CHECKED, "run dump"),
    ("killed mid-dump", {}, [*ANSWERED, B("dump")], "run dump"),
    ("after dump", {}, DUMPED, "run switch"),
    ("killed mid-switch", {}, [*DUMPED, B("switch")], "run switch"),
    ("after switch: the answered choice's migration runs", {}, SWITCHED,
     "steps after-switch app,cache,db"),
    ("one step done, the rest run", {}, [*SWITCHED, B("step:cache"), E("step:cache")],
     "steps after-switch app,db"),
    ("killed in an idempotent step: run again", {},
     [*SWITCHED, B("step:cache")], "steps after-switch app,cache,db"),
    ("all migrated: confirm", {}, MIGRATED, "run confirm"),
    ("killed mid-confirm", {}, [*MIGRATED, B("confirm")], "run confirm"),
    ("confirmed", {}, [*MIGRATED, B("confirm"), E("confirm")], "finish succeeded"),
    ("confirm none", {"policy": {"confirm": "none"}}, MIGRATED, "finish succeeded"),
    ("boot without reboot: no confirm", {"action": "boot", "policy": {"reboot": "never"}},
     MIGRATED, "finish succeeded"),
    ("check only", {"check_only": True}, CHECKED, "finish succeeded"),
    # answers: partial, later ones win, other deployments' answers do not count
    ("partial answer keeps the prompt", {},
     [*CHECKED, PR("choice"), AN("choice", {"x.y": "a"}, complete=False)], "ask choose"),
    # approval and deferrals ("not now")
    ("approval asked after choices", {"policy": {"approval": "ask"}}, ANSWERED, "ask approve"),
    ("approved", {"policy": {"approval": "ask"}},
     [*ANSWERED, PR("approval"), AN("approval", {P.APPROVE_KEY: P.APPROVE})], "run dump"),
    ("deferred: waits until T, prompt stays open", {"policy": {"approval": "ask"}},
     [*ANSWERED, PR("approval"), AN("approval", {P.APPROVE_KEY: P.DEFER_HOUR},
                                    complete=False, until=NOW + 3600)],
     "ask approve deferred wake+3600"),
    ("deferral over: proceeds by itself", {"policy": {"approval": "ask"}},
     [*ANSWERED, PR("approval"), AN("approval", {P.APPROVE_KEY: P.DEFER_HOUR},
                                    complete=False, until=NOW - 1)], "run dump"),
    ("deferred, then approved now", {"policy": {"approval": "ask"}},
     [*ANSWERED, PR("approval"), AN("approval", {P.APPROVE_KEY: P.DEFER_TONIGHT},
                                    complete=False, until=NOW + 9000),
      AN("approval", {P.APPROVE_KEY: P.APPROVE})], "run dump"),
    # take-default
    ("deadline passed, take-default", {"policy": {"take_default_on_deadline": True}},
     [*CHECKED, PR("choice", deadline=NOW - 1)], "record answer:={'db.major': 'upgrade'}"),
    ("deadline ahead: wake at it", {"policy": {"take_default_on_deadline": True}},
     [*CHECKED, PR("choice", deadline=NOW + 30)], "ask choose wake+30"),
    ("deadline passed, policy keeps waiting", {}, [*CHECKED, PR("choice", deadline=NOW - 1)],
     "ask choose"),
    ("approval never takes a default", {"policy": {"approval": "ask",
                                                   "take_default_on_deadline": True}},
     [*ANSWERED, PR("approval", deadline=NOW - 1)], "ask approve"),
    # reboot policies (the switch said a reboot is needed)
    ("reboot never: report it", {"policy": {"reboot": "never"}},
     [*SWITCHED_NR, *(r for s in ALL_AFTER for r in (B(f"step:{s}"), E(f"step:{s}"))),
      B("confirm"), E("confirm")], "finish succeeded needs_reboot"),
    ("reboot never: migrations go on", {"policy": {"reboot": "never"}}, SWITCHED_NR,
     "steps after-switch app,cache,db"),
    ("reboot ask", {"policy": {"reboot": "ask"}}, SWITCHED_NR, "ask reboot needs_reboot"),
    ("reboot ask answered now", {"policy": {"reboot": "ask"}},
     [*SWITCHED_NR, PR("reboot"), AN("reboot", {P.REBOOT_KEY: P.REBOOT_NOW})], "reboot"),
    ("reboot ask answered later", {"policy": {"reboot": "ask"}},
     [*SWITCHED_NR, PR("reboot"), AN("reboot", {P.REBOOT_KEY: P.REBOOT_LATER})],
     "steps after-switch app,cache,db"),
    ("reboot ask, deadline takes 'later'", {"policy": {"reboot": "ask",
                                                       "take_default_on_deadline": True}},
     [*SWITCHED_NR, PR("reboot", deadline=NOW - 1, items=[P.reboot_item()])],
     "record answer:={'deploy.reboot': 'later'}"),
    ("reboot now", {"policy": {"reboot": "now"}}, SWITCHED_NR, "reboot"),
    ("reboot window closed: a reboot prompt waits for it", {"policy": {"reboot": WINDOW_OUT}},
     SWITCHED_NR, "ask reboot wake+50400 needs_reboot"),
    ("reboot window closed, approved: reboot now", {"policy": {"reboot": WINDOW_OUT}},
     [*SWITCHED_NR, PR("reboot"), AN("reboot", {P.REBOOT_KEY: P.REBOOT_NOW})], "reboot"),
    ("reboot window open", {"policy": {"reboot": WINDOW_IN}}, SWITCHED_NR, "reboot"),
    ("reboot after test: report only", {"action": "test", "policy": {"reboot": "now"}},
     SWITCHED_NR, "steps after-switch app,cache,db"),
    ("killed after journaling the reboot, same boot", {"policy": {"reboot": "now"}},
     [*SWITCHED_NR, N("reboot_boot_id", BOOT)],
     "rollback: a reboot was requested but the host did not reboot"),
    ("after the reboot: record it", {"policy": {"reboot": "now"}},
     [*SWITCHED_NR, N("reboot_boot_id", "boot-0")], "run reboot"),
    ("after the reboot: migrations", {"policy": {"reboot": "now"}},
     [*SWITCHED_NR, N("reboot_boot_id", "boot-0"), B("reboot"),
      E("reboot", {"rebooted": True, "needs_reboot": False})], "steps after-switch app,cache,db"),
    ("boot action confirms after the reboot", {"action": "boot", "policy": {"reboot": "now"}},
     [*SWITCHED_NR, N("reboot_boot_id", "boot-0"), B("reboot"),
      E("reboot", {"rebooted": True, "needs_reboot": False}),
      *(r for s in ALL_AFTER for r in (B(f"step:{s}"), E(f"step:{s}")))], "run confirm"),
    # on-step-failure
    ("failure, ask", {}, FAILED_DB, "ask failure1"),
    ("failure, retry", {"policy": {"on_step_failure": "retry"}}, FAILED_DB,
     "record reset:step:db"),
    ("failure, retry exhausted: ask", {"policy": {"on_step_failure": "retry"}},
     [*FAILED_DB, B("step:db"), B("step:db")], "ask failure1"),
    ("failure, skip", {"policy": {"on_step_failure": "skip"}}, FAILED_DB,
     "record end:step:db"),
    ("failure, rollback", {"policy": {"on_step_failure": "rollback"}}, FAILED_DB,
     "rollback: migration failed: db: exit 3"),
    ("failure prompt answered retry", {},
     [*FAILED_DB, PR("step_failure", 1), AN("step_failure", {"db.failed": "retry"}, 1)],
     "record note:resolved:R1.failure1 reset:step:db"),
    ("failure prompt answered rollback", {},
     [*FAILED_DB, PR("step_failure", 1), AN("step_failure", {"db.failed": "rollback"}, 1)],
     "rollback: migration failed: db: exit 3"),
    ("failed again after a retry: a new prompt, failure2", {},
     [*FAILED_DB, PR("step_failure", 1), AN("step_failure", {"db.failed": "retry"}, 1),
      N("resolved:R1.failure1", True), {"kind": "reset", "stages": ["step:db"],
                                        "notes": ["failed:db"]},
      B("step:db"), N("failed:db", "exit 3")], "ask failure2"),
    ("open failure prompt keeps its id (restart)", {"policy": {"on_step_failure": "retry"}},
     [*FAILED_DB, B("step:db"), B("step:db"), PR("step_failure", 1)], "ask failure1"),
    ("killed in a non-idempotent step: asks", {}, INTERRUPTED_DB, "ask failure1"),
    ("killed in a non-idempotent step, retry policy", {"policy": {"on_step_failure": "retry"}},
     INTERRUPTED_DB, "record reset:step:db"),
    ("failure prompt deadline takes rollback", {"policy": {"take_default_on_deadline": True}},
     [*FAILED_DB, PR("step_failure", 1, deadline=NOW - 1,
                     items=[P.failure_item("db", "exit 3")])],
     "record answer:={'db.failed': 'rollback'}"),
    # cancel (fleetctl cancel, a newer desired state, fleetctl rollback) ends a wait
    ("cancel ends a choice wait", {}, [*CHECKED, PR("choice"), N("cancel", "by op")],
     "finish cancelled"),
    ("cancel ends an approval wait", {"policy": {"approval": "ask"}},
     [*ANSWERED, PR("approval"), N("cancel", "by op")], "finish cancelled"),
    ("cancel ends a deferral", {"policy": {"approval": "ask"}},
     [*ANSWERED, PR("approval"), AN("approval", {P.APPROVE_KEY: P.DEFER_TOMORROW},
                                    complete=False, until=NOW + 86400), N("cancel", "x")],
     "finish cancelled"),
    ("cancel ends a reboot window wait as 'later'", {"policy": {"reboot": WINDOW_OUT}},
     [*SWITCHED_NR, PR("reboot"), N("cancel", "superseded")], "steps after-switch app,cache,db"),
    ("cancel ends a failure prompt: roll back", {},
     [*FAILED_DB, PR("step_failure", 1), N("cancel", "by op")],
     "rollback: migration failed: db: exit 3; by op"),
    ("cancel while working waits for the next wait", {}, [*FETCHED, N("cancel", "x")],
     "run check"),
    # errors and endings
    ("fetch failed", {}, [B("fetch"), N("error", {"stage": "fetch", "message": "no path"})],
     "finish failed"),
    ("switch failed: roll back", {},
     [*DUMPED, B("switch"), N("error", {"stage": "switch", "message": "exit 4"})],
     "rollback: exit 4"),
    ("confirm failed: roll back", {},
     [*MIGRATED, B("confirm"), N("error", {"stage": "confirm", "message": "no confirm"})],
     "rollback: no confirm"),
    ("killed mid-rollback: go on", {}, [*SWITCHED, N("rollback_reason", "r"), B("rollback")],
     "rollback: r"),
    ("rolled back", {}, [*SWITCHED, N("rollback_reason", "r"), B("rollback"), E("rollback")],
     "finish rolled_back"),
    ("rollback failed", {}, [*SWITCHED, N("rollback_reason", "r"), B("rollback"),
                             N("rollback_error", "disk")], "finish failed"),
    ("blocking check error", {}, [*FETCHED, B("check"), E("check", {"items": [
        {"step": "db", "id": "uid", "severity": "error", "message": "uid differs"}]})],
     "finish blocked"),
    # fleetctl rollback
    ("rollback: undo the last deployment", {"rollback": True}, [], "run rollback-previous"),
    ("rollback done, first deployment: installed 0", {"rollback": True},
     [B("rollback-previous"), E("rollback-previous", {"system": None, "generation": 0,
                                                      "message": "m"})],
     "finish succeeded installed=0"),
    ("nothing to roll back", {"rollback": True},
     [B("rollback-previous"), N("error", {"stage": "rollback-previous",
                                          "message": "nothing to roll back"})],
     "finish failed"),
]


@pytest.mark.parametrize(("name", "kw", "records", "expected"), CASES, ids=[c[0] for c in CASES])
def test_next_step(name: str, kw: dict[str, Any], records: list[dict[str, Any]],
                   expected: str) -> None:
    got = show(next_step(facts(desired(**kw), records)))
    assert got == expected if ":" in expected else got.split(":")[0] == expected


SOURCES = ["remote", "homeassistant", "local:alice", "deadline"]


@pytest.mark.parametrize("source", SOURCES)
def test_per_choice_migration_runs_whatever_answered_while_open(source: str) -> None:
    """Symptom 1: with only per-choice migrations (no "*"), a choice answered while the
    prompt is open (fleetctl answer, fleet-agent prompt, Home Assistant, the deadline)
    must run its migration, exactly as a pre-answer does."""
    d = desired()
    open_ = [*CHECKED, PR("choice")]
    assert show(next_step(facts(d, open_, steps=ONLY_DB))) == "ask choose"
    answered = [*open_, AN("choice", {"db.major": "dump-restore"}, source=source)]
    after_switch = [*answered, B("dump"), E("dump"), B("switch"), E("switch")]
    assert show(next_step(facts(d, answered, steps=ONLY_DB))) == "run dump"
    assert show(next_step(facts(d, after_switch, steps=ONLY_DB))) == "steps after-switch db"
    pre = desired(choices={"db.major": "dump-restore"})
    pre_switched = [*CHECKED, B("dump"), E("dump"), B("switch"), E("switch")]
    assert show(next_step(facts(pre, pre_switched, steps=ONLY_DB))) == "steps after-switch db"


# -- whole deployments, resumed from every journal prefix ---------------------------------

@dataclass
class Host:
    """A pure stand-in for the runner: executes steps by appending records."""

    d: Desired
    answers: dict[str, dict[str, str]] = field(default_factory=dict)
    fail_once: set[str] = field(default_factory=set)
    needs_reboot: bool = False
    boot: str = BOOT
    clock: datetime = CLOCK
    records: list[dict[str, Any]] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)

    def run(self, limit: int = 200) -> Finish:
        for _ in range(limit):
            step = next_step(facts(self.d, self.records, clock=self.clock, boot=self.boot))
            if isinstance(step, Finish):
                return step
            self.execute(step)
        raise AssertionError(f"no end after {limit} steps: {self.records[-5:]}")

    def execute(self, step: Step) -> None:
        add = self.records.append
        if isinstance(step, RunStage):
            add(B(step.name))
            data = {"needs_reboot": self.needs_reboot} if step.name == "switch" else \
                {"rebooted": True, "needs_reboot": False} if step.name == "reboot" else None
            add(E(step.name, data))
        elif isinstance(step, RunSteps):
            for name in step.names:
                add(B(f"step:{name}"))
                self.runs.append(name)
                if name in self.fail_once:
                    self.fail_once.discard(name)
                    add(N(f"failed:{name}", "exit 3"))
                else:
                    add(E(f"step:{name}"))
        elif isinstance(step, Record):
            self.records += [{"kind": k, **f} for k, f in step.records]
        elif isinstance(step, Ask):
            if step.prompt_id not in journal(self.d, self.records).prompts:
                add(PR(step.kind, int(step.prompt_id.rsplit("failure", 1)[-1])
                       if step.kind == "step_failure" else 0, items=list(step.items)))
                return
            choices = self.answers.get(step.kind)
            if step.kind == "step_failure":  # one decision for every failed step
                decision = (choices or {}).get("*", P.RETRY)
                choices = {i.key: decision for i in step.items}
            if choices is None:
                raise AssertionError(f"stuck at {step}")
            n = int(step.prompt_id.rsplit("failure", 1)[-1]) if step.kind == "step_failure" \
                else 0
            add(AN(step.kind, choices, n))
        elif isinstance(step, Reboot):
            add(N("reboot_boot_id", self.boot))
            self.boot = "boot-2"
        elif isinstance(step, RollBack):
            if "rollback_reason" not in journal(self.d, self.records).notes:
                add(N("rollback_reason", step.reason))
            add(B("rollback"))
            add(E("rollback"))


SCENARIOS: list[tuple[str, dict[str, Any], dict[str, Any], str]] = [
    ("answered choice", {}, {"answers": {"choice": {"db.major": "upgrade"}}}, "succeeded"),
    ("approval + reboot ask now", {"policy": {"approval": "ask", "reboot": "ask"}},
     {"answers": {"choice": {"db.major": "upgrade"}, "approval": {P.APPROVE_KEY: P.APPROVE},
                  "reboot": {P.REBOOT_KEY: P.REBOOT_NOW}}, "needs_reboot": True},
     "succeeded"),
    ("failure retried", {}, {"answers": {"choice": {"db.major": "upgrade"},
                                         "step_failure": {"*": "retry"}},
                             "fail_once": {"db"}}, "succeeded"),
    ("failure rolled back", {}, {"answers": {"choice": {"db.major": "upgrade"},
                                             "step_failure": {"*": "rollback"}},
                                 "fail_once": {"db"}}, "rolled_back"),
]


@pytest.mark.parametrize(("name", "kw", "host", "status"), SCENARIOS,
                         ids=[s[0] for s in SCENARIOS])
def test_resume_from_every_journal_prefix(name: str, kw: dict[str, Any], host: dict[str, Any],
                                          status: str) -> None:
    """Crash after any journal record, resume: the same ending, and no non-idempotent step
    that ended runs again."""
    whole = Host(desired(**kw), **{**host, "fail_once": set(host.get("fail_once", ()))})
    assert whole.run().status == status
    for k in range(len(whole.records) + 1):
        prefix = whole.records[:k]
        ended = {r["stage"] for r in prefix if r["kind"] == "end"}
        failed_before = {r["key"][7:] for r in prefix
                         if r["kind"] == "note" and r["key"].startswith("failed:")}
        again = Host(desired(**kw), **{**host, "fail_once": set(host.get("fail_once", ()))
                                       - failed_before}, records=list(prefix),
                     boot="boot-2" if any(r.get("key") == "reboot_boot_id" for r in prefix)
                     else BOOT)
        assert again.run().status == status, (name, k, prefix[-1:] if prefix else None)
        for step in again.runs:
            assert f"step:{step}" not in ended or step in ("cache",), (k, step)


def test_validate_answer() -> None:
    choice = Prompt(host="h1", prompt_id="p", deployment_id=DEP, generation=2, items=ITEMS,
                    created_at=NOW)
    approval = choice.model_copy(update={"kind": "approval", "items": [P.approval_item(
        "switch", "/s")]})
    reboot = choice.model_copy(update={"kind": "reboot", "items": [P.reboot_item()]})

    def v(prompt: Prompt | None, **kw: Any) -> P.AnswerVerdict:
        return P.validate_answer(prompt, Answer(host="h1", prompt_id="p", issued_at=NOW, **kw),
                                 {}, CLOCK, "22:00")
    assert v(choice, choices={"db.major": "upgrade"}).complete
    assert not v(choice, choices={"db.major": "yolo"}).ok
    assert not v(choice, choices={"x.y": "upgrade"}).ok
    assert not v(choice, approve=True).ok
    assert not v(None, choices={"db.major": "upgrade"}).ok
    ok = v(approval, approve=True)
    assert ok.complete and ok.choices == {P.APPROVE_KEY: P.APPROVE}
    now = v(reboot, approve=True)  # fleetctl approve / HA's button start a pending reboot
    assert now.complete and now.choices == {P.REBOOT_KEY: P.REBOOT_NOW}
    for choice_id, until in [(P.DEFER_HOUR, CLOCK + timedelta(hours=1)),
                             (P.DEFER_TONIGHT, CLOCK.replace(hour=22)),
                             (P.DEFER_TOMORROW, CLOCK + timedelta(days=1))]:
        later = v(approval, choices={P.APPROVE_KEY: choice_id})
        assert later.ok and not later.complete and later.deferred_until == until.timestamp()
    late = P.deferred_until(P.DEFER_TONIGHT, CLOCK.replace(hour=23), "22:00")
    assert late == CLOCK.replace(hour=22) + timedelta(days=1)
