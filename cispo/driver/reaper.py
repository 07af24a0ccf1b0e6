"""Nothing the driver started outlives it, even after a `kill -9`.

A driver that dies by SIGKILL runs no cleanup: the local Ray instance's head processes go (Ray ties them to
the driver), but their children, `ray::DashboardAgent`, `ray::RuntimeEnvAgent` and workers, are
re-parented to init and keep running, as do reward worker processes. So the CLI starts a small watcher
process (`python -m cispo.driver.reaper <driver pid> <ray temp dir>`, in a session of its own so a signal
to the driver's process group does not take it first). Until the driver exits it records every
descendant of the driver (pid and start time, so a reused pid is never hit) twice a second; then it
stops and kills every recorded process that is still the same process, every descendant of those, and
every process whose command line names the run's Ray temp dir, and exits. After a normal exit there is
usually nothing left to kill.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

PROC = Path("/proc")
INTERVAL_S = 0.5


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of `pid`, or None when it is gone."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # the name, in parentheses, may hold spaces
    return int(fields[1]), int(fields[19])


def _processes() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, start time) for every process."""
    table = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None:
                table[int(entry.name)] = stat
    return table


def descendants(roots: set[int], table: dict[int, tuple[int, int]]) -> set[int]:
    """Every process below `roots` in `table` (the roots themselves excluded)."""
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    found, todo = set(), list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found - roots


def _names_dir(pid: int, marker: str) -> bool:
    try:
        return marker.encode() in (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return False


def _wait_for_exit(pid: int, pidfd: int | None, seconds: float) -> bool:
    """Whether `pid` has exited, waiting at most `seconds`."""
    if pidfd is not None:
        return bool(select.select([pidfd], [], [], seconds)[0])
    time.sleep(seconds)
    return _stat(pid) is None


def watch(driver: int, marker: str) -> int:
    """Records the driver's descendants until it exits, then kills what is left; returns how many."""
    me = os.getpid()
    try:
        pidfd: int | None = os.pidfd_open(driver)
    except (AttributeError, OSError):
        pidfd = None  # an old kernel: poll instead
    seen: dict[int, int] = {}
    while True:
        table = _processes()
        if driver not in table:
            break
        seen.update({pid: table[pid][1] for pid in descendants({driver}, table) if pid != me})
        if _wait_for_exit(driver, pidfd, INTERVAL_S):
            break
    return reap(seen, marker, me)


def reap(seen: dict[int, int], marker: str, me: int) -> int:
    """Stops, then kills, every recorded process still alive as itself, their descendants and every
    process naming `marker`; stopping first keeps a dying tree from starting new children meanwhile."""
    targets: set[int] = set()
    for _ in range(5):
        table = _processes()
        alive = {pid for pid, start in seen.items() if pid in table and table[pid][1] == start}
        named = {pid for pid in table if marker and pid != me and _names_dir(pid, marker)}
        new = (alive | named | descendants(alive | named, table)) - targets - {me}
        if not new:
            break
        for pid in new:
            _signal(pid, signal.SIGSTOP)
        targets |= new
    for pid in targets:
        _signal(pid, signal.SIGKILL)
    return len(targets)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def ray_temp_dir(driver: int) -> str:
    """The temp dir of the local Ray instance a driver with this pid starts (cispo.driver.build)."""
    return f"/tmp/ray_cispo_{driver}"


def start_reaper() -> subprocess.Popen | None:
    """Starts the watcher of this process (Linux only: it reads /proc); None elsewhere."""
    if not (PROC / "self" / "stat").exists():
        return None
    driver = os.getpid()
    return subprocess.Popen(
        [sys.executable, "-m", "cispo.driver.reaper", str(driver), ray_temp_dir(driver)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
    )


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is the driver's to handle; this one waits
    # The trailing slash: /tmp/ray_cispo_12/ never matches another run's /tmp/ray_cispo_123/.
    watch(int(sys.argv[1]), sys.argv[2].rstrip("/") + "/" if len(sys.argv) > 2 else "")
