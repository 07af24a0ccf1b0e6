"""``docker`` backend: a throwaway container per run via the Docker SDK, for nodes that run an engine.

The source travels on the container's stdin (a length-prefixed header read by a tiny boot script), never
on the command line, in the environment or in a bind mount, so it works with remote engines too and the
program cannot read it back from /proc/self/cmdline.
"""

from __future__ import annotations

import contextlib
import socket
import time
from typing import Any

from sandboxes.base import LAUNCHER, Limits, RunResult, Sandbox, SandboxError, launcher_args

# Reads exactly N bytes of source from fd 0 (unbuffered, so the program's own stdin stays intact).
BOOT = """\
import os, sys
_n = int(sys.argv[1]); _buf = _c = b""
while len(_buf) < _n:
    _c = os.read(0, _n - len(_buf))
    if not _c:
        break
    _buf += _c
with open(sys.argv[2], "wb") as _f:
    _f.write(_buf)
del sys.argv[1], _n, _buf, _c, _f
"""


def _docker_client(base_url: str | None) -> Any:
    try:
        import docker
    except ImportError as e:  # pragma: no cover - docker is a declared dependency
        raise SandboxError("docker sandbox: the 'docker' Python package is not installed") from e
    try:
        client = docker.DockerClient(base_url=base_url) if base_url else docker.from_env()
        client.ping()
    except Exception as e:
        raise SandboxError(f"docker sandbox: no Docker engine answers ({type(e).__name__}: {e})") from e
    return client


class DockerSandbox(Sandbox):
    name = "docker"

    def __init__(
        self,
        *,
        image: str = "python:3.11-slim",
        python: str = "python3",
        base_url: str | None = None,
        cpus: float = 1.0,
        limits: Limits | None = None,
    ) -> None:
        self.client = _docker_client(base_url)
        self.image, self.python, self.cpus = image, python, cpus
        self.limits = limits or Limits()

    def _create(self, limits: Limits, nbytes: int) -> Any:
        cmd = [self.python, "-I", "-c", BOOT + LAUNCHER, str(nbytes), "/work/main.py", *launcher_args(limits)]
        tmpfs_opts = f"size={limits.tmpfs_bytes},uid=65534,gid=65534,mode=0700"
        kwargs: dict[str, Any] = {}
        if limits.memory_bytes is not None:
            kwargs.update(mem_limit=limits.memory_bytes, memswap_limit=limits.memory_bytes)
        if limits.processes is not None:
            kwargs["pids_limit"] = limits.processes
        return self.client.containers.create(
            self.image,
            command=cmd,
            stdin_open=True,
            stdin_once=True,
            network_mode="none",
            read_only=True,
            tmpfs={"/work": tmpfs_opts, "/tmp": tmpfs_opts},
            working_dir="/work",
            user="65534:65534",
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            environment={"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/work"},
            nano_cpus=int(self.cpus * 1e9),
            **kwargs,
        )

    def run(
        self, source: str, *, stdin: str = "", timeout_s: float = 5.0, limits: Limits | None = None
    ) -> RunResult:
        limits = limits or self.limits
        start = time.monotonic()
        src = source.encode("utf-8", errors="surrogateescape")
        container = self._create(limits, len(src))
        try:
            sock = container.attach_socket(params={"stdin": 1, "stream": 1})
            container.start()
            raw = getattr(sock, "_sock", sock)
            with contextlib.suppress(OSError):
                raw.sendall(src + stdin.encode("utf-8", errors="surrogateescape"))
                raw.shutdown(socket.SHUT_WR)
            timed_out = False
            try:
                code = int(container.wait(timeout=timeout_s)["StatusCode"])
            except Exception:  # requests' ReadTimeout/ConnectionError: the engine stopped waiting for us
                timed_out = True
                code = None
                with contextlib.suppress(Exception):
                    container.kill()
            stdout = container.logs(stdout=True, stderr=False)[: limits.output_bytes]
            stderr = container.logs(stdout=False, stderr=True)[: limits.output_bytes]
            with contextlib.suppress(Exception):
                container.reload()
            oom = bool(container.attrs.get("State", {}).get("OOMKilled")) if not timed_out else False
            with contextlib.suppress(Exception):
                sock.close()
        finally:
            with contextlib.suppress(Exception):
                container.remove(force=True)
        reason = "timeout" if timed_out else "memory_limit" if oom else ""
        return RunResult(
            exit_code=code,
            stdout=stdout.decode("utf-8", errors="replace"),
            stderr=stderr.decode("utf-8", errors="replace"),
            timed_out=timed_out,
            killed_reason=reason,
            duration_s=time.monotonic() - start,
            applied_limits=[
                "container",
                "network_none",
                "readonly_root",
                "uid:65534",
                "cgroup_memory",
                "cgroup_pids",
                "rlimits",
                "wall_clock",
                "output_cap",
            ],
            backend=self.name,
        )

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()
