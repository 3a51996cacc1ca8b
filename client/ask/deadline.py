"""Prompt deadlines: when nobody answers in time, the policy may take the defaults.

Pure: the agent calls `deadline_outcome` from its wait loop (and once at start, so a
deadline that passed while the host was down is honoured), then journals and
publishes the returned choices exactly like an answer, with `answered_by="deadline"`.
"""

from __future__ import annotations

from protocol.models import Answer, DeployPolicy, Prompt

DEADLINE_SOURCE = "deadline"


def effective_deadline(prompt: Prompt, policy: DeployPolicy) -> float | None:
    """The prompt's own deadline, else created_at + the policy's prompt_deadline_s."""
    if prompt.deadline is not None:
        return prompt.deadline
    if policy.prompt_deadline_s is not None:
        return prompt.created_at + policy.prompt_deadline_s
    return None


def deadline_outcome(prompt: Prompt, policy: DeployPolicy, now: float) -> dict[str, str] | None:
    """The defaults to take now ({"STEP.ITEM": choice}), or None to keep waiting.

    None when there is no deadline, it has not passed, the policy does not take
    defaults, or no open item has a default. Items without a default are left out:
    they stay open (the caller decides whether that blocks the deploy).
    """
    deadline = effective_deadline(prompt, policy)
    if deadline is None or now < deadline or not policy.take_default_on_deadline:
        return None
    taken = {
        item.key: item.default
        for item in prompt.items
        if item.choices and item.default is not None
        and item.default in {c.id for c in item.choices}
    }
    return taken or None


def deadline_answer(prompt: Prompt, policy: DeployPolicy, now: float) -> Answer | None:
    """`deadline_outcome` as an Answer recorded as taken by "deadline" (unsigned, local)."""
    taken = deadline_outcome(prompt, policy, now)
    if taken is None:
        return None
    return Answer(host=prompt.host, prompt_id=prompt.prompt_id, choices=taken,
                  answered_by=DEADLINE_SOURCE, issued_at=now)


def seconds_left(prompt: Prompt, policy: DeployPolicy, now: float) -> float | None:
    """For the wait loop's timeout: seconds until the deadline (0 if passed), or None."""
    deadline = effective_deadline(prompt, policy)
    if deadline is None or not policy.take_default_on_deadline:
        return None
    return max(0.0, deadline - now)
