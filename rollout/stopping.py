"""Stopping rules for batched decoding: EOS, the per-sample token budget and the repetition early stop.

Rules are checked in priority order after every sampled token; the first that fires names the finish
reason. The sampled token that triggers a stop stays in the response (an EOS token is trained on).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cispo.core.types import SamplingParams


@dataclass
class StopRule:
    """One stopping rule: which active rows stop after this step."""

    reason: str

    def reset(self, batch_size: int, device: torch.device) -> None:
        return None

    def fires(self, tokens: torch.Tensor, logprobs: torch.Tensor, num_tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@dataclass
class EosRule(StopRule):
    eos_token_ids: tuple[int, ...] = ()
    _eos: torch.Tensor | None = None

    def reset(self, batch_size: int, device: torch.device) -> None:
        # Built once per batch: a fresh host tensor every step would be a host-to-device copy per token.
        self._eos = torch.tensor(self.eos_token_ids, dtype=torch.long, device=device)

    def fires(self, tokens: torch.Tensor, logprobs: torch.Tensor, num_tokens: torch.Tensor) -> torch.Tensor:
        assert self._eos is not None, "reset() before fires()"
        return torch.isin(tokens, self._eos)


@dataclass
class RepetitionRule(StopRule):
    """MiniMax-M1's early stop: N consecutive sampled tokens each with probability > threshold.

    A model stuck in a loop assigns near-certain probability to every next token; cutting the sequence
    there saves decode time and keeps degenerate tails out of the batch. The probability is that of the
    distribution sampled from (exp of the behaviour log-prob).
    """

    num_tokens: int = 3000
    threshold: float = 0.99
    _run: torch.Tensor | None = None

    def reset(self, batch_size: int, device: torch.device) -> None:
        self._run = torch.zeros(batch_size, dtype=torch.long, device=device)

    def fires(self, tokens: torch.Tensor, logprobs: torch.Tensor, num_tokens: torch.Tensor) -> torch.Tensor:
        assert self._run is not None, "reset() before fires()"
        confident = logprobs > torch.log(torch.tensor(self.threshold, dtype=logprobs.dtype))
        self._run = torch.where(confident, self._run + 1, torch.zeros_like(self._run))
        return self._run >= self.num_tokens


@dataclass
class LengthRule(StopRule):
    max_new_tokens: int = 256

    def fires(self, tokens: torch.Tensor, logprobs: torch.Tensor, num_tokens: torch.Tensor) -> torch.Tensor:
        return num_tokens >= self.max_new_tokens


def build_stop_rules(params: SamplingParams) -> list[StopRule]:
    """The rules a SamplingParams asks for, in priority order."""
    rules: list[StopRule] = []
    if params.eos_token_ids:
        rules.append(EosRule("eos", tuple(params.eos_token_ids)))
    if params.repetition_stop_tokens > 0:
        rules.append(RepetitionRule("repetition", params.repetition_stop_tokens, params.repetition_prob))
    rules.append(LengthRule("length", params.max_new_tokens))
    return rules


class StopTracker:
    """Per-row finished flags, token counts and finish reasons for one decoding batch."""

    def __init__(self, batch_size: int, params: SamplingParams, device: torch.device) -> None:
        self.rules = build_stop_rules(params)
        for rule in self.rules:
            rule.reset(batch_size, device)
        self.finished = torch.zeros(batch_size, dtype=torch.bool, device=device)
        self.num_tokens = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.reason_code = torch.full((batch_size,), -1, dtype=torch.long, device=device)

    def update(self, tokens: torch.Tensor, logprobs: torch.Tensor, check_done: bool = True) -> bool:
        """Record one sampled token per row (finished rows ignored); True once every row is done."""
        active = ~self.finished
        self.num_tokens += active.long()
        for code, rule in enumerate(self.rules):
            # Every rule sees every step so stateful rules (the repetition run) stay consistent.
            stop = rule.fires(tokens, logprobs, self.num_tokens) & active & (self.reason_code < 0)
            self.reason_code = torch.where(stop, torch.full_like(self.reason_code, code), self.reason_code)
        self.finished |= self.reason_code >= 0
        return check_done and bool(self.finished.all())

    def reasons(self) -> list[str]:
        return [self.rules[c].reason for c in self.reason_code.tolist()]


def repetition_cut(logprobs: list[float], num_tokens: int, threshold: float) -> int | None:
    """Length at which the repetition stop fires on a finished sequence (engines that cannot stop it live)."""
    if num_tokens <= 0:
        return None
    log_threshold = math.log(threshold)
    run = 0
    for position, logprob in enumerate(logprobs):
        run = run + 1 if logprob > log_threshold else 0
        if run >= num_tokens:
            return position + 1
    return None
