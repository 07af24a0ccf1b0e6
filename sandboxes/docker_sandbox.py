"""``docker`` backend: a throwaway container per run via the Docker SDK, for nodes that run an engine.

Engine: ``base_url``, else ``$CISPO_DOCKER_HOST``, else ``$DOCKER_HOST``, else the private engine that
``launch/docker_engine.sh`` starts (``/run/cispo-docker/docker.sock``), else Docker's default socket.
Image: ``image``, else ``$CISPO_DOCKER_IMAGE``, else the first of ``cispo-python:latest`` (built locally by
that script, no registry needed) and ``python:3.11-slim`` that the engine has.

How each threat-model claim (``sandboxes/__init__``) holds here:
- The source travels on the container's stdin (a length-prefixed header read by the boot script), never on
  the command line, in the environment or in a bind mount, so it works with remote engines too.
- ``--network none`` (its own network namespace: host loopback unreachable), read-only root with private
  tmpfs /work and /tmp, uid/gid 65534 with every capability dropped, no-new-privileges and the engine's
  seccomp profile (no new user namespaces), an explicit environment.
- Seccomp claims S1-S4: the engine's default profile stays (an allow-list that also refuses what Docker
  refuses), and pid 1 stacks ``sandboxes.seccomp``'s filter, the very program bwrap loads, on top of it
  before the source is even read; the kernel applies both, the stricter answer wins. The filter is built
  on the scorer's host and sent ahead of the source on stdin, so the engine must run the same
  architecture (checked at start); the image needs ``ctypes``.
- Memory and pids limits are the container's cgroups; rlimits are set by the launcher as in bwrap, except
  RLIMIT_NPROC where the engine enforces a pids limit: without a user namespace it would count every
  container's uid-65534 processes, so one run's fork bomb would stop the others from forking.
- Output is read from the attach stream as it comes and the container is killed when it passes the cap;
  the engine keeps no log of it (log driver ``none``), so endless output cannot fill the engine's disk.
- The boot script stays as pid 1 and runs the program as its child: pid 1 cannot be signalled from inside,
  and when it exits the kernel kills everything else in the container, so daemons die with the run. It
  also ends the run by itself ``DEADLINE_GRACE_S`` after the timeout, and the engine removes the container
  on exit (AutoRemove): if the scorer dies mid-run, the container is gone soon after its timeout.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import struct
import time
from dataclasses import dataclass
from typing import Any

from sandboxes.base import LAUNCHER, Limits, RunResult, Sandbox, SandboxError, decode, launcher_args
from sandboxes.seccomp import bpf_program, machine

PRIVATE_ENGINE = "unix:///run/cispo-docker/docker.sock"
IMAGES = ("cispo-python:latest", "python:3.11-slim")
LABEL = "cispo.sandbox"
DEADLINE_GRACE_S = 2.0
OOM_EXIT = 247  # pid 1's exit code when the program failed and the memory cgroup killed something
SECCOMP_EXIT = 246  # pid 1's exit code when it could not install the seccomp filter (nothing ran)
SECCOMP_FAILED = "cispo-boot: cannot install the seccomp filter"
STALE_CREATED_S = 120.0  # a container created but never started this long ago belongs to a dead scorer

# Pid 1 of the container: reads exactly K bytes of seccomp filter and N bytes of source from fd 0
# (unbuffered, so the program's own stdin stays intact), installs the filter for itself and everything it
# starts (any failure ends the run: the program never runs without it), forks the program (LAUNCHER,
# below), reaps and waits for it up to a deadline.
BOOT = """\
import os, signal, sys
_k, _n, _limit = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
del sys.argv[1:4]
def _take(n):
    b = b""
    while len(b) < n:
        c = os.read(0, n - len(b))
        if not c:
            break
        b += c
    return b
try:
    import ctypes
    class _Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]
    _bpf = _take(_k)
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
    _prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong)
    if len(_bpf) != _k or _k % 8 or _prctl(38, 1, None, 0, 0):  # PR_SET_NO_NEW_PRIVS
        raise OSError(ctypes.get_errno(), "no filter or PR_SET_NO_NEW_PRIVS failed")
    if _prctl(22, 2, ctypes.byref(_Prog(_k // 8, _bpf)), 0, 0):  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
        raise OSError(ctypes.get_errno(), "PR_SET_SECCOMP failed")
except Exception as _e:
    os.write(2, ("{SECCOMP_FAILED}: %r\\n" % (_e,)).encode())
    os._exit({SECCOMP_EXIT})
with open(sys.argv[1], "wb") as _f:
    _f.write(_take(_n))
del _k, _take, _Prog, _bpf, _prctl
_pid = os.fork()
if _pid:
    import select, time
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # so pid 1 ignores it like every other signal
    try:  # not dumpable: the program cannot ptrace pid 1 or read its memory through /proc/1
        import ctypes
        ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)
    except Exception:
        pass
    _end = time.monotonic() + _limit
    try:
        _fd = os.pidfd_open(_pid)
    except (AttributeError, OSError):
        _fd = None
    _st = None
    while _st is None:  # also reaps orphaned grandchildren, so their zombies do not fill pids.max
        _left = _end - time.monotonic()
        if _left <= 0:
            os.kill(_pid, signal.SIGKILL)
            os._exit(137)
        select.select([_fd], [], [], min(_left, 0.5)) if _fd is not None else time.sleep(min(_left, 0.05))
        while True:
            try:
                _p, _s = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if not _p:
                break
            if _p == _pid:
                _st = _s
    _code = os.waitstatus_to_exitcode(_st)
    _code = 128 - _code if _code < 0 else _code
    for _p in ("/sys/fs/cgroup/memory/memory.oom_control", "/sys/fs/cgroup/memory.events"):
        try:
            for _l in open(_p):
                if _code and _l.startswith("oom_kill ") and int(_l.split()[1]) > 0:
                    _code = {OOM_EXIT}
        except (OSError, ValueError):
            pass
    os._exit(_code)
del _n, _limit, _f, _pid
"""
for _key, _value in (
    ("OOM_EXIT", OOM_EXIT),
    ("SECCOMP_EXIT", SECCOMP_EXIT),
    ("SECCOMP_FAILED", SECCOMP_FAILED),
):
    BOOT = BOOT.replace("{" + _key + "}", str(_value))
del _key, _value


def _connect(base_url: str | None) -> Any:
    """A client for ``base_url``, or Docker's own environment (DOCKER_HOST, DOCKER_TLS_VERIFY, ...)."""
    import docker

    if base_url:
        client = docker.DockerClient(base_url=base_url, max_pool_size=64)
    else:
        client = docker.from_env(max_pool_size=64)
    try:
        client.ping()
    except Exception:
        client.close()
        raise
    return client


def _docker_client(base_url: str | None) -> Any:
    """The first engine that answers, in the order the module docstring gives."""
    try:
        import docker  # noqa: F401
    except ImportError as e:  # pragma: no cover - docker is a declared dependency
        raise SandboxError("docker sandbox: the 'docker' Python package is not installed") from e
    url = base_url or os.environ.get("CISPO_DOCKER_HOST")
    if url:
        candidates: list[str | None] = [url]
    elif os.environ.get("DOCKER_HOST"):
        candidates = [None]
    else:
        candidates = [PRIVATE_ENGINE] if os.path.exists(PRIVATE_ENGINE[len("unix://") :]) else []
        candidates.append(None)
    errors = []
    for candidate in candidates:
        try:
            return _connect(candidate)
        except Exception as e:
            where = candidate or os.environ.get("DOCKER_HOST") or "Docker's default socket"
            errors.append(f"{where}: {type(e).__name__}: {e}")
    raise SandboxError(
        "docker sandbox: no Docker engine answers (" + "; ".join(errors) + "); as root, "
        "`bash launch/docker_engine.sh` starts a private one, or set CISPO_DOCKER_HOST"
    )


def _pick_image(client: Any, image: str | None) -> str:
    env = os.environ.get("CISPO_DOCKER_IMAGE")
    wanted = [image] if image else [env] if env else []
    for name in wanted or IMAGES:
        with contextlib.suppress(Exception):
            client.api.inspect_image(name)
            return name
    raise SandboxError(
        f"docker sandbox: the engine has none of the images {wanted or list(IMAGES)}; build "
        f"{IMAGES[0]} with `bash launch/docker_engine.sh` (as root) or `docker pull {IMAGES[1]}`"
    )


def _close(conn: Any) -> None:
    if conn is not None:
        with contextlib.suppress(Exception):
            getattr(conn, "_sock", conn).close()
            conn.close()


@dataclass
class _Stream:
    stdout: bytes
    stderr: bytes
    timed_out: bool
    over_output: bool


def _pump(sock: Any, data: bytes, deadline: float, cap: int) -> _Stream:
    """Send ``data`` then half-close; demultiplex the attach stream until EOF, the deadline or the cap."""
    sock.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if data else 0))
    if not data:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
    pending, raw = memoryview(data), bytearray()
    out = {1: bytearray(), 2: bytearray()}
    timed_out = over = eof = False
    try:
        while not eof and not over:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            for _, events in sel.select(min(left, 0.5)):
                if events & selectors.EVENT_WRITE and pending:
                    try:
                        pending = pending[sock.send(pending[:65536]) :]
                    except BlockingIOError:
                        pass
                    except OSError:  # the program is gone or closed its stdin
                        pending = pending[len(pending) :]
                    if not pending:
                        sel.modify(sock, selectors.EVENT_READ)
                        with contextlib.suppress(OSError):
                            sock.shutdown(socket.SHUT_WR)
                if events & selectors.EVENT_READ:
                    try:
                        chunk = sock.recv(65536)
                    except BlockingIOError:
                        continue
                    except OSError:
                        chunk = b""
                    eof = not chunk
                    raw += chunk
                    while len(raw) >= 8 and len(raw) >= 8 + struct.unpack(">I", raw[4:8])[0]:
                        kind, size = raw[0], struct.unpack(">I", raw[4:8])[0]
                        buf = out.get(kind, out[2])
                        buf += raw[8 : 8 + size]
                        del raw[: 8 + size]
                        if len(buf) > cap:
                            del buf[cap:]
                            over = True
    finally:
        sel.close()
    return _Stream(bytes(out[1]), bytes(out[2]), timed_out, over)


class DockerSandbox(Sandbox):
    name = "docker"

    def __init__(
        self,
        *,
        image: str | None = None,
        python: str = "python3",
        base_url: str | None = None,
        cpus: float = 1.0,
        limits: Limits | None = None,
        labels: dict[str, str] | None = None,
    ) -> None:
        self.client = _docker_client(base_url)
        try:
            self.image = _pick_image(self.client, image)
            info = self.client.info()
        except BaseException:
            self.client.close()
            raise
        if info.get("Architecture", machine()) != machine():
            self.client.close()
            raise SandboxError(
                f"docker sandbox: the engine runs on {info.get('Architecture')} but the seccomp filter "
                f"(sandboxes/seccomp.py) is compiled here for {machine()}; score on a node of the engine's "
                "architecture"
            )
        self._bpf = bpf_program()
        self.python, self.cpus = python, cpus
        self.limits = limits or Limits()
        self.labels = {LABEL: "1", **(labels or {})}
        self.has_memory = bool(info.get("MemoryLimit", True))
        self.has_pids = bool(info.get("PidsLimit", True))
        self._sweep_never_started()

    def _sweep_never_started(self) -> None:
        """Remove containers that a dead scorer created but never started (AutoRemove covers the rest)."""
        with contextlib.suppress(Exception):
            for c in self.client.api.containers(all=True, filters={"label": LABEL, "status": "created"}):
                if time.time() - c.get("Created", time.time()) > STALE_CREATED_S:
                    self.client.api.remove_container(c["Id"], force=True)

    def _create(self, limits: Limits, nbytes: int, timeout_s: float) -> str:
        rlimits = launcher_args(limits)
        if self.has_pids and limits.processes is not None:
            rlimits[4] = "-"  # the pids cgroup bounds this run alone; see the module docstring
        limit_s = f"{timeout_s + DEADLINE_GRACE_S:.3f}"
        cmd = [self.python, "-I", "-c", BOOT + LAUNCHER, str(len(self._bpf)), str(nbytes), limit_s]
        cmd += ["/work/main.py", *rlimits]
        tmpfs_opts = f"size={limits.tmpfs_bytes},uid=65534,gid=65534,mode=0700"
        host: dict[str, Any] = {}
        if limits.memory_bytes is not None:
            host.update(mem_limit=limits.memory_bytes, memswap_limit=limits.memory_bytes)
        if limits.processes is not None:
            host["pids_limit"] = limits.processes
        host_config = self.client.api.create_host_config(
            auto_remove=True,
            network_mode="none",
            read_only=True,
            tmpfs={"/work": tmpfs_opts, "/tmp": tmpfs_opts},
            shm_size=limits.tmpfs_bytes,
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            nano_cpus=int(self.cpus * 1e9),
            log_config={"type": "none"},
            **host,
        )
        created = self.client.api.create_container(
            self.image,
            command=cmd,
            stdin_open=True,  # with detach=False this also sets StdinOnce: EOF when we half-close
            working_dir="/work",
            user="65534:65534",
            hostname="sandbox",
            environment={
                "PATH": "/usr/local/bin:/usr/bin:/bin",
                "LANG": "C.UTF-8",
                "HOME": "/work",
                "PYTHONDONTWRITEBYTECODE": "1",
            },
            labels=self.labels,
            host_config=host_config,
        )
        return created["Id"]

    def run(
        self, source: str, *, stdin: str = "", timeout_s: float = 5.0, limits: Limits | None = None
    ) -> RunResult:
        limits = limits or self.limits
        start = time.monotonic()
        src = source.encode("utf-8", errors="surrogateescape")
        data = self._bpf + src + stdin.encode("utf-8", errors="surrogateescape")
        api = self.client.api
        try:
            cid = self._create(limits, len(src), timeout_s)
        except Exception as e:
            raise SandboxError(f"docker sandbox: cannot create a container: {e}") from e
        sock = waiter = None
        removed = False
        try:
            # The engine registers the wait before it answers with headers, so no exit can slip past it.
            waiter = api._post(
                api._url("/containers/{0}/wait", cid),
                params={"condition": "removed"},
                timeout=(30, timeout_s + DEADLINE_GRACE_S + 60),
                stream=True,
            )
            sock = api.attach_socket(cid, params={"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1})
            api.start(cid)
            io = _pump(getattr(sock, "_sock", sock), data, time.monotonic() + timeout_s, limits.output_bytes)
            _close(sock)  # the engine may hold the exit until an attached reader drains or leaves
            if io.timed_out or io.over_output:
                with contextlib.suppress(Exception):
                    api.kill(cid)
            code = int(api._result(waiter, True)["StatusCode"])
            removed = True
        except Exception as e:
            raise SandboxError(f"docker sandbox: the engine failed during the run: {e}") from e
        finally:
            _close(sock)
            _close(waiter)
            if not removed:
                with contextlib.suppress(Exception):
                    api.remove_container(cid, force=True)
        return self._result(io, code, limits, time.monotonic() - start)

    def _result(self, io: _Stream, code: int, limits: Limits, duration_s: float) -> RunResult:
        reason = "timeout" if io.timed_out else "output_limit" if io.over_output else ""
        if not reason and code == OOM_EXIT and limits.memory_bytes is not None:
            reason, code = "memory_limit", 137
        if not reason and code == SECCOMP_EXIT and io.stderr.startswith(SECCOMP_FAILED.encode()):
            reason = "sandbox_setup"  # pid 1 could not install the filter, so the program never ran
        return RunResult(
            exit_code=None if reason in ("timeout", "output_limit") else code,
            stdout=decode(io.stdout),
            stderr=decode(io.stderr),
            timed_out=io.timed_out,
            killed_reason=reason,
            duration_s=duration_s,
            applied_limits=self.applied_limits(limits),
            backend=self.name,
        )

    def applied_limits(self, limits: Limits) -> list[str]:
        names = ["container", "namespaces:pid,net,ipc,uts,mount", "network_none", "readonly_root"]
        names += ["uid:65534", "cap_drop_all", "no_new_privileges", "engine_seccomp", "seccomp"]
        rlimits = zip(("as", "cpu", "fsize", "nofile", "nproc"), launcher_args(limits))
        names += [f"rlimit_{n}" for n, v in rlimits if v != "-" and not (n == "nproc" and self.has_pids)]
        if self.has_memory and limits.memory_bytes is not None:
            names.append("cgroup_memory")
        if self.has_pids and limits.processes is not None:
            names.append("cgroup_pids")
        return names + ["wall_clock", "output_cap", "pid1_deadline", "auto_remove", "scrubbed_env"]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()
