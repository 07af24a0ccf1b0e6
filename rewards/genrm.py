"""Generative reward model: a judge LLM reads a prompt built from the sample and writes a score.

The judge is any engine-like callable ``generate(prompts: list[str]) -> list[str]``. An answer with no
parsable score gives 0 with the reason (never an exception), so a flaky judge cannot crash training.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from rewards.base import RewardInput, RewardResult

Generate = Callable[[list[str]], list[str]]

DEFAULT_TEMPLATE = """You are grading an answer to a problem.

Problem:
{prompt}

Reference answer (may be empty):
{reference}

Answer to grade:
{completion}

Judge correctness and reasoning.
End your reply with a line "Score: N" where N is an integer from 0 to {max_score}.
"""

_SCORE = re.compile(
    r"(?:score\s*[:=]\s*|\[\[\s*|<score>\s*)(-?\d+(?:\.\d+)?)(?:\s*/\s*(\d+(?:\.\d+)?))?", re.IGNORECASE
)


class GenerativeRewardModel:
    def __init__(self, generate: Generate, *, template: str = DEFAULT_TEMPLATE, max_score: float = 10.0):
        if max_score <= 0:
            raise ValueError(f"genrm: max_score must be > 0, got {max_score}")
        self.generate, self.template, self.max_score = generate, template, max_score

    def judge_prompt(self, inp: RewardInput) -> str:
        ref = "" if inp.reference is None else str(inp.reference)
        return self.template.format(
            prompt=inp.prompt, completion=inp.completion, reference=ref, max_score=int(self.max_score)
        )

    def parse(self, text: str) -> RewardResult:
        """The last "Score: N" (or "[[N]]", "<score>N</score>", "N/M"), scaled to [0, 1]."""
        found = None
        for found in _SCORE.finditer(text or ""):  # noqa: B007 - the verdict is the last score written
            pass
        if found is None:
            return RewardResult(0.0, f"genrm: unparsable judge output: {(text or '')[-80:]!r}")
        value = float(found.group(1))
        scale = float(found.group(2)) if found.group(2) else self.max_score
        if scale <= 0 or not 0 <= value <= scale:
            return RewardResult(0.0, f"genrm: score {value} outside [0, {scale}]")
        return RewardResult(value / scale)

    def score_batch(self, inputs: Sequence[RewardInput]) -> list[RewardResult]:
        """One ``generate`` call for the whole batch."""
        outputs = self.generate([self.judge_prompt(x) for x in inputs])
        if len(outputs) != len(inputs):
            raise RuntimeError(f"genrm: judge returned {len(outputs)} outputs for {len(inputs)} prompts")
        return [self.parse(o) for o in outputs]

    def __call__(self, inp: RewardInput) -> RewardResult:
        return self.score_batch([inp])[0]
