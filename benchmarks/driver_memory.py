"""The driver's peak RSS against model size: does the driver materialise the policy?

Two dense models saved as Hugging Face directories (about 10M and 200M parameters, the project's character
tokenizer), each trained for 3 CISPO steps by `cispo-train model.name=<dir>` with the DeepSpeed learner
(2 ZeRO-3 ranks on Ray, weights broadcast from rank 0 to the engine) and, for contrast, with the torch
learner (which lives in the driver). The driver's own peak RSS comes from the run's final metrics row
(`system/driver_peak_rss_mb`, the driver process's own VmHWM: Ray workers and learner ranks are not in it).

    python benchmarks/driver_memory.py          # prints a table, writes JSON + md under benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import write_report  # noqa: E402

# name -> (hidden, layers, intermediate, heads)
SIZES = {"10M": (256, 8, 1024, 4), "200M": (1024, 12, 4096, 16)}


def save_model(size: str, into: Path | str) -> int:
    from cispo.core.testing import tiny_lm
    from cispo.driver.policy import load_tokenizer

    tok = load_tokenizer("builtin:char")
    hidden, layers, inter, heads = SIZES[size]
    model = tiny_lm(
        "qwen2",
        0,
        vocab_size=len(tok),
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=inter,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    model.save_pretrained(into)
    tok.save_pretrained(into)
    return sum(p.numel() for p in model.parameters())


def run(model_dir: Path, learner: str, run_dir: Path) -> dict[str, Any]:
    overrides = [
        f"hydra.run.dir={run_dir}",
        f"model.name={model_dir}",
        f"learner={learner}",
        "learner.zero_stage=3",
        "learner.num_threads=1",
        "model.warmstart.enabled=false",
        "experiment.total_steps=3",
        "experiment.eval_every=0",
        "experiment.checkpoint_every=0",
        "data.prompts_per_step=4",
        "data.num_eval=4",
        # A random-init policy earns no exact-match reward; the length penalty varies with each sample's
        # length, so both steps train and sync weights (the driver's memory is measured doing its job).
        "reward.rewards=[{name:overlong,weight:1.0,kwargs:{max_len:4,cache_len:4}}]",
        "logging.wandb=disabled",
        "logging.progress=false",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled"}
    out = subprocess.run(
        [sys.executable, "-m", "cispo.driver.cli", *overrides], capture_output=True, text=True, env=env
    )
    if out.returncode != 0:
        raise RuntimeError(f"{learner} on {model_dir} failed:\n{out.stdout[-2000:]}{out.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = next(r for r in reversed(rows) if "system/driver_peak_rss_mb" in r)
    trained = sum(1 for r in rows if isinstance(r.get("cispo/loss"), float))
    return {"driver_peak_rss_mb": final["system/driver_peak_rss_mb"], "steps_trained": trained}


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        f"Driver peak RSS over a 3-step CISPO run (`cispo-train`, dense Qwen2, fp32, char tokenizer); "
        f"load average {meta['load']} at start",
        "",
        "| model | parameters | learner | weights in the driver | steps trained | driver peak RSS (MB) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        where = "no (loaded on the ranks)" if r["learner"] == "deepspeed" else "yes (it is the learner)"
        lines.append(
            f"| {r['model']} | {r['parameters'] / 1e6:.1f}M | {r['learner']} | {where} | "
            f"{r['steps_trained']} | {r['driver_peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--learners", nargs="+", default=["deepspeed", "torch"])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "driver_memory.json"))
    args = parser.parse_args()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in SIZES:
            model_dir = Path(tmp) / size
            # In a child process: this one then never holds a model, whatever the runs inherit from it.
            code = "from benchmarks.driver_memory import save_model; "
            code += f"print(save_model({size!r}, {str(model_dir)!r}))"
            made = subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
            )
            parameters = int(made.stdout.strip().splitlines()[-1])
            for learner in args.learners:
                result = run(model_dir, learner, Path(tmp) / f"run_{size}_{learner}")
                rows.append({"model": size, "parameters": parameters, "learner": learner, **result})
                print(rows[-1], flush=True)
    write_report(args.out, {"rows": rows, "load": load}, markdown(rows, {"load": load}))


if __name__ == "__main__":
    main()
