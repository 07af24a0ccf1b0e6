"""A real two-node Ray cluster on this one machine: a head on the host's address and a worker node on
127.0.0.2, each a `ray start --block` process group with its own resources, stopped by process group
(never with `ray stop`, which would stop every Ray instance on the machine)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))
WORKER_IP = "127.0.0.2"  # a second loopback address: the worker node's own IP on this one host
# Ray 2.60 turns token authentication on for new clusters; a throwaway test cluster on one host goes
# without (every process that talks to it, drivers included, must then say so too).
ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class LocalCluster:
    address: str
    temp_dir: str
    procs: list[subprocess.Popen] = field(default_factory=list)
    node_ips: list[str] = field(default_factory=list)

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM to every node's process group at once, then SIGKILL to what is left after grace_s.
        `ray start --block` took the old per-node 30 s wait every time (measured: 30.7 s of teardown per
        cluster), and a test cluster holds nothing worth a clean shutdown."""
        for proc in reversed(self.procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


def _start(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, **ENV, "OMP_NUM_THREADS": "1"}
    with open(log, "ab") as out:
        return subprocess.Popen(
            [RAY, "start", "--block", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


def alive_nodes(address: str) -> list[dict]:
    code = (
        f"import json, ray; ray.init(address={address!r}, logging_level='ERROR'); "
        "print(json.dumps([n['NodeManagerAddress'] for n in ray.nodes() if n['Alive']]))"
    )
    env = {**os.environ, **ENV}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    lines = out.stdout.strip().splitlines()
    return json.loads(lines[-1]) if out.returncode == 0 and lines else []


def host_ip() -> str:
    """The address Ray itself picks for this machine. The head must listen there: a driver given
    127.0.0.1:PORT is sent to this address by Ray (it canonicalises local addresses)."""
    import ray

    return ray.util.get_node_ip_address()


def start_two_nodes(log_dir: Path, cpus_per_node: int = 3, timeout_s: float = 180.0) -> LocalCluster:
    port = free_port()
    temp_dir = f"/tmp/ray_mn_{os.getpid()}"
    head_ip = host_ip()
    cluster = LocalCluster(f"{head_ip}:{port}", temp_dir)
    cluster.node_ips = [head_ip, WORKER_IP]
    common = [f"--num-cpus={cpus_per_node}", "--num-gpus=0", "--disable-usage-stats"]
    head = ["--head", f"--node-ip-address={head_ip}", f"--port={port}", "--include-dashboard=false"]
    cluster.procs.append(_start([*head, f"--temp-dir={temp_dir}", *common], log_dir / "ray_head.log"))
    try:
        deadline = time.monotonic() + timeout_s
        while not alive_nodes(cluster.address):
            if time.monotonic() > deadline or cluster.procs[0].poll() is not None:
                raise RuntimeError(f"Ray head did not come up; see {log_dir / 'ray_head.log'}")
            time.sleep(2)
        worker = [f"--address={cluster.address}", f"--node-ip-address={WORKER_IP}", *common]
        cluster.procs.append(_start(worker, log_dir / "ray_worker.log"))
        while len(alive_nodes(cluster.address)) < 2:
            if time.monotonic() > deadline or cluster.procs[1].poll() is not None:
                raise RuntimeError(f"Ray worker node did not join; see {log_dir / 'ray_worker.log'}")
            time.sleep(2)
    except BaseException:
        cluster.stop()
        raise
    return cluster
