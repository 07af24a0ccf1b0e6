"""The scratchpad task's reward (cispo.driver.scratchpad): only the final answer counts.

A completion may write anything before the marker (the running sums of the scratchpad); what follows the
last marker, stripped, must equal what follows the last marker of the reference (the target the task
trains on; a reference without the marker is the answer itself). No marker, e.g. a completion cut off
by the generation budget before its answer, scores 0.

Configure it by path: ``reward.rewards=[{name: "rewards.scratchpad:scratchpad_reward", weight: 1.0}]``.
"""

from __future__ import annotations

from rewards.base import RewardInput, RewardResult

MAX_ANSWER_CHARS = 64


def final_answer(text: str, marker: str = "=") -> str | None:
    """What follows the last marker, stripped; None without a marker or with nothing after it."""
    head, found, tail = text.rpartition(marker)
    del head
    answer = tail.strip()
    if not found or not answer:
        return None
    return answer[:MAX_ANSWER_CHARS]


def scratchpad_reward(inp: RewardInput, *, marker: str = "=") -> RewardResult:
    """1 when the answer after the completion's last marker equals the reference's final answer, else 0."""
    if inp.reference is None:
        raise ValueError("scratchpad reward: the sample has no reference")
    reference = str(inp.reference)
    want = final_answer(reference, marker) if marker in reference else reference.strip()
    got = final_answer(inp.completion, marker)
    if got is None:
        return RewardResult(0.0, "scratchpad: no final answer (no marker)")
    if got != want:
        return RewardResult(0.0, "scratchpad: different answer")
    return RewardResult(1.0, "")
