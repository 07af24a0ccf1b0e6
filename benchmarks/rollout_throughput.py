"""Rollout throughput: the hf engine and the Ray worker layer against a plain model.generate loop.

Question: what do our own decode loop (FP32 head, exact log-probs) and the Ray worker layer cost against
transformers' generate on the same tiny MoE, and how long does a weight sync take?
Targets: engine tokens/s >= plain generate's; 1 worker within 10% of plain generate at the same batch.

    python benchmarks/rollout_throughput.py [--quick] [--out benchmarks/results/rollout_throughput.json]
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import tempfile
import time
from typing import Any

import torch
from report import write_report

from cispo.core.testing import tiny_lm
from cispo.core.types import PromptGroup, SamplingParams
from rollout.engine import build_engine
from rollout.manager import RolloutManager
from rollout.weight_sync import NcclWeightSync, ObjectStoreWeightSync

PROMPT_LEN = 16


def tiny_moe(dtype: torch.dtype) -> torch.nn.Module:
    """Qwen3-MoE, hidden 256, 4 layers, 8 experts top-2, vocab 8192: ~11M parameters."""
    return tiny_lm("qwen3_moe", seed=0).to(dtype).eval()


def prompts(batch: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(batch)
    row = torch.randint(10, 8000, (PROMPT_LEN,), generator=gen).tolist()
    return [row] * batch  # one length bucket, like a group of samples


def plain_generate(model: torch.nn.Module, batch: int, new_tokens: int) -> float:
    ids = torch.tensor(prompts(batch), device=model.device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0, top_p=1.0,
            max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0,
        )  # fmt: skip
    return (out.shape[1] - PROMPT_LEN) * batch / (time.perf_counter() - start)


def engine_generate(engine: Any, batch: int, new_tokens: int) -> float:
    start = time.perf_counter()
    gens = engine.generate(prompts(batch), SamplingParams(max_new_tokens=new_tokens))
    return sum(len(g.response_ids) for g in gens) / (time.perf_counter() - start)


def manager_generate(manager: RolloutManager, batch: int, new_tokens: int, group_size: int = 8) -> float:
    row = prompts(1)[0]
    groups = [
        PromptGroup(index=i, prompt_ids=row, prompt_text="", reference=None, group_size=group_size)
        for i in range(batch // group_size)
    ]
    start = time.perf_counter()
    samples = manager.generate(groups, SamplingParams(max_new_tokens=new_tokens))
    return sum(len(s.response_ids) for s in samples) / (time.perf_counter() - start)


def bench_dtype(
    dtype_name: str, batches: list[int], new_tokens: int, reps: int, device: str = "cpu"
) -> list[dict[str, Any]]:
    """Median tokens/s of each contender, measured in interleaved rounds.

    Interleaving (generate, engine, 1 worker, 2 workers, then again) exposes every contender to the same
    drift of a shared machine; the median of `reps` rounds then resists a single slow or fast outlier.
    """
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    # Engines and workers get the CPU copy (each engine moves its own deep copy to `device`; Ray ships a
    # CPU module to a worker whatever GPU it was given); plain generate runs on the device.
    cpu_model = tiny_moe(dtype)
    model = copy.deepcopy(cpu_model).to(device)
    kwargs = {"model": cpu_model, "dtype": dtype_name, "max_batch_size": max(batches), "device": device}
    engine = build_engine("hf", num_threads=2, **kwargs)
    gpu_share = 1.0 if device.startswith("cuda") else 0.0
    # Both managers live at once (the idle one only waits); their Ray CPU shares add up to the box's two.
    managers = {
        workers: RolloutManager(
            "hf",
            kwargs,
            num_workers=workers,
            num_cpus_per_worker=1 / workers,
            num_gpus_per_worker=gpu_share / workers,
            num_threads_per_worker=2 // workers,
        )
        for workers in (1, 2)
    }
    contenders = {
        "generate": lambda b: plain_generate(model, b, new_tokens),
        "engine": lambda b: engine_generate(engine, b, new_tokens),
        **{f"workers{w}": lambda b, m=m: manager_generate(m, b, new_tokens) for w, m in managers.items()},
    }
    plain_generate(model, 8, 4), engine_generate(engine, 8, 4)  # warm-up
    for manager in managers.values():
        manager_generate(manager, 8, 4)
    rows = []
    for b in batches:
        runs: dict[str, list[float]] = {name: [] for name in contenders}
        for _ in range(reps):
            for name, measure in contenders.items():
                runs[name].append(measure(b))
        row: dict[str, Any] = {"dtype": dtype_name, "batch": b, "new_tokens": new_tokens, "reps": reps}
        row.update({f"{name}_tok_s": statistics.median(values) for name, values in runs.items()})
        row.update({f"{name}_runs": values for name, values in runs.items()})
        row["engine_vs_generate"] = row["engine_tok_s"] / row["generate_tok_s"]
        row["workers1_vs_generate"] = row["workers1_tok_s"] / row["generate_tok_s"]
        row["workers1_vs_engine"] = row["workers1_tok_s"] / row["engine_tok_s"]
        rows.append(row)
    for manager in managers.values():
        manager.shutdown()
    return rows


def random_state_dict(megabytes: int) -> dict[str, torch.Tensor]:
    per_tensor = 4 * 2**20  # 16 MB of fp32 per tensor, like a large projection matrix
    count = max(1, megabytes * 2**20 // (per_tensor * 4))
    return {f"layer{i}.weight": torch.randn(per_tensor // 1024, 1024) for i in range(count)}


class SinkWorker:
    """Receives weights like a RolloutWorker but only touches them: measures transport, not model copies."""

    def __init__(self) -> None:
        torch.set_num_threads(1)
        self.group: Any = None

    def ready(self) -> bool:
        return True

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> int:
        return sum(t.numel() for t in state_dict.values())

    def init_weight_group(self, host: str, port: int, rank: int, world_size: int, backend: str) -> None:
        from rollout.weight_sync import init_weight_group

        self.group = init_weight_group(host, port, rank, world_size, backend)

    def receive_weights(self, metas: list, version: int) -> int:
        from rollout.weight_sync import receive_state_dict

        return sum(t.numel() for t in receive_state_dict(self.group, metas, "cpu").values())


def bench_weight_sync(sizes_mb: list[int], num_workers: int, reps: int) -> list[dict[str, Any]]:
    import socket

    import ray

    workers = [ray.remote(SinkWorker).options(num_cpus=0.5).remote() for _ in range(num_workers)]
    ray.get([w.ready.remote() for w in workers])
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    gloo = NcclWeightSync(workers, "127.0.0.1", port, backend="gloo", device="cpu")
    rows = []
    for mb in sizes_mb:
        state_dict = random_state_dict(mb)
        store = ObjectStoreWeightSync()
        rows.append(
            {
                "state_dict_mb": mb,
                "workers": num_workers,
                "object_store_s": min(store.push(workers, state_dict, v) for v in range(reps)),
                "gloo_broadcast_s": min(gloo.push(state_dict, v) for v in range(reps)),
            }
        )
        del state_dict, store
    for w in workers:
        ray.kill(w)
    return rows


def markdown(throughput: list[dict[str, Any]], sync: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        f"# Rollout throughput ({meta['machine']}, {meta['new_tokens']} new tokens, prompt {PROMPT_LEN})",
        "",
        f"Tiny Qwen3-MoE (~11M params). New tokens/s, median of {meta['reps']} interleaved rounds; ratios vs "
        "plain `model.generate` at the same batch, and of one Ray worker vs the same engine in-process.",
        "",
        "| dtype | batch | generate | engine | 1 worker | 2 workers | engine/gen | 1 worker/gen "
        "| 1 worker/engine |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in throughput:
        lines.append(
            f"| {r['dtype']} | {r['batch']} | {r['generate_tok_s']:.0f} | {r['engine_tok_s']:.0f} | "
            f"{r['workers1_tok_s']:.0f} | {r['workers2_tok_s']:.0f} | {r['engine_vs_generate']:.2f} | "
            f"{r['workers1_vs_generate']:.2f} | {r['workers1_vs_engine']:.2f} |"
        )
    lines += ["", "| state dict | workers | object store (s) | gloo broadcast (s) |", "|---:|---:|---:|---:|"]
    for r in sync:
        lines.append(
            f"| {r['state_dict_mb']} MB | {r['workers']} | {r['object_store_s']:.3f} | "
            f"{r['gloo_broadcast_s']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="32 new tokens and one round instead of 128 tokens and the median of three rounds",
    )
    parser.add_argument("--out", default="benchmarks/results/rollout_throughput.json")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--device", default="cpu", help="cuda: model, engine and workers share one GPU")
    args = parser.parse_args()
    import ray

    os.environ.setdefault("OMP_NUM_THREADS", "2")
    torch.set_num_threads(2)
    batches, sizes = [8, 32, 64], [50, 500]
    new_tokens, reps = (32, 1) if args.quick else (128, 3)
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="ray_bench_"))
    throughput = []
    for dtype in args.dtypes.split(","):
        throughput += bench_dtype(dtype, batches, new_tokens, reps, args.device)
    sync = bench_weight_sync(sizes, num_workers=2, reps=reps)
    meta = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
        + (f", {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else ""),
        "new_tokens": new_tokens,
        "quick": args.quick,
        "reps": reps,
    }
    table = markdown(throughput, sync, meta)
    write_report(args.out, {"meta": meta, "throughput": throughput, "weight_sync": sync}, table)


if __name__ == "__main__":
    main()
