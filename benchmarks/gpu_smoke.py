"""GPU smoke checks for one machine with one CUDA GPU (run through benchmarks/gpu_smoke.sh); one JSON report.

Checks (each passes, fails or is skipped, with its numbers):
- gpu_tests: the `gpu`-marked tests (pytest -m gpu).
- vllm_logprobs: the vLLM engine (bf16 body, FP32 head) on a tiny Qwen2 saved locally: its behaviour log-probs
  against the learner's FP32-head log-probs (cispo.algo.logprobs.token_logprobs on the same bf16 body).
- vllm_sync_object_store: greedy output before and after engine.load_weights (the object-store path):
  after the sync it must equal the greedy output of an engine-independent recompute with the new weights.
- vllm_sync_broadcast: the same through engine.receive_weights from a learner-side process over the weight
  channel: NCCL with 2+ GPUs; with one GPU NCCL refuses two ranks on one device, so gloo carries CUDA
  tensors and the report says so (the NCCL path then stays unconfirmed).
- cispo_train_bf16: `cispo-train` for --steps steps with rollout=vllm and model.dtype=bfloat16.
This script has not run on a GPU in this project yet.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

CHECKS = ("gpu_tests", "vllm_logprobs", "vllm_sync_object_store", "vllm_sync_broadcast", "cispo_train_bf16")
REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_out = Path(os.environ["OUT"]) / "gpu_smoke.json" if os.environ.get("OUT") else None
    parser.add_argument("--out", type=Path, default=default_out or REPO / "benchmarks/results/gpu_smoke.json")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/cispo_gpu_smoke"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--only", nargs="*", choices=CHECKS, default=list(CHECKS))
    parser.add_argument("--logprob-tolerance", type=float, default=5e-2, help="max |behaviour - learner|")
    parser.add_argument("--test-timeout", type=int, default=240)
    parser.add_argument("--train-timeout", type=int, default=300)
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    return args


class Report:
    """Every check's status and numbers; written as one JSON object."""

    def __init__(self, environment: dict[str, Any] | None = None) -> None:
        self.environment = dict(environment or {})
        self.checks: dict[str, dict[str, Any]] = {}

    def add(self, name: str, status: str, **numbers: Any) -> None:
        if status not in ("pass", "fail", "skip"):
            raise ValueError(f"status must be pass, fail or skip, got {status!r}")
        self.checks[name] = {"status": status, **numbers}

    def run(self, name: str, check: Callable[[], tuple[bool, dict[str, Any]]]) -> None:
        start = time.perf_counter()
        try:
            ok, numbers = check()
            self.add(name, "pass" if ok else "fail", seconds=round(time.perf_counter() - start, 2), **numbers)
        except Exception as exc:  # a broken check is a failed check, the others still run
            self.add(
                name, "fail", seconds=round(time.perf_counter() - start, 2),
                error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()[-4000:],
            )  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        counts = {s: sum(c["status"] == s for c in self.checks.values()) for s in ("pass", "fail", "skip")}
        return {
            "ok": counts["fail"] == 0 and counts["pass"] > 0,
            "counts": counts,
            "environment": self.environment,
            "checks": self.checks,
        }

    def write(self, path: Path) -> dict[str, Any]:
        data = self.to_dict()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2, default=str) + "\n")
        return data


def environment() -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": sys.version.split()[0],
    }
    if torch.cuda.is_available():
        env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    try:
        import vllm

        env["vllm"] = vllm.__version__
    except ImportError:
        env["vllm"] = None
    return env


# ------------------------------------------------------------------------------------------ the checks


def make_model(directory: Path, seed: int = 0) -> Path:
    """A tiny dense Qwen2 (char vocabulary size) saved with save_pretrained: FP32 weights, no download."""
    from cispo.core.testing import tiny_lm
    from cispo.driver.policy import CHAR_TOKENIZER, load_tokenizer

    tokenizer = load_tokenizer("builtin:char")
    model = tiny_lm("qwen2", seed, vocab_size=len(tokenizer), hidden_size=128, num_hidden_layers=2)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    assert CHAR_TOKENIZER.exists()
    return directory


def check_gpu_tests(args: argparse.Namespace) -> tuple[bool, dict[str, Any]]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests", "-p", "no:cacheprovider"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=args.test_timeout)
    tail = (proc.stdout + proc.stderr)[-3000:]
    return proc.returncode in (0, 5), {"returncode": proc.returncode, "output_tail": tail}


def _engine(path: Path) -> Any:
    from rollout.vllm_engine import VLLMEngine

    return VLLMEngine(
        model_path=str(path), dtype="bfloat16", gpu_memory_utilization=0.25, max_model_len=512,
        enforce_eager=True,
    )  # fmt: skip


def learner_logprobs(model: Any, prompt: list[int], response: list[int]) -> Any:
    """The learner's view: one forward of the bf16 body, the head in FP32 (cispo.algo.logprobs)."""
    import torch

    from cispo.algo.logprobs import token_logprobs

    ids = torch.tensor([prompt + response], device="cuda")
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state[0, len(prompt) - 1 : -1]
        head = model.lm_head.weight
        logprobs, _ = token_logprobs(hidden, head, torch.tensor(response, device="cuda"))
    return logprobs.float().cpu()


def _policy(path: Path, dtype: str = "bfloat16") -> Any:
    """The learner's policy as the driver holds it: the body in `dtype`, an FP32 copy of the head."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
    head = model.lm_head.weight.detach().clone()
    model = model.to(getattr(torch, dtype))
    model.lm_head.weight = torch.nn.Parameter(head, requires_grad=False)
    return model


PROMPTS = [[3, 4, 5, 6], [7, 8, 9, 10], [11, 12, 13, 14], [5, 9, 2, 8]]


def check_logprobs(args: argparse.Namespace, engine: Any, path: Path) -> tuple[bool, dict[str, Any]]:
    import torch

    from cispo.core.types import SamplingParams

    gens = engine.generate(PROMPTS * 4, SamplingParams(max_new_tokens=48, seed=1))
    policy = _policy(path)
    diffs = torch.cat([
        (torch.tensor(g.logprobs) - learner_logprobs(policy, p, g.response_ids)).abs()
        for p, g in zip(PROMPTS * 4, gens)
    ])  # fmt: skip
    worst, mean = float(diffs.max()), float(diffs.mean())
    numbers = {"tokens": int(diffs.numel()), "max_abs_diff": worst, "mean_abs_diff": mean}
    numbers["fp32_head_from_checkpoint"] = engine.fp32_head_from_checkpoint
    return worst < args.logprob_tolerance and all(engine.fp32_head_from_checkpoint), numbers


def greedy(engine: Any) -> list[list[int]]:
    from cispo.core.types import SamplingParams

    return [
        g.response_ids for g in engine.generate(PROMPTS, SamplingParams(max_new_tokens=16, temperature=1e-6))
    ]


def reference_greedy(path_or_model: Any) -> list[list[int]]:
    """Greedy continuation by full forwards of the bf16 body with the FP32 head (no cache)."""
    import torch

    model = _policy(path_or_model) if isinstance(path_or_model, Path) else path_or_model
    out = []
    for prompt in PROMPTS:
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(16):
                hidden = model.model(input_ids=torch.tensor([ids], device="cuda")).last_hidden_state[0, -1]
                ids.append(int((model.lm_head.weight.float() @ hidden.float()).argmax()))
        out.append(ids[len(prompt) :])
    return out


def _agreement(a: list[list[int]], b: list[list[int]]) -> float:
    pairs = [(x, y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
    return sum(x == y for x, y in pairs) / max(len(pairs), 1)


def check_sync_object_store(engine: Any, workdir: Path) -> tuple[bool, dict[str, Any]]:
    from safetensors.torch import load_file

    before = greedy(engine)
    new_dir = make_model(workdir / "policy_b", seed=1)
    engine.load_weights(load_file(str(new_dir / "model.safetensors")), version=1)
    after = greedy(engine)
    expected = reference_greedy(new_dir)
    agreement = _agreement(after, expected)
    numbers = {"changed": before != after, "agreement_with_new_weights": agreement, "version": engine.version}
    return before != after and agreement >= 0.9 and engine.version == 1, numbers


def _sender(path: str, port: int, world: int, backend: str, bucket_bytes: int) -> None:
    """The learner side: rank 0 of the weight channel, broadcasting a saved state dict from cuda."""
    from safetensors.torch import load_file

    from cispo.core.weight_channel import broadcast_state_dict, init_weight_group

    device = "cuda:1" if backend == "nccl" else "cuda:0"
    group = init_weight_group("127.0.0.1", port, 0, world, backend, timeout_s=120)
    broadcast_state_dict(group, load_file(path), device, bucket_bytes)


def check_sync_broadcast(engine: Any, workdir: Path) -> tuple[bool, dict[str, Any]]:
    import multiprocessing as mp
    import socket

    import torch
    from safetensors.torch import load_file

    from cispo.core.weight_channel import state_dict_metas

    backend = "nccl" if torch.cuda.device_count() >= 2 else "gloo"
    new_dir = make_model(workdir / "policy_c", seed=2)
    weights = str(new_dir / "model.safetensors")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bucket_bytes = 1 << 20  # several buckets even for the tiny model: both sides must cut the same plan
    ctx = mp.get_context("spawn")
    sender = ctx.Process(target=_sender, args=(weights, port, 2, backend, bucket_bytes))
    sender.start()
    engine.init_weight_group("127.0.0.1", port, 1, 2, backend)
    before = greedy(engine)
    engine.receive_weights(state_dict_metas(load_file(weights)), 2, bucket_bytes)
    sender.join(120)
    after = greedy(engine)
    agreement = _agreement(after, reference_greedy(new_dir))
    numbers = {
        "backend": backend,
        "nccl_confirmed": backend == "nccl",
        "sender_exitcode": sender.exitcode,
        "changed": before != after,
        "agreement_with_new_weights": agreement,
    }
    return sender.exitcode == 0 and agreement >= 0.9, numbers


def check_train(args: argparse.Namespace, workdir: Path) -> tuple[bool, dict[str, Any]]:
    path = make_model(workdir / "policy_train", seed=3)
    run_dir = workdir / "train_run"
    cmd = [
        "cispo-train", "rollout=vllm", "learner=torch", f"model.name={path}", "model.tokenizer=builtin:char",
        "model.dtype=bfloat16", "model.warmstart.enabled=false", f"experiment.total_steps={args.steps}",
        f"experiment.eval_every={args.steps}", f"experiment.checkpoint_every={args.steps}",
        "experiment.name=gpu_smoke", "data.prompts_per_step=8", "data.num_eval=16", "algorithm.group_size=4",
        "rollout.num_workers=1", "rollout.max_new_tokens=16", "rollout.num_cpus_per_worker=2",
        "+rollout.engine_kwargs.enforce_eager=true", "+rollout.engine_kwargs.gpu_memory_utilization=0.3",
        "cluster.gpus_per_node=1", "cluster.rollout_gpus=1",
        "logging.wandb=disabled", "logging.progress=false",
        f"hydra.run.dir={run_dir}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=args.train_timeout)
    metrics_file = run_dir / "metrics.jsonl"
    rows = (
        [json.loads(line) for line in metrics_file.read_text().splitlines()] if metrics_file.exists() else []
    )
    steps = [r for r in rows if "step" in r]
    losses = [r.get("loss") for r in steps if isinstance(r.get("loss"), (int, float))]
    numbers = {
        "returncode": proc.returncode,
        "steps_logged": len(steps),
        "last_loss": losses[-1] if losses else None,
        "output_tail": (proc.stdout + proc.stderr)[-3000:],
        "command": " ".join(cmd),
    }
    finite = all(math.isfinite(x) for x in losses)
    return proc.returncode == 0 and len(steps) >= args.steps and finite, numbers


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = Report(environment())
    args.workdir.mkdir(parents=True, exist_ok=True)
    if "gpu_tests" in args.only:
        report.run("gpu_tests", lambda: check_gpu_tests(args))
    engine_checks = [
        c for c in ("vllm_logprobs", "vllm_sync_object_store", "vllm_sync_broadcast") if c in args.only
    ]
    if engine_checks:
        path = make_model(args.workdir / "policy_a")
        holder: dict[str, Any] = {}

        def build() -> tuple[bool, dict[str, Any]]:
            holder["engine"] = _engine(path)
            return True, {}

        report.run("vllm_engine_start", build)
        engine = holder.get("engine")
        for name in engine_checks:
            if engine is None:
                report.add(name, "skip", reason="the vLLM engine did not start")
                continue
            check = {
                "vllm_logprobs": lambda: check_logprobs(args, engine, path),
                "vllm_sync_object_store": lambda: check_sync_object_store(engine, args.workdir),
                "vllm_sync_broadcast": lambda: check_sync_broadcast(engine, args.workdir),
            }[name]
            report.run(name, check)
        holder.clear()
        del engine
    if "cispo_train_bf16" in args.only:
        report.run("cispo_train_bf16", lambda: check_train(args, args.workdir))
    data = report.write(args.out)
    print(json.dumps({"ok": data["ok"], "counts": data["counts"], "report": str(args.out)}))
    return 0 if data["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
