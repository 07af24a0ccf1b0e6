"""Packed against padded learner updates: trained tokens/s and the padded fraction.

A dense tiny Qwen2 and a hybrid tiny MiniMax (lightning + softmax attention, MoE; packing is exact for
both: the lightning state restarts at every packed sequence, cispo/models/lightning.py) each take one
CISPO train_step (forward, backward, AdamW) on rows of mixed length: prompts of 32 tokens, responses
uniform in [8, max_response]. Four layouts:
  padded        all rows in one right-padded [B, L] micro-batch
  padded-sorted token-budget micro-batches of rows sorted by length (learner.micro_batch_tokens)
  packed        all rows end to end in one [1, T] stream (position_ids restart, block-diagonal mask)
  packed-budget the padded-sorted micro-batches, each packed into one stream
On CPU (SDPA with an explicit [T, T] mask) attention still computes the masked-out blocks, so one long
stream costs O(T_total^2): packing pays off only with a varlen kernel (flash-attention on GPU), or in
bounded packs. The table shows both.
plus the max |log-prob| difference of packed vs padded (a boundary leak would be O(0.1)).

    python benchmarks/packing.py [--models dense,hybrid] [--rows 32] [--max-response 480] [--repeats 2]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from report import write_report

from cispo.core.config import AlgorithmConfig, LearnerConfig
from cispo.core.testing import tiny_lm
from cispo.core.types import TrainBatch
from cispo.learner.micro_batches import token_budget_chunks
from cispo.learner.packing import check_packing, packed_sequence_logprobs, padded_fraction
from cispo.learner.torch_learner import TorchLearner

PROMPT = 32


def dense_model(vocab: int) -> torch.nn.Module:
    return tiny_lm(
        "qwen2", seed=0, vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024, tie_word_embeddings=False,
    )  # fmt: skip


def hybrid_model(vocab: int) -> torch.nn.Module:
    """Lightning, softmax, lightning, softmax; 4 experts top-2; block_size 256 like MiniMax-Text-01."""
    return tiny_lm(
        "minimax", seed=0, vocab_size=vocab, hidden_size=256, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, head_dim=32, block_size=256,
        max_position_embeddings=1024, tie_word_embeddings=False,
    )  # fmt: skip


MODELS = {
    "dense": ("Dense Qwen2 (h256, 4 layers)", dense_model),
    "hybrid": ("Hybrid MiniMax (h256, 2 lightning + 2 softmax layers, 4 experts top-2)", hybrid_model),
}


def make_batch(rows: int, max_response: int, vocab: int, seed: int = 0) -> TrainBatch:
    gen = torch.Generator().manual_seed(seed)
    responses = torch.randint(8, max_response + 1, (rows,), generator=gen)
    length = PROMPT + int(responses.max())
    input_ids = torch.zeros(rows, length, dtype=torch.long)
    attention = torch.zeros(rows, length, dtype=torch.long)
    response_mask = torch.zeros(rows, length)
    for b, n in enumerate(responses.tolist()):
        input_ids[b, : PROMPT + n] = torch.randint(1, vocab, (PROMPT + n,), generator=gen)
        attention[b, : PROMPT + n] = 1
        response_mask[b, PROMPT : PROMPT + n] = 1
    old = torch.where(response_mask > 0, -torch.rand(rows, length, generator=gen) * 4 - 1, torch.zeros(()))
    return TrainBatch(
        input_ids, attention, response_mask, old, torch.randn(rows, generator=gen), torch.arange(rows) // 8
    )


def time_update(model: torch.nn.Module, batch: TrainBatch, budget: int, packing: bool, repeats: int) -> float:
    cfg = LearnerConfig(warmup_steps=0, micro_batch_tokens=budget, num_threads=torch.get_num_threads())
    cfg.packing = packing
    learner = TorchLearner(copy.deepcopy(model), cfg, AlgorithmConfig())
    learner.train_step(batch)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        learner.train_step(batch)
    return (time.perf_counter() - start) / repeats


def run_model(name: str, batch: TrainBatch, args: argparse.Namespace) -> dict:
    model = MODELS[name][1](args.vocab)
    check_packing(model)
    real_tokens = int(batch.attention_mask.sum())
    with torch.no_grad():
        padded_lp = TorchLearner(model, LearnerConfig(num_threads=0), AlgorithmConfig()).compute_logprobs(
            batch
        )
        packed_lp, _ = packed_sequence_logprobs(model, batch)
    big = batch.input_ids.numel() * 2
    layouts = [
        ("padded", big, False, padded_fraction(batch)),
        ("padded-sorted", args.budget, False, None),
        ("packed", big, True, 0.0),
        ("packed-budget", args.budget, True, 0.0),
    ]
    rows = []
    for layout, budget, packing, fraction in layouts:
        if fraction is None:
            chunks = token_budget_chunks(batch, budget)
            computed = sum(len(c) * int(batch.attention_mask[c].sum(1).max()) for c in chunks)
            fraction = 1 - real_tokens / computed
        seconds = time_update(model, batch, budget, packing, args.repeats)
        rows.append(
            {
                "layout": layout,
                "padded_fraction": fraction,
                "seconds": seconds,
                "tokens_per_s": real_tokens / seconds,
            }
        )
    return {
        "model": name,
        "description": MODELS[name][0],
        "max_abs_logprob_diff_packed_vs_padded": float((padded_lp - packed_lp).abs().max()),
        "results": rows,
    }


def run(args: argparse.Namespace) -> dict:
    batch = make_batch(args.rows, args.max_response, args.vocab)
    return {
        "rows": args.rows,
        "max_response": args.max_response,
        "real_tokens": int(batch.attention_mask.sum()),
        "threads": torch.get_num_threads(),
        "models": [run_model(name, batch, args) for name in args.models.split(",")],
    }


def table(result: dict) -> str:
    lines = [
        f"{result['rows']} rows, prompt {PROMPT} + response 8..{result['max_response']}"
        f" ({result['real_tokens']} real tokens), {result['threads']} threads, one CISPO train_step",
    ]
    for model in result["models"]:
        lines += [
            "",
            model["description"],
            "",
            "| layout | padded fraction | s / update | trained tokens/s | speed-up |",
            "|---|---|---|---|---|",
        ]
        base = model["results"][0]["tokens_per_s"]
        for r in model["results"]:
            lines.append(
                f"| {r['layout']} | {r['padded_fraction']:.1%} | {r['seconds']:.3f} |"
                f" {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / base:.2f}x |"
            )
        diff = model["max_abs_logprob_diff_packed_vs_padded"]
        lines += ["", f"max |log-prob(packed) - log-prob(padded)| = {diff:.2e}"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="dense,hybrid", help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--max-response", type=int, default=480)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--budget", type=int, default=4096, help="micro_batch_tokens of padded-sorted")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/packing.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = run(args)
    text = table(result)
    write_report(args.out, result, text)


if __name__ == "__main__":
    main()
