"""Resuming a rollout: what to do about desired states the broker does not hold.

The driver writes a host's deployment to the event log before it publishes the desired
state, so a controller that died in between leaves a host with a generation the broker
never got. `reconcile` compares what the log says is in flight with the retained
desired states the broker holds (pure: views and a map in, a verdict out); the driver
publishes and records what it says.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from controller.follow.view import HostView, superseded_note


@dataclass(frozen=True)
class Reconciled:
    republish: tuple[str, ...]  # hosts to send the same desired state again
    superseded: tuple[tuple[str, str], ...]  # (host, why): a newer deployment replaced ours


def reconcile(inflight: Iterable[HostView], held: Mapping[str, tuple[str, int]],
              aborted: bool) -> Reconciled:
    """`inflight`: hosts sent a deployment that has no result yet; `held`: the
    (deployment id, generation) of each retained desired state on the broker.

    - the broker holds ours, or the host acknowledged it (it has it, whatever the
      broker now holds): nothing to do;
    - the broker holds a newer generation (another rollout took the host): ours is
      superseded, the host is cancelled in this rollout;
    - otherwise the publish was lost: send it again, unless the rollout is aborting
      (a host that never got its desired state is not started by an aborting rollout).
    """
    republish: list[str] = []
    superseded: list[tuple[str, str]] = []
    for v in inflight:
        cur = held.get(v.host)
        if cur == (v.deployment_id, v.generation) or v.acked is not None:
            continue
        if cur is not None and cur[1] > v.generation:
            superseded.append((v.host, superseded_note(*cur)))
        elif not aborted:
            republish.append(v.host)
    return Reconciled(tuple(republish), tuple(superseded))
