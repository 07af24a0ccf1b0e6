"""Packed against padded learner updates: trained tokens/s and the padded fraction.

A dense tiny Qwen2 (packing is exact for it) takes one CISPO train_step (forward, backward, AdamW) on
rows of mixed length: prompts of 32 tokens, responses uniform in [8, max_response]. Three layouts:
  padded        all rows in one right-padded [B, L] micro-batch
  padded-sorted token-budget micro-batches of rows sorted by length (learner.micro_batch_tokens)
  packed        all rows end to end in one [1, T] stream (position_ids restart, block-diagonal mask)
  packed-budget the padded-sorted micro-batches, each packed into one stream
On CPU (SDPA with an explicit [T, T] mask) attention still computes the masked-out blocks, so one long
stream costs O(T_total^2): packing pays off only with a varlen kernel (flash-attention on GPU), or in
bounded packs. The table shows both.
plus the max |log-prob| difference of packed vs padded (a boundary leak would be O(0.1)). The hybrid
MiniMax is listed as refused: its lightning-attention state would cross sequence boundaries.

    python benchmarks/packing.py [--rows 32] [--max-response 480] [--repeats 3] [--out PATH]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from report import write_report

from cispo.core.config import AlgorithmConfig, LearnerConfig, ModelConfig
from cispo.core.testing import tiny_lm
from cispo.core.types import TrainBatch
from cispo.driver.policy import build_policy, load_tokenizer
from cispo.learner.micro_batches import token_budget_chunks
from cispo.learner.packing import (
    PackingNotSupported,
    check_packing,
    packed_sequence_logprobs,
    padded_fraction,
)
from cispo.learner.torch_learner import TorchLearner

PROMPT = 32


def dense_model(vocab: int) -> torch.nn.Module:
    return tiny_lm(
        "qwen2", seed=0, vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024, tie_word_embeddings=False,
    )  # fmt: skip


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


def run(args: argparse.Namespace) -> dict:
    model = dense_model(args.vocab)
    batch = make_batch(args.rows, args.max_response, args.vocab)
    real_tokens = int(batch.attention_mask.sum())
    with torch.no_grad():
        padded_lp = TorchLearner(model, LearnerConfig(num_threads=0), AlgorithmConfig()).compute_logprobs(
            batch
        )
        packed_lp, _ = packed_sequence_logprobs(model, batch)
    max_diff = float((padded_lp - packed_lp).abs().max())
    big = batch.input_ids.numel() * 2
    layouts = [
        ("padded", big, False, padded_fraction(batch)),
        ("padded-sorted", args.budget, False, None),
        ("packed", big, True, 0.0),
        ("packed-budget", args.budget, True, 0.0),
    ]
    rows = []
    for name, budget, packing, fraction in layouts:
        if fraction is None:
            chunks = token_budget_chunks(batch, budget)
            computed = sum(len(c) * int(batch.attention_mask[c].sum(1).max()) for c in chunks)
            fraction = 1 - real_tokens / computed
        seconds = time_update(model, batch, budget, packing, args.repeats)
        rows.append(
            {
                "layout": name,
                "padded_fraction": fraction,
                "seconds": seconds,
                "tokens_per_s": real_tokens / seconds,
            }
        )
    try:
        check_packing(build_policy(ModelConfig(), load_tokenizer("builtin:char")))
        minimax = "allowed"
    except PackingNotSupported as err:
        minimax = f"refused: {str(err)[:120]}..."
    return {
        "rows": args.rows,
        "max_response": args.max_response,
        "real_tokens": real_tokens,
        "threads": torch.get_num_threads(),
        "max_abs_logprob_diff_packed_vs_padded": max_diff,
        "results": rows,
        "minimax_packing": minimax,
    }


def table(result: dict) -> str:
    lines = [
        f"Dense Qwen2 (h256, 4 layers), {result['rows']} rows, "
        f"prompt {PROMPT} + response 8..{result['max_response']}"
        f" ({result['real_tokens']} real tokens), {result['threads']} threads, one CISPO train_step",
        "",
        "| layout | padded fraction | s / update | trained tokens/s | speed-up |",
        "|---|---|---|---|---|",
    ]
    base = result["results"][0]["tokens_per_s"]
    for r in result["results"]:
        lines.append(
            f"| {r['layout']} | {r['padded_fraction']:.1%} | {r['seconds']:.3f} | {r['tokens_per_s']:,.0f} |"
            f" {r['tokens_per_s'] / base:.2f}x |"
        )
    lines += [
        "",
        f"max |log-prob(packed) - log-prob(padded)| = {result['max_abs_logprob_diff_packed_vs_padded']:.2e}",
        f"hybrid MiniMax: packing {result['minimax_packing']}",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
