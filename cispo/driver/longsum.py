"""A long-trace task: sums of many labelled one-digit terms, every addition written out.

The prompt labels each term with a letter, ``a3b5c8d2e9=``; the target adds the terms one at a time,
each step naming the term's label, the running sum so far, the term and the new sum:
``b:3+5=8,c:8+8=16,d:16+2=18,e:18+9=27``. The answer is what follows the last ``=`` (the last step's
sum), so ``rewards.scratchpad:scratchpad_reward`` scores it unchanged. The labels make each step local
for a small model: find the next letter's digit in the prompt (a content lookup, not counting positions),
copy the previous sum from the step before, add. About ten tokens a step with the character tokenizer, so
16-18 terms give responses of about 150-180 tokens; no tiny model adds 17 digits without the trace.

Three disjoint problem sets by a hash of the problem, as in cispo.driver.scratchpad (its ``bucket``):
"sft" (the warm start's), "rl" and "eval" (held out). The files of ``experiment=algorithms_long``::

    python -m cispo.driver.longsum --out configs/data/longsum_sft.jsonl.gz --split sft \\
        --min-terms 2 --max-terms 18 --num-train 16000 --num-eval 0
    python -m cispo.driver.longsum --out configs/data/longsum_rl.jsonl.gz --split rl \\
        --min-terms 16 --max-terms 18 --num-train 4000 --num-eval 256
"""

from __future__ import annotations

from pathlib import Path

from cispo.driver import scratchpad
from cispo.driver.scratchpad import partial_sums

LABELS = "abcdefghijklmnopqrstuvwxyz"
MAX_TERMS = len(LABELS)


def prompt_of(terms: list[int]) -> str:
    """``[3, 5, 8]`` -> ``a3b5c8=``."""
    if len(terms) > MAX_TERMS:
        raise ValueError(f"at most {MAX_TERMS} terms (one letter each), got {len(terms)}")
    return "".join(f"{label}{term}" for label, term in zip(LABELS, terms)) + "="


def target_of(terms: list[int]) -> str:
    """One step per term after the first: ``label:sum_before+term=sum_after``, comma-separated; the last
    step's sum is the answer."""
    if not 2 <= len(terms) <= MAX_TERMS:
        raise ValueError(f"a long sum needs 2..{MAX_TERMS} terms, got {len(terms)}")
    sums = partial_sums(terms)
    steps = [f"{LABELS[i]}:{sums[i - 1]}+{terms[i]}={sums[i]}" for i in range(1, len(terms))]
    return ",".join(steps)


def terms_of(prompt: str) -> list[int]:
    """The inverse of prompt_of: ``a3b5c8=`` -> ``[3, 5, 8]``."""
    body = prompt.removesuffix("=")
    return [int(body[i + 1]) for i in range(0, len(body), 2)]


def rows(n: int, split: str, seed: int, min_terms: int, max_terms: int) -> list[dict[str, str]]:
    """n rows {prompt, answer, metadata}, the number of terms uniform in [min_terms, max_terms], each term
    in 1..9, drawn from one bucket: "eval", "sft" or "rl" ("train" is sft and rl together)."""
    if max_terms > MAX_TERMS:
        raise ValueError(f"need 2 <= min_terms <= max_terms <= {MAX_TERMS}, got {min_terms}, {max_terms}")
    return scratchpad.rows(
        n, split, seed, min_terms, max_terms, task="longsum", prompt=prompt_of, target=target_of
    )


def write_jsonl(
    path: Path, num_train: int, num_eval: int, seed: int, min_terms: int, max_terms: int, split: str = "train"
) -> Path:
    """`split` rows, then the held-out rows last, as cispo.driver.scratchpad writes them."""
    return scratchpad.write_jsonl(path, num_train, num_eval, seed, min_terms, max_terms, split, draw=rows)


def main(argv: list[str] | None = None) -> None:
    scratchpad.main(argv, doc=__doc__, draw=rows, defaults=(8000, 16, 18, "rl"))


if __name__ == "__main__":
    main()
