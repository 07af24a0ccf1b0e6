"""benchmarks/algorithms_stats.py and the study driver around it, by hand on synthetic curves (no training):
the 95% intervals, the censored steps to target, the chosen-on-the-tuning-seed rule, the plans of the
three phases, and --resume skipping finished runs after an interruption."""

import json
import math

import pytest

from benchmarks import algorithms as bench
from benchmarks import algorithms_stats as stats
from benchmarks.algorithms_stats import RunSpec

STEPS = [0, 10, 20, 30]


def _run(algo="cispo", k=4, seed=100, lr=3e-5, kw=None, accs=(0.2, 0.3, 0.4, 0.5), phase="tune", total=30):
    kw = kw if kw is not None else dict(stats.CLIP_GRID[algo][0])
    spec = RunSpec("scratchpad", phase, algo, k, seed, lr, stats._kwargs(kw))
    steps = list(range(1, total + 1))
    return {**spec.record(), "interval": [0.0, 5.0], "process_wall_s": 100.0, "steps": steps,
            "wall_s": [2.0 * s for s in steps],
            "eval": {"step": STEPS[: len(accs)], "wall_s": [2.0 * s for s in STEPS[: len(accs)]],
                     "accuracy": list(accs)},
            "series": {"entropy": [1.0] * (total - 1) + [0.5], "loss/clip_frac": [0.1] * total,
                       "ratio/cap_frac_high": [0.2] * total, "ratio/abs_log_last": [0.05] * total,
                       "rollout/samples_generated": [128] * total}}  # fmt: skip


def test_t_quantiles_and_intervals_by_hand():
    assert stats.t_quantile_975(1) == pytest.approx(12.706, abs=1e-3)
    assert stats.t_quantile_975(2) == pytest.approx(4.303, abs=1e-3)
    assert stats.t_quantile_975(4) == pytest.approx(2.776, abs=1e-3)
    mean, half = stats.mean_ci([1.0, 2.0, 3.0])  # s = 1: half-width t_{0.975,2} * 1 / sqrt(3)
    assert mean == 2.0 and half == pytest.approx(4.303 * 0.5774, abs=1e-3)  # 2.484
    assert stats.mean_ci([0.5]) == (0.5, pytest.approx(float("nan"), nan_ok=True))  # no spread from one
    assert all(math.isnan(x) for x in stats.mean_ci([]))


def test_censored_steps_to_target_by_hand():
    runs = [
        _run(seed=0, accs=(0.2, 0.5, 0.6, 0.6), phase="report", total=60),  # reaches 0.5 at step 10
        _run(seed=1, accs=(0.2, 0.3, 0.5, 0.6), phase="report", total=60),  # at step 20
        _run(seed=2, accs=(0.2, 0.3, 0.3, 0.4), phase="report", total=60),  # never: censored at 60
    ]
    cell = stats.summarise(runs, target=0.5)["cells"]["report/K4/cispo"]
    assert cell["seeds"] == 3 and cell["reached"] == 2
    # Reached seeds only: mean 15, s = 7.071, half-width 12.706 * 7.071 / sqrt(2) = 63.53.
    assert cell["steps_to_target"] == (15.0, pytest.approx(63.53, abs=0.01))
    # Censored [10, 20, 60]: mean 30, s = sqrt(700) = 26.458, half-width 4.303 * 26.458 / sqrt(3) = 65.73.
    assert cell["steps_to_target_censored"] == (30.0, pytest.approx(65.73, abs=0.01))
    assert cell["final_accuracy"][0] == pytest.approx((0.6 + 0.6 + 0.4) / 3)
    assert cell["mean_accuracy"][0] == pytest.approx((1.7 / 3 + 1.4 / 3 + 1.0 / 3) / 3)
    assert cell["entropy_last"] == 0.5 and cell["cap_frac_high"] == pytest.approx(0.2)
    dapo = [_run("dapo", seed=s, accs=(0.2, 0.3, 0.3, 0.5), phase="report", total=60) for s in range(3)]
    cells = stats.summarise(runs + dapo, target=0.5)["cells"]
    assert cells["report/K4/cispo"]["steps_ratio_vs_dapo"] == pytest.approx(15 / 30)
    assert cells["report/K4/cispo"]["censored_ratio_vs_dapo"] == pytest.approx(30 / 30)


def test_differences_and_verdicts_by_hand():
    # a = [1, 2, 3], b = [4, 5, 6, 7]: diff -3.5; s_a^2/n_a = 1/3, s_b^2/n_b = (5/3)/4 = 5/12, sum 3/4;
    # Welch df = (3/4)^2 / ((1/3)^2/2 + (5/12)^2/3) = 4.96 -> 4 (t 2.776); half 2.776 * sqrt(3/4) = 2.404.
    diff, half = stats.difference_ci([1, 2, 3], [4, 5, 6, 7])
    assert diff == -3.5 and half == pytest.approx(2.404, abs=1e-3)
    assert stats.verdict((diff, half)) == "faster"  # fewer steps, the interval excludes 0
    assert stats.verdict((3.5, 2.404)) == "slower" and stats.verdict((-2.0, 2.404)) == "equal"
    assert stats.difference_ci([60, 60], [60, 60]) == (0.0, 0.0) and stats.verdict((0.0, 0.0)) == "equal"
    assert math.isnan(stats.difference_ci([1.0], [2.0, 3.0])[1]) and stats.verdict((1.0, math.nan)) == "-"
    # Steps unresolved (censored at the run's end), the area under the curve lower: slower.
    assert stats.verdict((18.0, 26.9), (-0.095, 0.043)) == "slower"
    assert stats.verdict((-2.0, 2.404), (0.05, 0.01)) == "faster"
    assert stats.verdict((-3.5, 2.404), (-0.05, 0.01)) == "mixed"


def test_comparisons_pair_cispo_with_each_baseline_and_the_ablation_with_cispo():
    cispo = [
        _run(seed=s, accs=a, phase="report", total=60)
        for s, a in enumerate([(0.2, 0.5, 0.6, 0.6), (0.2, 0.3, 0.5, 0.6), (0.2, 0.3, 0.3, 0.4)])
    ]  # 10, 20, 60
    dapo = [_run("dapo", seed=s, accs=(0.2, 0.3, 0.3, 0.5), phase="report", total=60) for s in range(3)]
    ablation = [{**_run(seed=s, accs=(0.2, 0.5, 0.5, 0.5), phase="ablation", total=60),
                 "overrides": ["learner.lr=1e-5"]} for s in range(3)]  # fmt: skip
    got = {(c["first"], c["second"]): c for c in stats.summarise(cispo + dapo + ablation, 0.5)["comparisons"]}
    assert set(got) == {
        ("report/K4/cispo", "report/K4/dapo"),
        ("ablation/K4/cispo/learner.lr=1e-5", "report/K4/cispo"),
    }  # no GRPO cell: skipped
    vs_dapo = got["report/K4/cispo", "report/K4/dapo"]
    # Censored [10, 20, 60] against [30, 30, 30]: diff 0; df 2 (one side constant); half 4.303 * sqrt(700/3).
    assert vs_dapo["steps_to_target_censored"] == (0.0, pytest.approx(65.73, abs=0.01))
    assert vs_dapo["verdict"] == "equal" and vs_dapo["K"] == 4
    assert vs_dapo["final_accuracy"][0] == pytest.approx((0.6 + 0.6 + 0.4) / 3 - 0.5)
    # The ablation reaches 0.5 at step 10 on every seed: 10 - 30 = -20, spread from the CISPO side only.
    assert got["ablation/K4/cispo/learner.lr=1e-5", "report/K4/cispo"]["steps_to_target_censored"][0] == -20.0


def test_the_choice_is_made_on_the_tuning_seed_only():
    a, b = {"eps_low": 1.0, "eps_high": 4.0}, {"eps_low": 1.0, "eps_high": 1.0}
    runs = [
        _run(kw=a, accs=(0.2, 0.4, 0.5, 0.6)),  # tuning seed: A scores 0.5
        _run(kw=b, accs=(0.2, 0.3, 0.4, 0.5)),  # B scores 0.4
        # B wins on every other seed and in the reported phase: none of it may count.
        *[_run(kw=b, seed=s, accs=(0.2, 0.9, 0.9, 0.9)) for s in range(5)],
        *[_run(kw=b, seed=s, accs=(0.2, 0.9, 0.9, 0.9), phase="report") for s in range(5)],
        _run(kw=b, accs=(0.2, 0.9, 0.9, 0.9), phase="report"),
        {**_run(kw=b, accs=(0.2, 0.9, 0.9, 0.9)), "error": "exit 1"},
    ]
    choices = stats.choose(runs, target=0.5)
    assert choices["K4/cispo"]["loss_kwargs"] == a and choices["K4/cispo"]["score"] == pytest.approx(0.5)
    assert choices["K1/cispo"]["loss_kwargs"] == a and choices["K1/cispo"]["reused_from"] == "K4"
    assert "K16/cispo" not in choices


def test_ties_go_to_fewer_steps_then_the_smaller_lr():
    slow, fast = (0.2, 0.3, 0.6, 0.6), (0.2, 0.5, 0.5, 0.5)  # both score 0.5; fast reaches 0.5 at 10
    runs = [_run("dapo", lr=3e-5, accs=slow), _run("dapo", lr=1e-4, accs=fast)]
    assert stats.choose(runs, target=0.5)["K4/dapo"]["lr"] == 1e-4
    runs = [_run("grpo", lr=1e-4, accs=fast), _run("grpo", lr=3e-5, accs=fast, kw={"eps": 0.2})]
    choice = stats.choose(runs, target=0.5)["K4/grpo"]
    assert choice["lr"] == 3e-5 and choice["loss_kwargs"] == {"eps": 0.2} and choice["steps_to_target"] == 10


def test_plans_count_and_keys():
    tune = stats.tune_plan("scratchpad", bench.ALGORITHMS)
    assert len(tune) == 2 * 2 * (3 + 2 + 2)  # K in {4, 16} x lr in {3e-5, 1e-4} x each clip grid
    assert {s.seed for s in tune} == {stats.TUNING_SEED} and len({s.key for s in tune}) == len(tune)
    assert tune[0].key == "scratchpad/tune/cispo/K4/s100/lr3e-05/eps_high=1,eps_low=1"
    assert sum(s.algorithm == "cispo" for s in tune) == 12 and sum(s.algorithm == "grpo" for s in tune) == 8
    long = stats.tune_plan("long", bench.ALGORITHMS)
    assert len(long) == 2 * 3 * (3 + 2 + 2) and {s.lr for s in long} == {1e-5, 3e-5, 1e-4}
    assert {s.key.replace("long/", "scratchpad/", 1) for s in long if s.lr != 1e-5} == {s.key for s in tune}
    choices = {f"K{k}/{a}": {"lr": 1e-4, "loss_kwargs": dict(stats.CLIP_GRID[a][-1])}
               for k in (1, 4, 16) for a in bench.ALGORITHMS}  # fmt: skip
    report = stats.report_plan("scratchpad", bench.ALGORITHMS, (1, 4, 16), stats.REPORT_SEEDS, choices)
    assert len(report) == 45 and stats.TUNING_SEED not in {s.seed for s in report}
    assert report[0].key == "scratchpad/report/cispo/K1/s0/lr0.0001/eps_high=4,eps_low=1"
    assert [s.algorithm for s in report[:3]] == list(bench.ALGORITHMS)  # seed, then K, then algorithm
    assert len(stats.report_plan("long", bench.ALGORITHMS, (4, 16), stats.REPORT_SEEDS, choices)) == 30
    ablation = stats.report_plan("scratchpad", ["cispo"], [16], stats.REPORT_SEEDS, choices, "ablation",
                                 ["algorithm.loss_kwargs.eps_high=1.0"])  # fmt: skip
    assert len(ablation) == 5 and {s.k for s in ablation} == {16}
    assert ablation[0].key == "scratchpad/ablation/cispo/K16/s0/lr0.0001/eps_high=4,eps_low=1/" + (
        "algorithm.loss_kwargs.eps_high=1.0"
    )
    with pytest.raises(SystemExit, match="no tuning choice"):
        stats.report_plan("scratchpad", ["cispo"], [16], [0], {})
    assert stats.estimate_s(4, [{"process_wall_s": 90.0}, {"process_wall_s": 110.0}, {"error": "x"}]) == 400


def _fake_train(calls: list[str], stop_at: int | None = None):
    def train(spec: RunSpec, args) -> dict:
        if stop_at is not None and len(calls) == stop_at:
            raise KeyboardInterrupt
        calls.append(spec.key)
        # cispo at eps_high 2 and lr 1e-4 learns best: the choice the report phase must then use.
        good = spec.lr == 1e-4 and dict(spec.loss_kwargs).get("eps_high") in (2.0, 0.4)
        accs = (0.2, 0.6, 0.7, 0.8) if good else (0.2, 0.3, 0.4, 0.5)
        return {**_run(spec.algorithm, spec.k, spec.seed, spec.lr, dict(spec.loss_kwargs), accs, spec.phase),
                "interval": bench._interval(spec.algorithm, dict(spec.loss_kwargs))}  # fmt: skip

    return train


def test_resume_skips_finished_runs_after_an_interruption(tmp_path, monkeypatch):
    out, calls = tmp_path / "algorithms_scratchpad.json", []
    argv = ["--phase", "tune", "--algorithms", "cispo,dapo", "--ks", "4", "--out", str(out),
            "--plot", str(tmp_path / "p.png"), "--runs", str(tmp_path / "runs")]  # fmt: skip
    monkeypatch.setattr(bench, "train", _fake_train(calls, stop_at=3))
    with pytest.raises(KeyboardInterrupt):
        bench.main(argv)
    assert len(json.loads(out.read_text())["runs"]) == 3  # written after every run
    calls.clear()
    monkeypatch.setattr(bench, "train", _fake_train(calls))
    bench.main([*argv, "--resume"])
    assert len(calls) == 2 * (3 + 2) - 3  # only the runs not finished before the interruption
    result = json.loads(out.read_text())
    assert len({r["key"] for r in result["runs"]}) == 10 and result["schema"] == bench.SCHEMA_VERSION
    assert result["choices"]["K4/cispo"] == {**result["choices"]["K4/cispo"], "lr": 1e-4,
                                             "loss_kwargs": {"eps_high": 2.0, "eps_low": 1.0},
                                             "interval": [0.0, 3.0]}  # fmt: skip
    assert result["choices"]["K4/dapo"]["interval"] == [0.8, 1.4]
    calls.clear()
    bench.main([*argv, "--resume"])
    assert calls == []
    bench.main(["--phase", "report", "--algorithms", "cispo", "--ks", "1,4", "--seeds", "0,1", "--resume",
                *argv[6:]])  # fmt: skip
    assert calls == [f"scratchpad/report/cispo/K{k}/s{s}/lr0.0001/eps_high=2,eps_low=1"
                     for s in (0, 1) for k in (1, 4)]  # fmt: skip
    table = (tmp_path / "algorithms_scratchpad.md").read_text()
    assert "| 4 | cispo | 0.0001 | eps_high 2, eps_low 1 | [0, 3] | 2 |" in table
    assert (tmp_path / "p.png").exists()  # the reported cells, plotted


def test_the_run_command_parses_as_hydra_overrides(tmp_path, monkeypatch):
    """What train() hands cispo-train: the chosen lr and clip and the ablation's override, in a form
    Hydra's override grammar accepts (a run key holds '=' and ',', which hydra.run.dir may not)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    seen = []

    def fake_run(command, **kwargs):
        seen.append(command)
        raise bench.subprocess.TimeoutExpired(command, 1.0)

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    spec = RunSpec("long", "ablation", "cispo", 16, 0, 1e-4, stats._kwargs({"eps_low": 1.0, "eps_high": 2.0}),
                   ("algorithm.loss_kwargs.eps_high=1.0",))  # fmt: skip
    args = bench.parse_args(["--task", "long", "--runs", str(tmp_path)])
    record = bench.train(spec, args)
    assert record["error"] == "exit timeout"
    assert record["interval"] == [0.0, 2.0]  # the ablation's eps_high 1, not the chosen 2: what it ran
    overrides = seen[0][3:]
    parsed = {o.key_or_group: o.value() for o in OverridesParser.create().parse_overrides(overrides)}
    assert parsed["experiment"] == "algorithms_long" and parsed["learner.lr"] == 1e-4
    assert (
        parsed["algorithm.updates_per_batch"] == 16 and "experiment.total_steps" not in parsed
    )  # the preset's
    assert parsed["algorithm.loss_kwargs.eps_low"] == 1.0
    # The ablation's change comes after the chosen value, so it wins (Hydra: the last override of a key).
    assert overrides.index("algorithm.loss_kwargs.eps_high=1.0") > overrides.index(
        "algorithm.loss_kwargs.eps_high=2.0"
    )
    assert parsed["hydra.run.dir"].startswith(
        str(tmp_path / "long_ablation_cispo_K16_s0_lr0.0001_eps_high_2_")
    )
