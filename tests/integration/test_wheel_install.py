"""`pip install .` (a real wheel, not editable) gives a working cispo-train, run from outside the repo.

The fresh venv does not reinstall torch, Ray and the rest: a .pth line puts this venv's site-packages on its
sys.path. Only that path is added; the .pth files inside it are not processed, so the repo's editable
install stays inactive there and `cispo` can only come from the wheel. The build runs on a copy of the
repo, so setuptools' build/ and *.egg-info never land in the checkout."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TOP_LEVEL_SKIP = {".git", ".venv", "build", "dist", "runs", "outputs", "wandb", "artifacts", ".cache"}
SKIP_ANYWHERE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", ".pytest_cache", ".ruff_cache")


def _ignore(directory: str, names: list[str]) -> set[str]:
    skipped = set(SKIP_ANYWHERE(directory, names))
    if Path(directory).resolve() == REPO:
        skipped |= TOP_LEVEL_SKIP & set(names)
    return skipped


def _run(cmd: list, cwd: Path, env: dict, timeout: int) -> subprocess.CompletedProcess:
    cmd = [str(c) for c in cmd]
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        pytest.fail(
            f"{' '.join(cmd)} (cwd {cwd}) exited {out.returncode}\n"
            f"--- stdout ---\n{out.stdout[-6000:]}\n--- stderr ---\n{out.stderr[-6000:]}"
        )
    return out


@pytest.mark.slow
def test_wheel_install_runs_outside_the_repo(tmp_path: Path):
    src = tmp_path / "src"
    shutil.copytree(REPO, src, symlinks=True, ignore=_ignore)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    ours = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (Path(site) / "_cispo_test_base.pth").write_text("".join(f"{p}\n" for p in ours))

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(
        VIRTUAL_ENV=str(venv),
        PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        PIP_DISABLE_PIP_VERSION_CHECK="1",
        OMP_NUM_THREADS="1",
        WANDB_MODE="disabled",
        RAY_USAGE_STATS_ENABLED="0",
    )
    # pip, setuptools and wheel come from this venv through the .pth; --ignore-installed so pip never looks
    # at (or uninstalls) the editable cispo it can see there.
    _run(
        [python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index"]
        + ["--ignore-installed", src],
        cwd=src,
        env=env,
        timeout=300,
    )
    script = venv / "bin" / "cispo-train"
    assert script.exists(), f"no console script in {venv / 'bin'}: {sorted(os.listdir(venv / 'bin'))}"

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = _run(
        [
            python,
            "-c",
            "import cispo, rollout, rewards, sandboxes as s; "
            "print('\\n'.join(m.__file__ for m in (cispo, rollout, rewards, s)))",
        ],
        cwd=elsewhere,
        env=env,
        timeout=120,
    ).stdout.split()
    for path in where:
        assert Path(path).resolve().is_relative_to(venv.resolve()), f"{path} is not from the wheel in {venv}"
        assert not Path(path).resolve().is_relative_to(REPO), f"{path} comes from the repo"

    job = _run([script, "--cfg", "job"], cwd=elsewhere, env=env, timeout=300).stdout
    assert "algorithm:" in job and "loss: cispo" in job, job

    run_dir = tmp_path / "run"
    other = tmp_path / "other"
    other.mkdir()
    overrides = [
        "experiment.total_steps=2",
        "model.warmstart.enabled=false",
        "experiment.eval_every=0",
        "experiment.checkpoint_every=0",
        "logging.wandb=disabled",
        "logging.plot=false",
        "logging.progress=false",
        "rollout.num_workers=1",
        "cluster.num_cpus=2",
        f"hydra.run.dir={run_dir}",
    ]
    _run([script, *overrides], cwd=other, env=env, timeout=600)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    trained = {r["step"]: r for r in rows if "reward/mean" in r}
    assert sorted(trained) == [1, 2], rows
