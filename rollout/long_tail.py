"""An hf engine with a long tail, for benchmarks of the rollout stream (benchmarks/async_rollout.py).

At a 40K-80K thinking budget most samples end early and a few run to the budget. A tiny model answers in
a few tokens, so this engine makes the tail by hand: the groups whose prompt falls in the tail (a stable
hash of its token ids, `tail_fraction` of them) ignore EOS and run to the budget, the others sample as
usual. Everything else (sampling, log-probs, versions) is the hf engine's.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

from cispo.core.types import Generation, SamplingParams
from rollout.hf_engine import HFEngine


def in_tail(prompt: list[int], fraction: float, prefix_tokens: int = 0) -> bool:
    """Whether a prompt's group runs to the budget: a hash of its ids (its first `prefix_tokens`, when
    set: a partial rollout's continuation, the prompt followed by the tokens so far, stays in the tail),
    the same in every process."""
    ids = prompt[:prefix_tokens] if prefix_tokens else prompt
    digest = hashlib.blake2b(str(ids).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction


class LongTailHFEngine(HFEngine):
    def __init__(
        self, *args: Any, tail_fraction: float = 0.1, tail_prefix_tokens: int = 0, **kwargs: Any
    ) -> None:
        if not 0 <= tail_fraction <= 1 or tail_prefix_tokens < 0:
            raise ValueError(
                f"tail_fraction in [0, 1] and tail_prefix_tokens >= 0, got {tail_fraction}, "
                f"{tail_prefix_tokens}"
            )
        super().__init__(*args, **kwargs)
        self.tail_fraction, self.prefix = tail_fraction, tail_prefix_tokens

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Generation]:
        tail = [i for i, p in enumerate(prompts) if in_tail(p, self.tail_fraction, self.prefix)]
        if not tail:
            return super().generate(prompts, params)
        rest = [i for i in range(len(prompts)) if i not in set(tail)]
        out: dict[int, Generation] = {}
        timings: dict[str, float] = {}
        for rows, run_params in ((rest, params), (tail, dataclasses.replace(params, eos_token_ids=()))):
            if rows:
                out.update(zip(rows, super().generate([prompts[i] for i in rows], run_params)))
                for key, value in self.last_timings.items():
                    timings[key] = timings.get(key, 0.0) + value
        self.last_timings = timings
        return [out[i] for i in range(len(prompts))]
