"""Pure decisions of the agent (no MQTT, no subprocess): facts in, a verdict out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from client.journal import JournalState, RecordedResult
from protocol.models import Desired


@dataclass(frozen=True)
class Admission:
    """What to do with a verified Desired."""

    verdict: Literal["start", "resume", "replay", "reject", "queue"]
    reason: str = ""
    message: str = ""
    recorded: RecordedResult | None = None


def admit(desired: Desired, host: str, state: JournalState, now: float) -> Admission:
    """Decide on a desired state whose signature already verified."""
    if desired.host != host:
        return Admission("reject", "wrong_host",
                         f"desired state is for host {desired.host}, this is {host}")
    active = state.active
    if active is not None and active.deployment_id == desired.deployment_id:
        if active.generation != desired.generation:
            return Admission("reject", "generation_mismatch",
                             f"deployment {desired.deployment_id} is running generation "
                             f"{active.generation}, not {desired.generation}")
        return Admission("resume")
    recorded = state.results.get(desired.deployment_id)
    if recorded is not None and recorded.generation == desired.generation:
        return Admission("replay", recorded=recorded)
    if desired.expires_at is not None and now > desired.expires_at:
        return Admission("reject", "expired",
                         f"desired state expired {now - desired.expires_at:.0f}s ago")
    if desired.generation <= state.highest_generation:
        return Admission("reject", "stale_generation",
                         f"generation {desired.generation} is not newer than "
                         f"{state.highest_generation}, the last this host accepted")
    if active is not None:
        return Admission("queue", message=f"waiting for {active.deployment_id} to finish")
    return Admission("start")
