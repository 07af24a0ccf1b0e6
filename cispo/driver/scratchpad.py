"""A scratchpad task where longer reasoning pays: the sum of several one-digit numbers.

The prompt is ``3+5+8+2+9=``; the target writes the running sums before the final answer, which follows
the marker ``=``: ``8,16,18=27`` (3+5=8, +8=16, +2=18, then +9 gives the answer 27). A model that writes
the scratchpad needs about three tokens per term, so a short generation budget cuts the longer problems
off before their answer and only a longer budget lets them finish: what the tiny curriculum
(``experiment=tiny_curriculum``) is built around. The reward (``rewards.scratchpad``) reads only what
follows the last marker.

The rows go to a JSONL file read by ``data.source=jsonl``; the file's last ``num_eval`` rows are held
out, and no held-out problem occurs among the training rows::

    python -m cispo.driver.scratchpad --out configs/data/scratchpad_sums.jsonl.gz
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import random
from collections.abc import Callable
from pathlib import Path

MARKER = "="


def partial_sums(terms: list[int]) -> list[int]:
    """Running sums: [3, 5, 8] -> [3, 8, 16]."""
    out, total = [], 0
    for term in terms:
        total += term
        out.append(total)
    return out


def prompt_of(terms: list[int]) -> str:
    return "+".join(map(str, terms)) + "="


def target_of(terms: list[int]) -> str:
    """The running sums after each added term but the last, then the marker and the total."""
    if len(terms) < 2:
        raise ValueError("a scratchpad sum needs at least two terms")
    sums = partial_sums(terms)
    return ",".join(map(str, sums[1:-1])) + MARKER + str(sums[-1])


def is_held_out(terms: list[int]) -> bool:
    """About 1 problem in 10 is held out, chosen by a hash of the problem (bucket "eval")."""
    return bucket(terms) == "eval"


def bucket(terms: list[int]) -> str:
    """Three disjoint problem sets by the same hash: "eval" (about 10%, is_held_out), "sft" (about 40%:
    the problems a supervised warm start may show) and "rl" (the rest). "train" is sft and rl together."""
    byte = hashlib.sha256(prompt_of(terms).encode()).digest()[0]
    return "eval" if byte < 26 else "sft" if byte < 128 else "rl"


def in_split(terms: list[int], split: str) -> bool:
    """Whether a problem (keyed by `terms`, see bucket) belongs to `split`; "train" is sft and rl."""
    where = bucket(terms)
    return where != "eval" if split == "train" else where == split


def rows(n: int, split: str, seed: int, min_terms: int, max_terms: int) -> list[dict[str, str]]:
    """n rows {prompt, answer, metadata}; the number of terms is uniform in [min_terms, max_terms], each
    term in 1..9. `split` is "train" or "eval", or "sft" / "rl" (disjoint parts of train, see bucket);
    train and eval rows come from disjoint problem sets (is_held_out)."""
    if split not in ("train", "eval", "sft", "rl"):
        raise ValueError(f"split must be train, eval, sft or rl, got {split!r}")
    if not 2 <= min_terms <= max_terms:
        raise ValueError(f"need 2 <= min_terms <= max_terms, got {min_terms}, {max_terms}")
    rng = random.Random(f"scratchpad-{seed}-{split}")
    out: list[dict[str, str]] = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 100 * n + 10_000:
            raise ValueError(f"could not draw {n} {split} rows with {min_terms}..{max_terms} terms")
        terms = [rng.randint(1, 9) for _ in range(rng.randint(min_terms, max_terms))]
        if not in_split(terms, split):
            continue
        meta = json.dumps({"terms": len(terms)})
        out.append({"prompt": prompt_of(terms), "answer": target_of(terms), "metadata": meta})
    return out


RowsFn = Callable[[int, str, int, int, int], list[dict[str, str]]]


def write_jsonl(
    path: Path,
    num_train: int,
    num_eval: int,
    seed: int,
    min_terms: int,
    max_terms: int,
    split: str = "train",
    draw: RowsFn = rows,
) -> Path:
    """`split` rows (train, sft or rl), then the held-out rows last (data.source=jsonl holds out a file's
    last num_eval rows); gzip-compressed when the name ends in .gz. `draw`: the task's rows function."""
    lines = [json.dumps(r) for r in draw(num_train, split, seed, min_terms, max_terms)]
    lines += [json.dumps(r) for r in draw(num_eval, "eval", seed, min_terms, max_terms)]
    data = ("\n".join(lines) + "\n").encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    # mtime=0: the same rows give the same bytes.
    path.write_bytes(gzip.compress(data, mtime=0) if path.suffix == ".gz" else data)
    return path


def main(
    argv: list[str] | None = None,
    *,
    doc: str = __doc__,
    draw: RowsFn = rows,
    defaults: tuple[int, int, int, str] = (12000, 2, 14, "train"),
) -> None:
    """The generator's command line; `doc`, `draw` and `defaults` (num_train, min_terms, max_terms,
    split) serve another sum task (cispo.driver.longsum) the same way."""
    num_train, min_terms, max_terms, split = defaults
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--num-train", type=int, default=num_train)
    parser.add_argument("--num-eval", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-terms", type=int, default=min_terms)
    parser.add_argument("--max-terms", type=int, default=max_terms)
    parser.add_argument(
        "--split", choices=("train", "sft", "rl"), default=split,
        help="the problems of the non-held-out rows: all (train) or one of its disjoint parts (sft, rl)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    path = write_jsonl(
        args.out, args.num_train, args.num_eval, args.seed, args.min_terms, args.max_terms, args.split, draw
    )
    print(f"wrote {args.num_train} {args.split} + {args.num_eval} held-out rows to {path}")


if __name__ == "__main__":
    main()
