"""ProcessTransport under a real Supervisor: typed replies and errors, a load failure named and not retried,
a hanging process (and its own subprocess) killed at its deadline, an exit seen as a death, a payload that
cannot be pickled refused without touching the slot."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from cispo.core.process_slots import ProcessTransport, RemoteError, Unsendable
from cispo.core.supervisor import Outcome, SlotPolicy, Supervisor


class HoldsALock(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


class Server:
    """Answers requests (op, arg); refuses to load when `broken` (a file path) exists."""

    def __init__(self, factor: int, broken: str = "") -> None:
        if broken and os.path.exists(broken):
            raise ImportError(f"no module named plugin_{factor}")
        self.factor = factor

    def handle(self, request: tuple[str, Any]) -> Any:
        op, arg = request
        if op == "mul":
            return arg * self.factor
        if op == "env":
            return os.environ.get(arg)
        if op == "raise":
            raise ValueError(f"bad {arg}")
        if op == "lock":
            raise HoldsALock("locked out")
        if op == "unpicklable":
            return threading.Lock()
        if op == "exit":
            os._exit(arg)
        if op == "hang":
            child = subprocess.Popen(["sleep", "600"])
            Path(arg).write_text(str(child.pid))
            time.sleep(3600)
        raise AssertionError(op)


def _supervisor(broken: str = "", **policy: Any) -> tuple[Supervisor, ProcessTransport]:
    transport = ProcessTransport(functools.partial(Server, 3, broken), name="test server")
    options = {"role": "test server", "start_timeout_s": 120.0, "keys": "test", **policy}
    return Supervisor(transport, SlotPolicy(**options), 1), transport


def _one(sup: Supervisor, request: tuple[str, Any], timeout_s: float = 120.0) -> Outcome:
    sup.submit(0, request, sup.transport.call, timeout_s)
    end = time.monotonic() + 180  # a hang guard only
    while not (done := sup.wait(1.0)):
        assert time.monotonic() < end
    sup.settle()
    return done[0]


def _gone(pid: int, within_s: float = 10.0) -> bool:
    end = time.monotonic() + within_s
    while time.monotonic() < end:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                return True
        except OSError:
            return True
        time.sleep(0.05)
    return False


def test_replies_and_errors_come_back_typed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CISPO_SLOT_GONE", "in the fork server")
    sup, transport = _supervisor()
    sup.start()  # the fork server runs from here on, with the environment of this moment
    try:
        assert _one(sup, ("mul", 5)).value == 15
        assert _one(sup, ("env", "CISPO_SLOT_GONE")).value == "in the fork server"
        monkeypatch.setenv("CISPO_SLOT_TEST", "from the driver")
        monkeypatch.delenv("CISPO_SLOT_GONE")
        sup.restart(0, "picks up the environment", charge=False)
        sup.settle()
        assert _one(sup, ("env", "CISPO_SLOT_TEST")).value == "from the driver"
        assert _one(sup, ("env", "CISPO_SLOT_GONE")).value is None, "the driver's, not the fork server's"
        raised = _one(sup, ("raise", "input")).error
        assert isinstance(raised, RemoteError) and raised.type_name == "ValueError"
        assert isinstance(raised.error, ValueError) and str(raised.error) == "bad input"
        assert 'raise ValueError(f"bad {arg}")' in raised.trace
        locked = _one(sup, ("lock", None)).error
        assert isinstance(locked, RemoteError) and locked.error is None, "it does not survive pickling"
        assert (locked.type_name, locked.message) == ("HoldsALock", "locked out")
        bad_reply = _one(sup, ("unpicklable", None)).error
        assert isinstance(bad_reply, RemoteError) and "pickle" in bad_reply.message
        with pytest.raises(Unsendable, match="generator"):
            sup.submit(0, ("mul", (i for i in range(3))), transport.call, 10.0)
        assert sup.idle_slots() == [0] and _one(sup, ("mul", 2)).value == 6, "the slot is untouched"
        assert sup.take_events()["restarts_total"] == 0.0
    finally:
        transport.close()


def test_an_exit_is_a_death_and_the_slot_is_replaced() -> None:
    sup, transport = _supervisor()
    sup.start()
    try:
        before = sup.handles[0].pid
        outcome = _one(sup, ("exit", 3))
        assert outcome.failure == "died: exit code 3" and not outcome.timed_out
        assert sup.handles[0].pid != before and _gone(before)
        assert _one(sup, ("mul", 1)).value == 3
    finally:
        transport.close()


def test_a_hanging_process_is_killed_with_its_subprocess_at_the_deadline(tmp_path: Path) -> None:
    sup, transport = _supervisor()
    sup.start()
    pid_file = tmp_path / "child"
    try:
        before = sup.handles[0].pid
        outcome = _one(sup, ("hang", str(pid_file)), timeout_s=2.0)
        assert outcome.timed_out and outcome.failure == "did not answer within 2 s"
        assert _gone(before) and _gone(int(pid_file.read_text())), "the process group went with it"
        assert _one(sup, ("mul", 4)).value == 12
    finally:
        transport.close()


def test_a_load_failure_is_named_and_never_retried(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.touch()
    sup, transport = _supervisor(str(broken), max_restarts=None)
    expected = r"test server slot 0 failed to start: LoadError: test server 0 could not load: ImportError"
    with pytest.raises(RuntimeError, match=expected) as err:
        sup.start()
    assert "raise ImportError" in str(err.value), "with the traceback"
    broken.unlink()
    sup, transport = _supervisor(str(broken), max_restarts=None)
    sup.start()
    try:
        broken.touch()  # the replacement will fail to load
        os.kill(sup.handles[0].pid, signal.SIGKILL)
        with pytest.raises(RuntimeError, match=r"slot 0 cannot restart: test server 0 could not load"):
            _one(sup, ("mul", 1))
    finally:
        transport.close()
