"""Generative reward model: a judge LLM reads a prompt built from the sample and writes a verdict.

The judge is a backend from :mod:`rewards.judges` (``openai``: any OpenAI-compatible endpoint; ``hf``: a
local model through the project's engine) or any callable ``generate(prompts) -> replies``. A whole batch
of samples goes to the judge in one ``generate`` call (the scorer calls :meth:`GenRMReward.score_batch`).

A reply with no verdict in it is an error (:class:`JudgeParseError`), never a silent 0: the scorer counts it
in ``reward/errors``, and a judge that never answers in the expected form stops the run
(``reward.stop_error_fraction``) instead of training on zeros. A failed request is an error too, and a
timed-out one is counted in ``reward/timeouts``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from typing import Any

from cispo.core.registry import import_path
from rewards.base import RewardInput, RewardResult
from rewards.judges import build_judge_backend

Generate = Callable[[list[str]], Sequence[str | Exception]]

SCORE_TEMPLATE = """You are grading an answer to a problem.

Problem:
{prompt}

Reference answer (may be empty):
{reference}

Answer to grade:
{completion}

Judge correctness and reasoning.
End your reply with a line "Score: N" where N is an integer from 0 to {max_score}.
"""

YES_NO_TEMPLATE = """Problem:
{prompt}

Reference answer:
{reference}

Proposed answer:
{completion}

Does the proposed answer agree with the reference answer? Reply with YES or NO.
"""

DEFAULT_TEMPLATE = SCORE_TEMPLATE


class JudgeParseError(ValueError):
    """The judge's reply holds no verdict in the expected form (or one out of range)."""


_SCORE = re.compile(
    r"(?:score\s*[:=]\s*|\[\[\s*|<score>\s*)(-?\d+(?:\.\d+)?)(?:\s*/\s*(\d+(?:\.\d+)?))?", re.IGNORECASE
)
_YES_NO = re.compile(r"\b(yes|no)\b", re.IGNORECASE)


def _tail(text: str) -> str:
    return repr(text[-120:])


def parse_score(text: str, max_score: float) -> float:
    """The last "Score: N" (or "[[N]]", "<score>N", with an optional "/M" scale), scaled to [0, 1]."""
    found = None
    for found in _SCORE.finditer(text):  # noqa: B007 - the verdict is the last score written
        pass
    if found is None:
        raise JudgeParseError(f"genrm: no 'Score: N' in the judge's reply: {_tail(text)}")
    value = float(found.group(1))
    scale = float(found.group(2)) if found.group(2) else max_score
    if scale <= 0 or not 0 <= value <= scale:
        raise JudgeParseError(f"genrm: judge score {value} outside [0, {scale}]: {_tail(text)}")
    return value / scale


def parse_yes_no(text: str, max_score: float) -> float:
    """The first YES / NO word of the reply (a judge answers before it explains): 1 or 0."""
    found = _YES_NO.search(text)
    if found is None:
        raise JudgeParseError(f"genrm: no YES/NO in the judge's reply: {_tail(text)}")
    return 1.0 if found.group(1).lower() == "yes" else 0.0


PARSERS: dict[str, Callable[[str, float], float]] = {"score": parse_score, "yes_no": parse_yes_no}
TEMPLATES = {"score": SCORE_TEMPLATE, "yes_no": YES_NO_TEMPLATE}


class GenerativeRewardModel:
    def __init__(
        self,
        generate: Generate,
        *,
        template: str | None = None,
        max_score: float = 10.0,
        parser: str = "score",
    ) -> None:
        if max_score <= 0:
            raise ValueError(f"genrm: max_score must be > 0, got {max_score}")
        if parser not in PARSERS:
            raise ValueError(f"genrm: unknown parser {parser!r}; choose from {sorted(PARSERS)}")
        self.generate, self.max_score, self.parser = generate, max_score, parser
        self.template = template or TEMPLATES[parser]

    def judge_prompt(self, inp: RewardInput) -> str:
        ref = "" if inp.reference is None else str(inp.reference)
        return self.template.format(
            prompt=inp.prompt, completion=inp.completion, reference=ref, max_score=int(self.max_score)
        )

    def parse(self, text: str) -> RewardResult:
        """The verdict in ``text`` as a score in [0, 1]; JudgeParseError when there is none."""
        return RewardResult(PARSERS[self.parser](text or "", self.max_score))

    def score_batch(self, inputs: Sequence[RewardInput]) -> list[RewardResult | Exception]:
        """One ``generate`` call for the whole batch; a failed or unparsable sample is its exception."""
        outputs = list(self.generate([self.judge_prompt(x) for x in inputs]))
        if len(outputs) != len(inputs):
            raise RuntimeError(f"genrm: judge returned {len(outputs)} outputs for {len(inputs)} prompts")
        results: list[RewardResult | Exception] = []
        for out in outputs:
            if isinstance(out, Exception):
                results.append(out)
                continue
            try:
                results.append(self.parse(out))
            except JudgeParseError as e:
                results.append(e)
        return results

    def __call__(self, inp: RewardInput) -> RewardResult:
        result = self.score_batch([inp])[0]
        if isinstance(result, Exception):
            raise result
        return result


class GenRMReward:
    """The ``genrm`` reward. Exactly one of ``backend`` (a name from ``rewards.judges``, with its
    ``backend_args``) or ``generate`` (a callable or its ``pkg.mod:fn`` path) picks the judge; judges are
    built once per distinct configuration and kept (with their caches) for the life of the process."""

    def __init__(self) -> None:
        self._judges: dict[str, GenerativeRewardModel] = {}

    def judge(
        self,
        *,
        backend: str | None = None,
        backend_args: dict[str, Any] | None = None,
        generate: str | Generate | None = None,
        template: str | None = None,
        max_score: float = 10.0,
        parser: str = "score",
    ) -> GenerativeRewardModel:
        if (backend is None) == (generate is None):
            raise ValueError("genrm reward: set exactly one of 'backend' (e.g. openai, hf) or 'generate'")
        args = dict(backend_args or {})
        gen_key = generate if isinstance(generate, str) or generate is None else f"id:{id(generate)}"
        key = json.dumps([backend, args, gen_key, template, max_score, parser], sort_keys=True, default=str)
        if key not in self._judges:
            if backend is not None:
                fn: Generate = build_judge_backend(backend, **args).generate
            elif isinstance(generate, str):
                fn = import_path(generate, "genrm generate function")
            else:
                fn = generate  # type: ignore[assignment]
            self._judges[key] = GenerativeRewardModel(
                fn, template=template, max_score=max_score, parser=parser
            )
        return self._judges[key]

    def score_batch(self, inputs: Sequence[RewardInput], **kwargs: Any) -> list[RewardResult | Exception]:
        return self.judge(**kwargs).score_batch(inputs)

    def __call__(
        self,
        inp: RewardInput,
        *,
        backend: str | None = None,
        backend_args: dict[str, Any] | None = None,
        generate: str | Generate | None = None,
        template: str | None = None,
        max_score: float = 10.0,
        parser: str = "score",
    ) -> RewardResult:
        judge = self.judge(
            backend=backend,
            backend_args=backend_args,
            generate=generate,
            template=template,
            max_score=max_score,
            parser=parser,
        )
        return judge(inp)


genrm_reward = GenRMReward()
