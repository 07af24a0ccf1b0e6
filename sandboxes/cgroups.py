"""Per-run memory and pids cgroups, used where the host lets us create them; silently skipped otherwise.

cgroup v1 (separate ``memory`` and ``pids`` hierarchies) and cgroup v2 (one unified hierarchy with the
controllers enabled for our subtree) are both tried. Each run gets its own leaf so one program's fork
bomb or memory bomb cannot starve a concurrent run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid
from dataclasses import dataclass, field

ROOT = "/sys/fs/cgroup"


def _own_path(controller: str) -> str | None:
    """Our cgroup path in ``controller``'s hierarchy (v1), or the unified path for ``controller=""``."""
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                _, ctrls, path = line.rstrip("\n").split(":", 2)
                if controller in ctrls.split(",") or (controller == "" and ctrls == ""):
                    return path
    except OSError:
        return None
    return None


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _read_int(path: str, key: str | None = None) -> int:
    with contextlib.suppress(OSError, ValueError):
        with open(path) as f:
            text = f.read()
        if key is None:
            return int(text.strip())
        for line in text.splitlines():
            k, _, v = line.partition(" ")
            if k == key:
                return int(v)
    return 0


@dataclass
class RunCgroups:
    """The leaves created for one run; ``applied`` names the limits actually in force."""

    dirs: list[str] = field(default_factory=list)
    applied: list[str] = field(default_factory=list)
    memory_dir: str | None = None
    pids_dir: str | None = None
    v2: bool = False

    def attach(self, pid: int) -> None:
        for d in self.dirs:
            with contextlib.suppress(OSError):
                _write(os.path.join(d, "cgroup.procs"), str(pid))

    def memory_exceeded(self) -> bool:
        if self.memory_dir is None:
            return False
        if self.v2:
            return _read_int(os.path.join(self.memory_dir, "memory.events"), "max") > 0
        # failcnt stays 0 on some kernels even after an OOM kill; oom_control counts the kills
        return (
            _read_int(os.path.join(self.memory_dir, "memory.oom_control"), "oom_kill") > 0
            or _read_int(os.path.join(self.memory_dir, "memory.failcnt")) > 0
        )

    def pids_exceeded(self) -> bool:
        if self.pids_dir is None:
            return False
        return _read_int(os.path.join(self.pids_dir, "pids.events"), "max") > 0

    def kill_all(self) -> None:
        """SIGKILL every process still in the run's cgroups (belt and braces after the pid namespace)."""
        for d in self.dirs:
            with contextlib.suppress(OSError):
                with open(os.path.join(d, "cgroup.procs")) as f:
                    pids = [int(x) for x in f.read().split()]
                for pid in pids:
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)

    def remove(self, wait_s: float = 2.0) -> bool:
        """rmdir the leaves; killed processes take a moment to leave them, so retry briefly (EBUSY)."""
        deadline = time.monotonic() + wait_s
        left = []
        for d in self.dirs:
            while True:
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        left.append(d)
                        break
                    self.kill_all()
                    time.sleep(0.005)
        self.dirs = left
        return not left


def _make_leaf(parent: str) -> str | None:
    leaf = os.path.join(parent, "cispo-sandbox-" + uuid.uuid4().hex[:12])
    try:
        os.mkdir(leaf)
    except OSError:
        return None
    return leaf


def _v1(memory_bytes: int | None, pids: int | None) -> RunCgroups:
    cg = RunCgroups()
    if memory_bytes is not None and (rel := _own_path("memory")) is not None:
        leaf = _make_leaf(os.path.join(ROOT, "memory") + rel)
        if leaf is not None:
            cg.dirs.append(leaf)
            try:
                _write(os.path.join(leaf, "memory.limit_in_bytes"), str(memory_bytes))
                with contextlib.suppress(OSError):  # absent without swap accounting
                    _write(os.path.join(leaf, "memory.memsw.limit_in_bytes"), str(memory_bytes))
                cg.memory_dir = leaf
                cg.applied.append("cgroup_memory")
            except OSError:
                pass
    if pids is not None and (rel := _own_path("pids")) is not None:
        leaf = _make_leaf(os.path.join(ROOT, "pids") + rel)
        if leaf is not None:
            cg.dirs.append(leaf)
            try:
                _write(os.path.join(leaf, "pids.max"), str(pids))
                cg.pids_dir = leaf
                cg.applied.append("cgroup_pids")
            except OSError:
                pass
    return cg


def _v2(memory_bytes: int | None, pids: int | None) -> RunCgroups:
    cg = RunCgroups(v2=True)
    rel = _own_path("")
    base = os.path.join(ROOT, "unified") if os.path.isdir(os.path.join(ROOT, "unified")) else ROOT
    if rel is None or not os.path.exists(os.path.join(base, "cgroup.controllers")):
        return cg
    parent = base + rel
    try:
        with open(os.path.join(parent, "cgroup.subtree_control")) as f:
            enabled = f.read().split()
    except OSError:
        return cg
    wanted = [(c, v) for c, v in (("memory", memory_bytes), ("pids", pids)) if v is not None and c in enabled]
    if not wanted or (leaf := _make_leaf(parent)) is None:
        return cg
    cg.dirs.append(leaf)
    for ctrl, value in wanted:
        with contextlib.suppress(OSError):
            _write(os.path.join(leaf, f"{ctrl}.max"), str(value))
            setattr(cg, f"{ctrl}_dir", leaf)
            cg.applied.append(f"cgroup_{ctrl}")
    return cg


def create_run_cgroups(memory_bytes: int | None, pids: int | None) -> RunCgroups:
    """Create leaves for one run; returns an empty RunCgroups where the host allows none."""
    if memory_bytes is None and pids is None:
        return RunCgroups()
    if os.path.isdir(os.path.join(ROOT, "memory")) or os.path.isdir(os.path.join(ROOT, "pids")):
        cg = _v1(memory_bytes, pids)
        if cg.applied:
            return cg
        cg.remove()
    return _v2(memory_bytes, pids)


def sweep_stale(min_age_s: float = 300.0) -> int:
    """Remove empty per-run leaves left by a scorer that was killed before it could clean up.

    Only leaves older than ``min_age_s`` are touched: a live run attaches its leaf within milliseconds, so
    an old empty leaf belongs to nobody. Non-empty leaves refuse rmdir (EBUSY) and stay.
    """
    import glob

    removed = 0
    now = time.time()
    for leaf in glob.glob(os.path.join(ROOT, "**", "cispo-sandbox-*"), recursive=True):
        with contextlib.suppress(OSError):
            if now - os.stat(leaf).st_mtime >= min_age_s:
                os.rmdir(leaf)
                removed += 1
    return removed
