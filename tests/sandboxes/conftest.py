from __future__ import annotations

import os
import shutil

import pytest

from sandboxes import Sandbox, get_sandbox


@pytest.fixture(scope="session")
def bwrap() -> Sandbox:
    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap is not installed (apt-get install -y --no-install-recommends bubblewrap)")
    return get_sandbox("bwrap")


def host_pids_with(marker: str) -> list[int]:
    """Host pids whose command line contains ``marker`` (how tests spot leaked sandbox processes)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(entry))
        except OSError:
            continue
    return found


def cgroup_leaves() -> set[str]:
    """The per-run cgroup leaves that exist now, in every hierarchy we may create them in."""
    import glob

    return set(glob.glob("/sys/fs/cgroup/**/cispo-sandbox-*", recursive=True))
