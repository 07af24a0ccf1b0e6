"""Seconds per rollout batch of CISPO updates: our single-process TorchLearner, our DeepSpeed learner (ZeRO-2
and ZeRO-3 on 2 ranks) and TRL's GRPOTrainer(loss_type="cispo", epsilon_high=5.0), on a tiny Qwen3-MoE with
a realistic 8,192-token vocabulary (cispo.core.testing.tiny_lm("qwen3_moe"): h256, 4 layers, 8 experts top-2).

Same for every contender: the seeded model weights, fp32, the batch (prompts x generations rows, a fixed
prompt and fixed-length completions), K (optimizer steps per rollout batch, each over a disjoint 1/K of its
rows: ours split_minibatches + one train_steps call (the driver's path), TRL steps_per_generation=K with
per_device_train_batch_size = rows / K) and the CPU threads: `--threads` in total per contender (torch and
TRL: one process with that many torch threads; DeepSpeed: `--ranks` rank processes with threads / ranks
each). Every run is its own subprocess with OMP_NUM_THREADS / MKL_NUM_THREADS set and torch.set_num_threads
called; the threads torch reports at the end are recorded.

Timed unit: one rollout batch's K updates (forward, backward, clipping, optimizer step), after warm-up
batches. TRL's step also generates (and, for K > 1, recomputes the old log-probs with an extra no-grad
forward): the whole _generate_and_score_completions is timed and subtracted, in TRL's favour. Rounds are
interleaved: each round runs every case once, in an order that rotates from round to round; the table gives
the median over rounds, the speed-up vs TRL from the medians, and the per-round speed-ups (TRL's seconds /
the contender's in the same round): their median and min-max. The per-round median is the figure that
survives a few rounds disturbed by other jobs on the machine; the 1-minute load around each run is kept
in the JSON.
Peak memory is the max RSS of the process (plus its rank processes, summed).

    python benchmarks/learner_throughput.py [--rounds 3] [--ks 1,4,16] [--threads 2] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from report import write_report

CASES = ("torch", "deepspeed-zero2", "deepspeed-zero3", "trl")
PROMPT = "12+34="
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
# Options every per-case subprocess gets, forwarded as given (the one place that lists them).
FORWARDED = ("prompts", "generations", "completion", "vocab", "threads", "ranks", "batches", "warmup", "seed")


def _hwm_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _tokenizer(vocab: int):
    """A character-level fast tokenizer with exactly `vocab` entries (built here, nothing downloaded)."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    symbols = list(SPECIALS) + list(string.digits + string.ascii_letters + string.punctuation + " ")
    symbols += [f"<t{i}>" for i in range(vocab - len(symbols))]
    core = Tokenizer(models.WordLevel({s: i for i, s in enumerate(symbols)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tok.padding_side = "left"  # generation (TRL) pads prompts on the left
    assert len(tok) == vocab, len(tok)
    return tok


def _model(args: argparse.Namespace):
    from cispo.core.testing import tiny_lm

    # Same seed and config for every contender, so the same weights; fp32 throughout.
    ids = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    return tiny_lm("qwen3_moe", args.seed, vocab_size=args.vocab, **ids)


def _batch(args: argparse.Namespace, tok):
    import math

    import torch

    from cispo.core.types import TrainBatch

    prompt = tok(PROMPT)["input_ids"]
    rows, p, c = args.prompts * args.generations, len(prompt), args.completion
    gen = torch.Generator().manual_seed(args.seed)
    completion = torch.randint(len(SPECIALS), args.vocab, (rows, c), generator=gen)
    ids = torch.cat([torch.tensor(prompt).expand(rows, p), completion], 1)
    response = torch.zeros(rows, p + c)
    response[:, p:] = 1
    # Behaviour log-probs near the random-init model's own (about uniform over the vocabulary).
    old = response * (-math.log(args.vocab) + 0.1 * torch.randn(rows, p + c, generator=gen))
    adv = torch.randn(rows, generator=gen)
    return TrainBatch(ids, torch.ones_like(ids), response, old, adv, torch.arange(rows) // args.generations)


def run_ours(case: str, args: argparse.Namespace) -> dict:
    import torch

    from cispo.core.config import AlgorithmConfig, LearnerConfig
    from cispo.driver.batch import split_minibatches
    from cispo.learner import build_learner

    backend = "torch" if case == "torch" else "deepspeed"
    per_rank = max(1, args.threads // args.ranks)
    torch.set_num_threads(args.threads if backend == "torch" else per_rank)
    tok = _tokenizer(args.vocab)
    model, batch = _model(args), _batch(args, tok)
    cfg = LearnerConfig(
        lr=3e-5,
        warmup_steps=0,
        num_threads=args.threads,
        zero_stage={"deepspeed-zero3": 3}.get(case, 2),
        num_ranks=args.ranks,
    )
    algorithm = AlgorithmConfig(updates_per_batch=args.k)
    extra = {"threads_per_rank": per_rank} if backend == "deepspeed" else {}
    learner = build_learner(backend, model=model, cfg=cfg, algorithm=algorithm, **extra)
    split = torch.Generator().manual_seed(args.seed)
    times = []
    for index in range(args.warmup + args.batches):
        start = time.perf_counter()
        learner.train_steps(split_minibatches(batch, args.k, split))
        if index >= args.warmup:
            times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if backend == "deepspeed":
        # The ranks are Ray actors of this process's local cluster: their pids are in the placement.
        peak += sum(_hwm_mb(entry["pid"]) for entry in learner.placement)
    learner.close()
    return {
        "batch_seconds": times,
        "tokens_per_batch": batch.num_response_tokens(),
        "peak_mb": peak,
        "processes": args.ranks if backend == "deepspeed" else 1,
        "threads_each": per_rank if backend == "deepspeed" else torch.get_num_threads(),
    }


def run_trl(args: argparse.Namespace) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(args.threads)
    tok = _tokenizer(args.vocab)
    model = _model(args)
    rows = args.prompts * args.generations
    if rows % args.k:
        raise ValueError(f"rows ({rows}) must divide into K={args.k} minibatches")
    total = args.warmup + args.batches
    config = GRPOConfig(
        output_dir="/tmp/cispo_trl_bench",
        loss_type="cispo",
        epsilon_high=5.0,
        beta=0.0,
        router_aux_loss_coef=0.0,  # TRL would take Qwen3-MoE's own 0.001; ours trains no aux loss by default
        learning_rate=3e-5,
        adam_beta2=0.95,
        adam_epsilon=1e-15,
        max_grad_norm=1.0,
        num_generations=args.generations,
        per_device_train_batch_size=rows // args.k,
        gradient_accumulation_steps=1,
        steps_per_generation=args.k,
        num_iterations=1,
        max_completion_length=args.completion,
        generation_kwargs={"min_new_tokens": args.completion},
        max_steps=total * args.k,
        use_cpu=True,
        report_to=[],
        logging_steps=10**6,
        save_strategy="no",
        bf16=False,
        dataloader_num_workers=0,
        gradient_checkpointing=False,  # TRL defaults it on; ours recomputes nothing either
        seed=args.seed,
    )
    data = Dataset.from_dict({"prompt": [PROMPT] * (args.prompts * (total + 1))})
    gen = torch.Generator().manual_seed(args.seed)

    def reward(completions, **_kwargs):
        return torch.rand(len(completions), generator=gen).tolist()

    trainer = GRPOTrainer(
        model=model, reward_funcs=reward, args=config, train_dataset=data, processing_class=tok
    )
    generation = {"seconds": 0.0}
    original = trainer._generate_and_score_completions

    def timed_generation(*a, **k):
        start = time.perf_counter()
        out = original(*a, **k)
        generation["seconds"] += time.perf_counter() - start
        return out

    trainer._generate_and_score_completions = timed_generation
    steps: list[float] = []

    class StepTimer(TrainerCallback):
        # on_step_begin .. on_step_end spans training_step (forward, backward; generation inside it is
        # subtracted), gradient clipping, optimizer.step, the scheduler and zero_grad.
        def on_step_begin(self, *_a, **_k):
            self.start, self.generation = time.perf_counter(), generation["seconds"]

        def on_step_end(self, *_a, **_k):
            steps.append(time.perf_counter() - self.start - (generation["seconds"] - self.generation))

    trainer.add_callback(StepTimer())
    trainer.train()
    per_batch = [sum(steps[i * args.k : (i + 1) * args.k]) for i in range(total)]
    return {
        "batch_seconds": per_batch[args.warmup :],
        "tokens_per_batch": rows * args.completion,
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "processes": 1,
        "threads_each": torch.get_num_threads(),
    }


def run_case(case: str, k: int, args: argparse.Namespace) -> dict | None:
    threads = args.threads if case in ("torch", "trl") else max(1, args.threads // args.ranks)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    command = [sys.executable, __file__, "--case", case, "--k", str(k), *_forward_args(args)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=1800, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        print(f"{case} K={k} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
        return None
    result = json.loads(lines[-1])
    result.update(case=case, k=k, seconds=statistics.median(result["batch_seconds"]))
    print(f"{case} K={k}: {result['seconds']:.3f} s / rollout batch", file=sys.stderr, flush=True)
    return result


def _forward_args(args: argparse.Namespace) -> list[str]:
    return [item for name in FORWARDED for item in (f"--{name}", str(getattr(args, name)))]


def summarise(runs: list[dict], ks: list[int], cases: list[str]) -> list[dict]:
    """Per (K, case): median over rounds of the per-round seconds, and per-round speed-ups vs TRL."""
    out = []
    for k in ks:
        trl = {r["round"]: r["seconds"] for r in runs if r["k"] == k and r["case"] == "trl"}
        for case in cases:
            mine = [r for r in runs if r["k"] == k and r["case"] == case]
            if not mine:
                continue
            seconds = statistics.median(r["seconds"] for r in mine)
            ratios = [trl[r["round"]] / r["seconds"] for r in mine if r["round"] in trl]
            out.append(
                {
                    "case": case,
                    "k": k,
                    "rounds": len(mine),
                    "seconds_median": seconds,
                    "seconds_per_round": [r["seconds"] for r in mine],
                    "tokens_per_s": mine[0]["tokens_per_batch"] / seconds,
                    "peak_mb": max(r["peak_mb"] for r in mine),
                    "processes": mine[0]["processes"],
                    "threads_each": mine[0]["threads_each"],
                    "vs_trl": statistics.median(trl.values()) / seconds if trl else None,
                    "vs_trl_round_median": statistics.median(ratios) if ratios else None,
                    "vs_trl_min": min(ratios) if ratios else None,
                    "vs_trl_max": max(ratios) if ratios else None,
                }
            )
    return out


def table(summary: list[dict], args: argparse.Namespace, load: list[str]) -> str:
    batch = f"{args.prompts}x{args.generations}x{args.completion}"
    lines = [
        f"Tiny Qwen3-MoE (h256, 4 layers, 8 experts top-2, vocab {args.vocab:,}), fp32, batch {batch} "
        f"(prompts x generations x completion tokens), {args.threads} CPU threads per contender; median of "
        f"{args.rounds} interleaved round(s), {args.batches} timed rollout batch(es) per run after "
        f"{args.warmup} warm-up; load average {' '.join(load[:3])} (1/5/15 min) at start, "
        f"{load[3]} at the end",
        "",
        "| learner | K | processes x threads | dtype | batch | s / rollout batch | trained tokens/s "
        "| peak RSS (MB) | vs TRL (medians) | vs TRL per round: median (min-max) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary:
        ratio = f"{r['vs_trl']:.2f}x" if r["vs_trl"] else "n/a"
        spread = (
            f"{r['vs_trl_round_median']:.2f}x ({r['vs_trl_min']:.2f}-{r['vs_trl_max']:.2f}x)"
            if r["vs_trl_min"]
            else "n/a"
        )
        unit = "rank" if r["case"].startswith("deepspeed") else "proc"
        lines.append(
            f"| {r['case']} | {r['k']} | {r['processes']} {unit} x {r['threads_each']} | fp32 | {batch} "
            f"| {r['seconds_median']:.3f} | {r['tokens_per_s']:,.0f} | {r['peak_mb']:,.0f} "
            f"| {ratio} | {spread} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--completion", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads per contender in total")
    parser.add_argument("--ranks", type=int, default=2, help="DeepSpeed ranks (threads / ranks each)")
    parser.add_argument("--ks", default="1,4,16", help="optimizer steps per rollout batch, comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=5, help="timed rollout batches per run (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rollout batches per run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke check: 1 round, K=1, 1 timed batch")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--out", default="benchmarks/results/learner_throughput.json")
    parser.add_argument("--case", choices=CASES, help="run one case in this process (internal)")
    parser.add_argument("--k", type=int, default=1, help="K of the --case run (internal)")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_trl(args) if args.case == "trl" else run_ours(args.case, args)))
        return
    if args.quick:
        args.rounds, args.ks, args.batches = 1, "1", 1
    ks = [int(k) for k in args.ks.split(",")]
    cases = [c for c in args.cases.split(",") if c != "trl" or _has_trl()]
    if "trl" not in cases:
        print("TRL is not installed: no baseline (pip install trl)", file=sys.stderr)
    load = open("/proc/loadavg").read().split()[:3]
    runs = []
    for round_ in range(args.rounds):
        for k in ks:
            shift = (round_ + ks.index(k)) % len(cases)
            for case in cases[shift:] + cases[:shift]:
                print(f"round {round_ + 1}/{args.rounds}: ", file=sys.stderr, end="", flush=True)
                before = _load()
                result = run_case(case, k, args)
                if result is not None:
                    runs.append({**result, "round": round_, "load_1min_before_after": [before, _load()]})
    load.append(open("/proc/loadavg").read().split()[0])
    summary = summarise(runs, ks, cases)
    config = {key: value for key, value in vars(args).items() if key not in ("case", "k")}
    result = {"config": config, "load_start_1_5_15min_end_1min": load, "summary": summary, "runs": runs}
    write_report(args.out, result, table(summary, args, load))


def _load() -> float:
    return float(open("/proc/loadavg").read().split()[0])


def _has_trl() -> bool:
    import importlib.util

    return importlib.util.find_spec("trl") is not None


if __name__ == "__main__":
    main()
