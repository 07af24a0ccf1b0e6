"""A long-trace task: a Fibonacci walk modulo 100, every step written out.

The prompt gives two two-digit numbers and the label of the last step, ``13+21:e=``; each step adds the
last two numbers modulo 100 and names its label (``b``, ``c``, ... in order):
``b:13+21=34,c:21+34=55,d:34+55=89,e:55+89=44``. The answer is what follows the last ``=`` (the last
step's number), so ``rewards.scratchpad:scratchpad_reward`` scores it unchanged. Numbers are always two
digits (``07``), so every step is 11 characters and 14-16 steps give responses of 154-176 tokens with the
character tokenizer. Every step is local for a small model: copy the second operand and the result of the
step before, add the two-digit numbers dropping the hundred, write the next letter, stop at the prompt's
letter. No tiny model jumps 15 steps of the walk without the trace (the walk's period is 300).

Three disjoint problem sets by a hash of the two starting numbers (cispo.driver.scratchpad's ``in_split``):
"sft" (the warm start's), "rl" and "eval" (held out), so no warm-start trace begins where a held-out one
does. ``--min-terms`` / ``--max-terms`` count the steps (the new terms of the walk). The files of
``experiment=algorithms_long``::

    python -m cispo.driver.longsum --out configs/data/longsum_sft.jsonl.gz --split sft \\
        --min-terms 2 --max-terms 16 --num-train 16000 --num-eval 0
    python -m cispo.driver.longsum --out configs/data/longsum_rl.jsonl.gz --split rl \\
        --min-terms 14 --max-terms 16 --num-train 4000 --num-eval 256
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from cispo.driver import scratchpad
from cispo.driver.scratchpad import in_split

LABELS = "abcdefghijklmnopqrstuvwxyz"
MAX_STEPS = len(LABELS) - 1  # the first step is "b": "a" is the prompt's pair
MODULUS = 100


def walk(first: int, second: int, steps: int) -> list[int]:
    """The numbers after the starting pair: ``walk(13, 21, 4) == [34, 55, 89, 44]``."""
    if not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"a walk takes 1..{MAX_STEPS} steps (one letter each), got {steps}")
    if not (0 <= first < MODULUS and 0 <= second < MODULUS):
        raise ValueError(f"the starting numbers must be in 0..{MODULUS - 1}, got {first}, {second}")
    numbers = [first, second]
    for _ in range(steps):
        numbers.append((numbers[-2] + numbers[-1]) % MODULUS)
    return numbers[2:]


def prompt_of(first: int, second: int, steps: int) -> str:
    """``(13, 21, 4)`` -> ``13+21:e=`` (the last step's label)."""
    walk(first, second, steps)  # the same checks
    return f"{first:02d}+{second:02d}:{LABELS[steps]}="


def target_of(first: int, second: int, steps: int) -> str:
    """One step per new number, ``label:before+last=next``, comma-separated; the last number is the answer."""
    numbers = [first, second, *walk(first, second, steps)]
    return ",".join(
        f"{LABELS[i]}:{numbers[i - 1]:02d}+{numbers[i]:02d}={numbers[i + 1]:02d}" for i in range(1, steps + 1)
    )


def problem_of(prompt: str) -> tuple[int, int, int]:
    """The inverse of prompt_of: ``13+21:e=`` -> ``(13, 21, 4)``."""
    pair, _, label = prompt.removesuffix("=").partition(":")
    first, _, second = pair.partition("+")
    return int(first), int(second), LABELS.index(label)


def rows(n: int, split: str, seed: int, min_terms: int, max_terms: int) -> list[dict[str, str]]:
    """n rows {prompt, answer, metadata}, the steps uniform in [min_terms, max_terms], the starting pair
    uniform in 00..99 and drawn from one bucket of the pair: "eval", "sft" or "rl" ("train": sft and rl)."""
    if split not in ("train", "eval", "sft", "rl"):
        raise ValueError(f"split must be train, eval, sft or rl, got {split!r}")
    if not 1 <= min_terms <= max_terms <= MAX_STEPS:
        raise ValueError(f"need 1 <= min_terms <= max_terms <= {MAX_STEPS}, got {min_terms}, {max_terms}")
    rng = random.Random(f"longsum-{seed}-{split}")
    out: list[dict[str, str]] = []
    while len(out) < n:
        first, second = rng.randrange(MODULUS), rng.randrange(MODULUS)
        steps = rng.randint(min_terms, max_terms)
        if not in_split([first, second], split):
            continue
        meta = json.dumps({"steps": steps})
        out.append({"prompt": prompt_of(first, second, steps), "answer": target_of(first, second, steps),
                    "metadata": meta})  # fmt: skip
    return out


def write_jsonl(
    path: Path, num_train: int, num_eval: int, seed: int, min_terms: int, max_terms: int, split: str = "train"
) -> Path:
    """`split` rows, then the held-out rows last, as cispo.driver.scratchpad writes them."""
    return scratchpad.write_jsonl(path, num_train, num_eval, seed, min_terms, max_terms, split, draw=rows)


def main(argv: list[str] | None = None) -> None:
    scratchpad.main(argv, doc=__doc__, draw=rows, defaults=(4000, 14, 16, "rl"))


if __name__ == "__main__":
    main()
