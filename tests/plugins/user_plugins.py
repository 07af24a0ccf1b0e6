"""A user's policy loss and rollout engine, named by ``tests.plugins.user_plugins:<attr>`` in the tests.

Nothing here is registered: the learner ranks and Ray workers that receive the dotted path import this
module themselves, and both plugins leave the pid of the process they ran in where a test can read it.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

from cispo.algo.losses import cispo_loss
from cispo.core.types import Generation, SamplingParams

LOSS_SCALE = 2.0
ECHO_MARK = 7  # every EchoEngine response starts with this token (then the engine's `tag`)


def scaled_cispo_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, **kwargs: Any
) -> tuple[Tensor, dict[str, Tensor]]:
    """cispo_loss times LOSS_SCALE, with metrics only this loss emits: a marker (always 1) and the pid of
    the process that computed it (``_min``/``_max`` keys combine as min/max over micro-batches and ranks,
    so two ranks show up as two different pids)."""
    loss, metrics = cispo_loss(logprobs, old_logprobs, advantages, mask, **kwargs)
    pid = torch.tensor(float(os.getpid()), dtype=torch.float64)
    return LOSS_SCALE * loss, {
        **metrics,
        "user_loss_marker": torch.tensor(1.0),
        "user_loss_pid_min": pid,
        "user_loss_pid_max": pid,
    }


class EchoEngine:
    """A tiny Engine (rollout/engine.py): each response is [ECHO_MARK, tag, pid, *prompt], with log-prob 0
    per token, cut to max_new_tokens; the pid is that of the process that built and runs the engine."""

    def __init__(self, tag: int = 0) -> None:
        self.tag = tag
        self.pid = os.getpid()
        self.version = 0
        self.last_timings: dict[str, float] = {}

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Generation]:
        out = []
        for prompt in prompts:
            full = [ECHO_MARK, self.tag, self.pid, *prompt]
            response = full[: params.max_new_tokens]
            finish = "length" if len(response) < len(full) else "eos"
            out.append(Generation(response, [0.0] * len(response), finish, self.version))
        self.last_timings = {"generate_s": 0.0}
        return out

    def load_weights(self, state_dict: dict[str, Tensor], version: int) -> None:
        self.version = version
