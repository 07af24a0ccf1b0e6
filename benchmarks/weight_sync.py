"""Weight sync, learner -> 2 rollout workers: straight from learner rank 0 over the weight channel (gloo on
CPU) against the object-store path through the driver (rank 0 -> driver -> ray.put -> workers).

Both paths use the framework's own code: a DeepSpeedLearner with one ZeRO-2 rank (a Ray actor) and a
RolloutManager with 2 RolloutWorker actors running the hf engine on the same saved model. For each model
size and path: seconds per sync (median of --reps, rounds interleaved) and the driver's peak RSS above its
RSS before the sync (VmHWM, reset through /proc/self/clear_refs before each sync).

    python benchmarks/weight_sync.py            # 50 MB and 500 MB (fp32), prints a table, writes JSON + md
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import write_report  # noqa: E402
from cispo.core.config import AlgorithmConfig, LearnerConfig, ModelConfig  # noqa: E402
from cispo.core.testing import tiny_lm  # noqa: E402
from cispo.driver.policy import load_policy  # noqa: E402
from cispo.learner import build_learner  # noqa: E402
from rollout.manager import RolloutManager  # noqa: E402
from rollout.weight_sync import BroadcastWeightSync  # noqa: E402

# (hidden, layers, intermediate, vocab): about 54 MB and 545 MB of fp32 weights.
SIZES = {50: (384, 4, 1024, 8192), 500: (1024, 8, 2816, 16384)}


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def save_model(mb: int, into: Path) -> int:
    hidden, layers, inter, vocab = SIZES[mb]
    model = tiny_lm(
        "qwen2", 0, vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, intermediate_size=inter,
        num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256, tie_word_embeddings=False,
    )  # fmt: skip
    model.save_pretrained(into)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    del model
    return nbytes


def setup(model_dir: Path, threads: int) -> tuple[Any, Any, Any]:
    cfg = LearnerConfig(num_ranks=1, zero_stage=2, num_threads=threads, warmup_steps=0)
    learner = build_learner(
        "deepspeed",
        model=__import__("functools").partial(load_policy, str(model_dir), ModelConfig(name=str(model_dir))),
        cfg=cfg,
        algorithm=AlgorithmConfig(),
        threads_per_rank=threads,
    )
    engine = {"model_path": str(model_dir), "dtype": "float32", "max_batch_size": 8, "num_threads": threads}
    # 1 rank + 2 x 2 workers = 5 logical CPUs (main sizes the local Ray instance so).
    store = RolloutManager("hf", engine, num_workers=2, num_threads_per_worker=threads)
    broadcast = RolloutManager(
        "hf", engine, num_workers=2, num_threads_per_worker=threads, weight_sync=BroadcastWeightSync(learner)
    )
    return learner, store, broadcast


def one_sync(path: str, learner: Any, store: Any, broadcast: Any, version: int) -> tuple[float, float]:
    base = rss_mb()
    reset_peak()
    start = time.perf_counter()
    if path == "object_store":
        store.update_weights(learner.state_dict_for_sync(), version)
    else:
        broadcast.broadcast_weights(version)
    seconds = time.perf_counter() - start
    return seconds, peak_rss_mb() - base


def bench(mb: int, reps: int, threads: int) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        nbytes = save_model(mb, Path(tmp))
        learner, store, broadcast = setup(Path(tmp), threads)
        try:
            runs: dict[str, list[tuple[float, float]]] = {"object_store": [], "broadcast": []}
            for rep in range(reps + 1):  # round 0 warms both paths up (group set-up, first loads)
                for path in runs:
                    result = one_sync(path, learner, store, broadcast, rep + 1)
                    if rep:
                        runs[path].append(result)
        finally:
            store.shutdown()
            broadcast.shutdown()
            learner.close()
    return [
        {
            "model_mb": round(nbytes / 2**20),
            "path": path,
            "workers": 2,
            "seconds_median": statistics.median(s for s, _ in values),
            "seconds_min": min(s for s, _ in values),
            "seconds_max": max(s for s, _ in values),
            "driver_peak_rss_above_base_mb": max(r for _, r in values),
        }
        for path, values in runs.items()
    ]


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        f"Weight sync to 2 rollout workers (hf engine), fp32, {meta['threads']} thread(s) per process, "
        f"median of {meta['reps']} interleaved round(s) after a warm-up round; load average {meta['load']}",
        "",
        "| model | path | s / sync (median) | min-max | driver peak RSS above its base (MB) |",
        "|---|---|---|---|---|",
    ]
    names = {
        "object_store": "rank 0 -> driver -> object store -> workers",
        "broadcast": "rank 0 -> workers (gloo)",
    }
    for r in rows:
        lines.append(
            f"| {r['model_mb']} MB | {names[r['path']]} | {r['seconds_median']:.3f} | "
            f"{r['seconds_min']:.3f}-{r['seconds_max']:.3f} | {r['driver_peak_rss_above_base_mb']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 500], choices=sorted(SIZES))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "weight_sync.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import ray

    ray.init(num_cpus=5, include_dashboard=False, _temp_dir=f"/tmp/ray_ws_{os.getpid()}")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    rows = [row for mb in args.sizes for row in bench(mb, args.reps, args.threads)]
    meta = {"threads": args.threads, "reps": args.reps, "load": load}
    write_report(args.out, {"rows": rows, **meta}, markdown(rows, meta))


if __name__ == "__main__":
    main()
