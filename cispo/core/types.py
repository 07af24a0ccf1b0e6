"""Data that moves between the processes of a CISPO run.

prompts -> rollout -> samples -> rewards -> group advantages -> TrainBatch -> K updates -> weights -> rollout

Plain dataclasses (picklable through Ray) with no behaviour beyond validation; every package may import
this module, and it imports only the standard library and torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

FINISH_REASONS = ("eos", "length", "repetition")


@dataclass
class SamplingParams:
    """How an engine samples. Log-probs are always those of the distribution actually sampled from.

    temperature / top_p / top_k change that distribution: the behaviour log-prob of a token is taken after
    temperature scaling and after truncation renormalises the kept tokens (pi' = pi / Z, Z the kept mass),
    so a learner that does not truncate sees r = Z * pi_new / pi_old, biased below 1. The defaults
    (temperature 1, no truncation) keep the two distributions equal.
    """

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k truncation
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    # The MiniMax-M1 repetition early stop: stop a sequence once this many consecutive sampled tokens
    # each had probability > repetition_prob. 0 disables it. The report uses 3000 at scale.
    repetition_stop_tokens: int = 0
    repetition_prob: float = 0.99
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ValueError(
                f"temperature must be > 0 (use a small value for near-greedy), got {self.temperature}"
            )
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.repetition_prob < 1:
            raise ValueError(f"repetition_prob must be in (0, 1), got {self.repetition_prob}")


@dataclass
class Generation:
    """What an engine returns for one sampled response."""

    response_ids: list[int]
    logprobs: list[float]  # behaviour log-prob of each response token, same length as response_ids
    finish_reason: str  # one of FINISH_REASONS
    policy_version: int
    # Expert indices chosen at every position (prompt then response) and MoE layer, when recorded:
    # [P + R, n_moe_layers, top_k], a compact int8/int16 CPU tensor (small through Ray), NO_CHOICE (-1)
    # for the final response token, which is never fed back into the model.
    routed_experts: torch.Tensor | None = None


@dataclass
class PromptGroup:
    """One dataset row, to be answered group_size times."""

    index: int  # position in the data stream (the data cursor); unique within a run
    prompt_ids: list[int]
    prompt_text: str
    reference: Any  # what the reward compares against: an answer string, test source, a reasoning-gym entry
    metadata: dict[str, Any] = field(default_factory=dict)
    group_size: int = 1


@dataclass
class Sample:
    """One response to one prompt, with everything the learner and the logs need."""

    group_index: int
    prompt_ids: list[int]
    response_ids: list[int]
    behaviour_logprobs: list[float]
    finish_reason: str
    policy_version: int
    prompt_text: str = ""
    response_text: str = ""
    reference: Any = None
    metadata: dict[str, Any] = field(default_factory=dict)
    reward: float = 0.0
    reward_reason: str = ""
    # The engine's Generation.routed_experts: [P + R, n_moe_layers, top_k] compact int tensor, or None.
    routed_experts: torch.Tensor | None = None
    # The policy version that sampled each response token, when they differ (a partial rollout continued
    # across a weight sync); empty: every token is policy_version's. policy_version is the oldest.
    token_versions: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.token_versions and len(self.token_versions) != len(self.response_ids):
            raise ValueError(
                f"sample of group {self.group_index}: {len(self.token_versions)} token versions for "
                f"{len(self.response_ids)} response tokens"
            )
        if len(self.response_ids) != len(self.behaviour_logprobs):
            raise ValueError(
                f"sample of group {self.group_index}: {len(self.response_ids)} response tokens but "
                f"{len(self.behaviour_logprobs)} behaviour log-probs"
            )
        positions = len(self.prompt_ids) + len(self.response_ids)
        if self.routed_experts is not None and (
            self.routed_experts.dim() != 3 or self.routed_experts.shape[0] != positions
        ):
            raise ValueError(
                f"sample of group {self.group_index}: routed_experts has shape "
                f"{tuple(self.routed_experts.shape)}, expected [{positions}, n_moe_layers, top_k]"
            )


@dataclass
class TrainBatch:
    """Right-padded tensors for the learner. Position t of the token arrays is predicted from position t-1.

    input_ids, attention_mask, response_mask, old_logprobs: [B, L]
    advantages: [B]; group_ids: [B]
    response_mask[b, t] = 1 where input_ids[b, t] is a response token (so its log-prob is trained);
    old_logprobs[b, t] is the behaviour log-prob of that token (0 elsewhere).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    old_logprobs: torch.Tensor
    advantages: torch.Tensor
    group_ids: torch.Tensor
    routed_experts: torch.Tensor | None = None  # [B, L, n_moe_layers, top_k] or None

    def __post_init__(self) -> None:
        shape = self.input_ids.shape
        for name in ("attention_mask", "response_mask", "old_logprobs"):
            if getattr(self, name).shape != shape:
                raise ValueError(
                    f"TrainBatch.{name} has shape {tuple(getattr(self, name).shape)}, "
                    f"expected {tuple(shape)} like input_ids"
                )
        if self.advantages.shape != shape[:1]:
            raise ValueError(
                f"TrainBatch.advantages has shape {tuple(self.advantages.shape)}, expected [{shape[0]}]"
            )

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def select(self, rows: torch.Tensor | list[int]) -> TrainBatch:
        """A sub-batch of the given rows, trimmed to its longest sequence."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        length = int(self.attention_mask[rows].sum(dim=1).max().item())
        return TrainBatch(
            input_ids=self.input_ids[rows, :length],
            attention_mask=self.attention_mask[rows, :length],
            response_mask=self.response_mask[rows, :length],
            old_logprobs=self.old_logprobs[rows, :length],
            advantages=self.advantages[rows],
            group_ids=self.group_ids[rows],
            routed_experts=None if self.routed_experts is None else self.routed_experts[rows, :length],
        )

    def num_response_tokens(self) -> int:
        return int(self.response_mask.sum().item())


@dataclass
class StepResult:
    """What one optimizer step returns: its metrics (plain floats) and, when asked for, the policy's
    log-probs of the minibatch taken in the same forward, before the update ([B, L], 0 off the response)."""

    metrics: dict[str, float]
    logprobs: torch.Tensor | None = None


@dataclass(frozen=True)
class RolloutStats:
    """What the curriculum reads of one step's rollout (its kept samples): response lengths in tokens and
    the generation perplexity, exp of the mean negative behaviour log-prob per sampled token (NaN when
    nothing was sampled)."""

    p99_length: float
    perplexity: float
    mean_length: float
    max_length: float
