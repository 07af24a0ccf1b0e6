from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator

import pytest

from sandboxes import Sandbox, SandboxError, get_sandbox

# Every container the tests start carries this label, so a test can tell its own leftovers from other users'.
TEST_LABEL = ("cispo.test", f"{os.getpid()}-{secrets.token_hex(4)}")


@pytest.fixture(scope="session")
def bwrap() -> Sandbox:
    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap is not installed (apt-get install -y --no-install-recommends bubblewrap)")
    return get_sandbox("bwrap")


@pytest.fixture(scope="session")
def docker_sandbox() -> Iterator[Sandbox]:
    """The docker backend on the engine it finds (launch/docker_engine.sh starts one as root), else skip."""
    try:
        box = get_sandbox("docker", labels=dict([TEST_LABEL]))
    except SandboxError as e:
        pytest.skip(f"no Docker engine with a sandbox image here: {e}")
    yield box
    box.close()


def containers_left(box: Sandbox) -> list[str]:
    """Containers (running or not) that this test session created and that still exist on the engine."""
    found = box.client.api.containers(all=True, filters={"label": "=".join(TEST_LABEL)})  # type: ignore[attr-defined]
    return [f"{c['Id'][:12]} {c['State']} {c.get('Command', '')[:60]}" for c in found]


@pytest.fixture(params=["bwrap", "docker"])
def sandbox(request: pytest.FixtureRequest) -> Iterator[Sandbox]:
    """Each threat-model claim on every backend; after a docker run, no container of it may remain."""
    box: Sandbox = request.getfixturevalue("bwrap" if request.param == "bwrap" else "docker_sandbox")
    yield box
    if request.param == "docker":
        assert containers_left(box) == [], "stray containers after the test"


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
