"""The CPU-testable pieces of benchmarks/gpu_smoke.py: arguments, report assembly, the greedy agreement."""

import json

import pytest

from benchmarks import gpu_smoke


def test_parse_args_defaults_and_out(monkeypatch, tmp_path):
    monkeypatch.delenv("OUT", raising=False)
    args = gpu_smoke.parse_args([])
    assert args.out == gpu_smoke.REPO / "benchmarks/results/gpu_smoke.json"
    assert args.steps == 20 and args.only == list(gpu_smoke.CHECKS) and args.logprob_tolerance == 5e-2
    monkeypatch.setenv("OUT", str(tmp_path))
    assert gpu_smoke.parse_args([]).out == tmp_path / "gpu_smoke.json"
    args = gpu_smoke.parse_args(["--only", "vllm_logprobs", "--steps", "5", "--out", "r.json"])
    assert args.only == ["vllm_logprobs"] and args.steps == 5 and str(args.out) == "r.json"
    with pytest.raises(SystemExit):
        gpu_smoke.parse_args(["--only", "nope"])
    with pytest.raises(SystemExit):
        gpu_smoke.parse_args(["--steps", "0"])


def test_report_assembly_and_file(tmp_path):
    report = gpu_smoke.Report({"torch": "x"})
    report.run("good", lambda: (True, {"max_abs_diff": 1e-3}))
    report.run("bad", lambda: (False, {"agreement": 0.5}))
    report.run("broken", lambda: 1 / 0)
    report.add("later", "skip", reason="engine did not start")
    data = report.write(tmp_path / "sub" / "gpu_smoke.json")
    assert json.loads((tmp_path / "sub" / "gpu_smoke.json").read_text()) == data
    assert data["ok"] is False and data["counts"] == {"pass": 1, "fail": 2, "skip": 1}
    assert data["checks"]["good"]["status"] == "pass" and data["checks"]["good"]["max_abs_diff"] == 1e-3
    assert data["checks"]["broken"]["error"].startswith("ZeroDivisionError")
    assert data["environment"] == {"torch": "x"}
    with pytest.raises(ValueError):
        report.add("x", "maybe")
    only_pass = gpu_smoke.Report()
    only_pass.add("a", "pass")
    assert only_pass.to_dict()["ok"] is True and gpu_smoke.Report().to_dict()["ok"] is False


def test_agreement():
    assert gpu_smoke._agreement([[1, 2, 3]], [[1, 2, 4]]) == pytest.approx(2 / 3)
    assert gpu_smoke._agreement([], []) == 0.0
