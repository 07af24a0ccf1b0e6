"""Tokens/s and peak memory of CISPO updates on the tiny MoE (MiniMax: h128, 4 layers, 4 experts top-2):
the single-process TorchLearner, the DeepSpeed learner on 2 ranks with ZeRO-2 and ZeRO-3, and TRL's
GRPOTrainer(loss_type="cispo", epsilon_high=5.0) when TRL is installed.

Same model, batch (prompts x generations rows, fixed prompt and completion lengths) and number of updates
for all. Only the update is timed: TRL's step also generates, so its generation time (the wrapped
_generate_and_score_completions) is subtracted. Trained tokens = completion tokens. Every case runs in
its own subprocess; peak memory is the max RSS of that process (plus its rank processes, summed).
Two CPU threads per case in total (the DeepSpeed cases: one per rank).

    python benchmarks/learner_throughput.py [--prompts 8] [--generations 8] [--completion 32] [--updates 4]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

from report import write_report

CASES = ("torch", "deepspeed-zero2", "deepspeed-zero3", "trl")


def _hwm_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _model_and_batch(args: argparse.Namespace):
    import torch

    from cispo.core.config import ModelConfig
    from cispo.core.types import TrainBatch
    from cispo.driver.policy import build_policy, load_tokenizer

    tok = load_tokenizer("builtin:char")
    model = build_policy(ModelConfig(), tok, seed=0)
    prompt = tok("12+34=")["input_ids"]
    rows, p, c = args.prompts * args.generations, len(prompt), args.completion
    gen = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.tensor(prompt).expand(rows, p), torch.randint(4, 30, (rows, c), generator=gen)], 1)
    response = torch.zeros(rows, p + c)
    response[:, p:] = 1
    old = response * (-torch.rand(rows, p + c, generator=gen) * 3 - 1)
    adv = torch.randn(rows, generator=gen)
    batch = TrainBatch(ids, torch.ones_like(ids), response, old, adv, torch.arange(rows) // args.generations)
    return model, tok, batch


def run_ours(case: str, args: argparse.Namespace) -> dict:
    import torch

    from cispo.core.config import AlgorithmConfig, LearnerConfig
    from cispo.learner import build_learner

    model, _, batch = _model_and_batch(args)
    stage = {"deepspeed-zero2": 2, "deepspeed-zero3": 3}.get(case, 2)
    backend = "torch" if case == "torch" else "deepspeed"
    cfg = LearnerConfig(lr=3e-5, warmup_steps=0, num_threads=args.threads, zero_stage=stage, num_ranks=2)
    torch.set_num_threads(args.threads)
    learner = build_learner(backend, model=model, cfg=cfg, algorithm=AlgorithmConfig())
    learner.train_step(batch)  # warm-up (first-call allocations, DeepSpeed buffers)
    start = time.perf_counter()
    for _ in range(args.updates):
        learner.train_step(batch)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if backend == "deepspeed":
        peak += sum(_hwm_mb(proc.pid) for proc in learner._procs)
    learner.close()
    return {"seconds": seconds, "tokens": args.updates * batch.num_response_tokens(), "peak_mb": peak}


def run_trl(args: argparse.Namespace) -> dict:
    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(args.threads)
    model, tok, _ = _model_and_batch(args)
    rows = args.prompts * args.generations
    config = GRPOConfig(
        output_dir="/tmp/cispo_trl_bench",
        loss_type="cispo",
        epsilon_high=5.0,
        beta=0.0,
        learning_rate=3e-5,
        adam_beta2=0.95,
        adam_epsilon=1e-15,
        max_grad_norm=1.0,
        num_generations=args.generations,
        per_device_train_batch_size=rows,
        gradient_accumulation_steps=1,
        max_completion_length=args.completion,
        generation_kwargs={"min_new_tokens": args.completion},
        max_steps=args.updates + 1,
        use_cpu=True,
        report_to=[],
        logging_steps=1000,
        save_strategy="no",
        bf16=False,
        dataloader_num_workers=0,
        gradient_checkpointing=False,  # TRL defaults it on; ours recomputes nothing either
    )
    data = Dataset.from_dict({"prompt": ["12+34="] * (rows * (args.updates + 1))})
    gen = torch.Generator().manual_seed(0)

    def reward(completions, **_kwargs):
        return torch.rand(len(completions), generator=gen).tolist()

    trainer = GRPOTrainer(
        model=model, reward_funcs=reward, args=config, train_dataset=data, processing_class=tok
    )
    generation = {"seconds": 0.0}
    original = trainer._generate_and_score_completions

    def timed(*a, **k):
        start = time.perf_counter()
        out = original(*a, **k)
        generation["seconds"] += time.perf_counter() - start
        return out

    trainer._generate_and_score_completions = timed
    steps = {"times": []}
    original_step = trainer.training_step

    def timed_step(*a, **k):
        before, start = generation["seconds"], time.perf_counter()
        out = original_step(*a, **k)
        steps["times"].append(time.perf_counter() - start - (generation["seconds"] - before))
        return out

    trainer.training_step = timed_step
    trainer.train()
    # The optimizer step runs outside training_step in the HF Trainer; it is tiny next to forward+backward
    # for this model, so it is left out of TRL's time (in TRL's favour).
    return {
        "seconds": sum(steps["times"][1:]),
        "tokens": args.updates * rows * args.completion,
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def run_case(case: str, args: argparse.Namespace) -> dict | None:
    command = [sys.executable, __file__, "--case", case] + _forward_args(args)
    proc = subprocess.run(command, capture_output=True, text=True, timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        print(f"{case} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    result = json.loads(lines[-1])
    result.update(case=case, tokens_per_s=result["tokens"] / result["seconds"])
    return result


def _forward_args(args: argparse.Namespace) -> list[str]:
    return [
        "--prompts",
        str(args.prompts),
        "--generations",
        str(args.generations),
        "--completion",
        str(args.completion),
        "--updates",
        str(args.updates),
    ]


def table(results: list[dict], args: argparse.Namespace) -> str:
    trl = next((r for r in results if r["case"] == "trl"), None)
    lines = [
        f"Tiny MiniMax MoE (1.84M params), {args.prompts} prompts x {args.generations} generations, "
        f"{args.completion}-token completions, {args.updates} CISPO updates, "
        f"{args.threads} torch thread(s) for torch and TRL, 1 per DeepSpeed rank (2 ranks)",
        "",
        "| learner | s / update | trained tokens/s | peak RSS (MB) | vs TRL |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        ratio = f"{r['tokens_per_s'] / trl['tokens_per_s']:.2f}x" if trl else "n/a"
        lines.append(
            f"| {r['case']} | {r['seconds'] / args.updates:.3f} | {r['tokens_per_s']:,.0f} | "
            f"{r['peak_mb']:,.0f} | {ratio} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--completion", type=int, default=32)
    parser.add_argument("--updates", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the torch and TRL cases")
    parser.add_argument("--case", choices=CASES, help="run one case in this process (internal)")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--out", default="benchmarks/results/learner_throughput.json")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_trl(args) if args.case == "trl" else run_ours(args.case, args)))
        return
    cases = [c for c in args.cases.split(",") if c != "trl" or _has_trl()]
    results = [r for r in (run_case(c, args) for c in cases) if r is not None]
    text = table(results, args)
    write_report(args.out, {"config": vars(args), "results": results}, text)


def _has_trl() -> bool:
    import importlib.util

    return importlib.util.find_spec("trl") is not None


if __name__ == "__main__":
    main()
