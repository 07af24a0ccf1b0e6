"""launch/slurm.sbatch on a real SLURM: two slurmd nodes on this host (launch/slurm_local.sh: n1 on the
host's address, n2 on 127.0.0.2), `sbatch --nodes=2` of the real job script with the slurm_cpu_smoke
preset, then checks that the job completed, the CISPO run logged every step, Ray had both nodes and put a
rollout worker on each, and the job stopped the Ray nodes it started.

The sbatch test is slow and needs root (apt, munged, slurmd): it skips without root, or without SLURM
and apt; with CI set, a setup failure fails it instead. A cluster already running under the state dir is
reused and left running; one this test started is stopped (slurmctld and both slurmd, by pid) at the end.
munged, a host service, stays up.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from cispo.core.config import register_configs
from cispo.driver.cli import CONFIG_DIR, to_train_config
from tests.integration.ray_cluster import free_port

ROOT = Path(__file__).resolve().parents[2]
SLURM_LOCAL = ROOT / "launch" / "slurm_local.sh"
STATE = Path(os.environ.get("CISPO_SLURM_STATE", "/tmp/cispo-slurm"))
STEPS = 4
JOB_TIMEOUT_S = 1200  # the job takes about a minute here; generous for a loaded machine
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
        "BOOT_FAIL", "DEADLINE"}  # fmt: skip


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false")


def unavailable(reason: str) -> None:
    if in_ci():
        pytest.fail(f"SLURM setup failed in CI: {reason}")
    pytest.skip(reason)


def running(pidfile: Path) -> bool:
    try:
        os.kill(int(pidfile.read_text().strip()), 0)
    except (OSError, ValueError):
        return False
    return True


@pytest.fixture(scope="module")
def slurm_env():
    """The environment for sbatch/scontrol against the local two-node cluster."""
    if os.geteuid() != 0:
        unavailable("a local SLURM needs root (apt, munged, slurmd)")
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        unavailable("SLURM is not installed and apt-get is unavailable")
    reused = running(STATE / "slurmctld.pid")
    out = subprocess.run(["bash", str(SLURM_LOCAL), str(STATE)], capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        unavailable(f"launch/slurm_local.sh failed:\n{out.stdout[-2000:]}{out.stderr[-3000:]}")
    assert out.stdout.strip().splitlines()[-1] == f"export SLURM_CONF={STATE / 'slurm.conf'}", out.stdout
    env = {**os.environ, "SLURM_CONF": str(STATE / "slurm.conf")}
    yield env
    if not reused:
        subprocess.run(["bash", str(SLURM_LOCAL), "stop", str(STATE)], check=True, timeout=120)
        assert not running(STATE / "slurmctld.pid")


def scontrol(env: dict, *args: str) -> str:
    return subprocess.run(["scontrol", *args], capture_output=True, text=True, env=env, check=True).stdout


def field(record: str, name: str) -> str:
    found = re.search(rf"\b{name}=(\S+)", record)
    assert found, f"{name} not in {record!r}"
    return found.group(1)


def wait_for(env: dict, job: str, log: Path) -> str:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        record = scontrol(env, "show", "job", "-o", job)
        if field(record, "JobState") in DONE:
            return record
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job], env=env, check=False)
            tail = log.read_text()[-4000:] if log.exists() else "(no log)"
            pytest.fail(f"job {job} still {field(record, 'JobState')} after {JOB_TIMEOUT_S} s:\n{tail}")
        time.sleep(3)


def test_the_smoke_preset_validates_as_the_job_script_runs_it():
    register_configs()
    overrides = ["experiment=slurm_cpu_smoke", "cluster.ray_address=192.0.2.2:6379", "cluster.num_nodes=2"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = to_train_config(compose(config_name="config", overrides=overrides))
    assert cfg.experiment.name == "slurm_cpu_smoke" and cfg.experiment.total_steps == STEPS
    assert cfg.rollout.num_workers == 2 and cfg.cluster.placement_strategy == "SPREAD"
    assert not cfg.model.warmstart.enabled


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_sbatch_runs_cispo_on_two_nodes(slurm_env, tmp_path):
    run_dir = tmp_path / "run"
    log = tmp_path / "slurm-job.out"
    env = {**slurm_env, "CISPO_ROOT": str(ROOT), "RAY_PORT": str(free_port()), "OMP_NUM_THREADS": "1",
           "WANDB_MODE": "offline"}  # fmt: skip
    # A CPU cluster overrides the script's GPU and CPU requests on the command line.
    cmd = ["sbatch", "--parsable", "--nodes=2", "--gpus-per-node=0", "--cpus-per-task=2", f"--output={log}",
           str(ROOT / "launch" / "slurm.sbatch"), "experiment=slurm_cpu_smoke",
           f"experiment.total_steps={STEPS}", f"hydra.run.dir={run_dir}"]  # fmt: skip
    submitted = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip().split(";")[0]
    record = wait_for(env, job, log)
    printed = log.read_text()
    assert field(record, "JobState") == "COMPLETED", printed[-6000:]
    assert field(record, "ExitCode") == "0:0", printed[-6000:]

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sorted(r["step"] for r in rows if "reward/mean" in r) == list(range(1, STEPS + 1))
    assert json.loads((run_dir / "result.json").read_text())["steps"] == STEPS

    # Ray had both nodes, each on its own SLURM NodeAddr, and the job said so before training.
    ips = sorted(field(scontrol(env, "show", "node", node), "NodeAddr") for node in ("n1", "n2"))
    assert "127.0.0.2" in ips
    assert f"slurm.sbatch: ray nodes: 2 alive: {' '.join(ips)}" in printed
    # The run's own record of where its processes ran: one learner rank and one rollout worker on each
    # node (SPREAD), placed by Ray inside the SLURM allocation.
    placement = json.loads((run_dir / "placement.json").read_text())["processes"]
    assert sorted(p["node_ip"] for p in placement if p["role"] == "rollout") == ips
    assert sorted(p["node_ip"] for p in placement if p["role"] == "learner") == ips

    # The job stopped the Ray nodes it started and removed their temp dirs.
    assert not list(Path("/tmp").glob(f"ray-{job}-*"))
    marker = f"/tmp/ray-{job}-".encode()
    left = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker in Path(f"/proc/{pid}/cmdline").read_bytes():
                left.append(pid)
        except OSError:
            continue
    assert left == [], f"Ray processes of job {job} still running: {left}"
