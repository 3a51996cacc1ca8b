"""What `fleetctl demo` deploys: a simulated fleet that shows what Flotilla does.

The demo system carries one state step, `db`, whose programs are shell scripts:
- its check offers a choice on one host (`choice_host`); nobody answers, so the agent
  takes the default once the short prompt deadline passes;
- its migration prints progress lines, and on `retry_host` fails the first time (the
  host rolls back, its log is shown, the rollout retries it and it succeeds);
- on the hosts in `failing` (from --fail-rate, chosen with the seed) it always fails.
The first host is the canary batch; the rest follow in batches.
"""

from __future__ import annotations

import json
import random
import stat
from dataclasses import dataclass
from pathlib import Path

from controller.rollout.planner import RolloutPolicy
from protocol.models import DeployPolicy


@dataclass(frozen=True)
class DemoPlan:
    hosts: list[str]
    canary: str
    choice_host: str | None
    retry_host: str | None
    failing: frozenset[str]


def plan_demo(n: int, fail_rate: float, seed: int) -> DemoPlan:
    """Which host plays which part (pure; the seed makes a run repeatable)."""
    hosts = [f"demo-{i:04d}" for i in range(1, n + 1)]
    rng = random.Random(seed)
    k = round(fail_rate * n)
    if fail_rate > 0 and k == 0:
        k = 1
    rest = hosts[1:]
    failing = set(rng.sample(rest, min(k, len(rest))))
    if k >= n:  # --fail-rate 1.0: the canary fails too
        failing.add(hosts[0])
    healthy = [h for h in rest if h not in failing]
    choice_host = healthy[0] if healthy else None
    retry_host = healthy[-1] if len(healthy) > 1 else None
    return DemoPlan(hosts, hosts[0], choice_host, retry_host, frozenset(failing))


def rollout_policy(n: int) -> RolloutPolicy:
    batch = max(1, (n - 1 + 2) // 3)  # canary, then about three batches
    return RolloutPolicy(canary=1, batch=str(batch), retries=1,
                         max_failures=str(max(1, n // 3)), min_executed=1)


def agent_policy(prompt_deadline: float) -> DeployPolicy:
    return DeployPolicy(prompt_deadline_s=prompt_deadline, take_default_on_deadline=True,
                        on_step_failure="rollback", confirm="broker", confirm_timeout_s=30)


def _script(path: Path, body: str) -> str:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return str(path)


def make_previous_system(root: Path) -> Path:
    """The system the simulated hosts run before the demo: no state steps, so the
    demo's `db` step is new to them; a host that rolls back goes back to it."""
    top = root / "demo-nixos-system-25.05"
    (top / "bin").mkdir(parents=True, exist_ok=True)
    return top


def make_system(root: Path, plan: DemoPlan, pace: float) -> Path:
    """The toplevel the demo deploys (the simulated backend 'fetches' it as it is)."""
    top = root / "demo-nixos-system-25.11"
    bin_ = top / "bin"
    bin_.mkdir(parents=True, exist_ok=True)
    (top / "flotilla").mkdir(exist_ok=True)
    marks = root / "marks"
    marks.mkdir(exist_ok=True)
    choice = json.dumps({"items": [{
        "id": "schema", "severity": "warning",
        "message": "the orders table is 40 GB: an in-place upgrade locks it for minutes",
        "choices": [{"id": "in-place", "label": "upgrade in place",
                     "description": "fast, locks the table"},
                    {"id": "online", "label": "online copy",
                     "description": "slower, no lock"}],
        "default": "in-place"}]})
    check = _script(bin_ / "check-db", f"""\
echo "inspecting the database of $FLOTILLA_HOST" >&2
if [ "$FLOTILLA_HOST" = "{plan.choice_host}" ]; then
  echo '{choice}'
else
  echo '{{"items": []}}'
fi
""")
    failing = " ".join(sorted(plan.failing))
    migrate = _script(bin_ / "migrate-db", f"""\
echo "step 1: converting tables (${{FLOTILLA_CHOICE:-no choice asked}})"
sleep {pace}
echo "step 2: rebuilding indexes"
for f in {failing} ; do
  if [ "$f" = "$FLOTILLA_HOST" ]; then
    echo "ERROR: index orders_by_customer: could not create unique index" >&2
    echo "DETAIL: key (customer_id)=(4711) is duplicated" >&2
    exit 1
  fi
done
if [ "$FLOTILLA_HOST" = "{plan.retry_host}" ] && [ ! -e {marks}/$FLOTILLA_HOST ]; then
  touch {marks}/$FLOTILLA_HOST
  echo "ERROR: could not obtain lock on relation orders (another session holds it)" >&2
  exit 1
fi
sleep {pace}
echo "step 3: done, schema version 16"
""")
    dump = _script(bin_ / "dump-db", 'echo "schema 15" > "$FLOTILLA_DUMP_DIR/db.sql"\n'
                                     'echo "dumped the database"\n')
    restore = _script(bin_ / "restore-db", 'echo "restored $(cat "$FLOTILLA_DUMP_DIR/db.sql")"\n')
    steps = [{"name": "db", "check": check, "dump": dump, "restore": restore,
              "migrations": {"*": migrate}}]
    (top / "flotilla" / "steps.json").write_text(json.dumps({"steps": steps}, indent=1))
    return top
