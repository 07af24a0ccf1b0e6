"""Processes as supervisor slots (`cispo.core.supervisor`): a `ProcessTransport` starts each remote as a
process and speaks typed messages with it over a multiprocessing pipe.

The remote's life (`serve`): it builds its *server* from a picklable factory (``server.handle(payload)``
answers one request), says `Ready` (or `LoadFailed`, which no restart can cure: `LoadError`), then answers
each `Request` with a `Reply` or, when its code raised, `Raised`, one request at a time, until `Stop` or its
pipe closes. Supervision (deadlines, kills, restarts) is the supervisor's; this module only notices a process
that exited (`SlotDied`, with its exit code or signal) and kills one with its whole process group.

Processes start with multiprocessing's ``forkserver`` method: a fresh single-threaded server forks them, never
the driver, whose Ray, torch and gRPC threads a plain fork would copy in an unknown state; the server imports
the `preload` modules once, so a replacement starts in about the time its own imports take. Each process
leads its own process group (a kill takes its subprocesses too) and dies with the fork server, which exits
with the driver (PR_SET_PDEATHSIG). Its environment is the driver's at the time of the start (or the one
given), not the fork server's.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import multiprocessing.util
import os
import pickle
import signal
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any, Protocol

from cispo.core.supervisor import SlotDied, StartFailed

# ---------------------------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class Ready:
    """The server is built; the process takes requests."""

    pid: int


@dataclass(frozen=True)
class LoadFailed:
    """Building the server raised: what failed, and where."""

    type_name: str
    message: str
    trace: str


@dataclass(frozen=True)
class Request:
    payload: Any


@dataclass(frozen=True)
class Reply:
    value: Any


@dataclass(frozen=True)
class Raised:
    """The server's code raised on a request. `pickled` is the exception itself when it survives a pickle
    round trip in the remote; it travels as bytes so that an exception class the parent cannot import
    costs only itself (`exception()` is None), not the type name, message and traceback around it."""

    type_name: str
    message: str
    trace: str
    pickled: bytes | None = None

    @classmethod
    def of(cls, error: BaseException) -> Raised:
        trace = "".join(traceback.format_exception(error)).rstrip()
        try:
            message = str(error)
        except Exception:  # noqa: BLE001 - a broken __str__ still leaves the type and the traceback
            message = f"<unprintable {type(error).__name__}>"
        try:
            data: bytes | None = pickle.dumps(error)
            pickle.loads(data)  # a custom __init__ can make an exception pickle but not unpickle
        except BaseException:  # noqa: BLE001
            data = None
        return cls(type(error).__name__, message, trace, data)

    def exception(self) -> BaseException | None:
        try:
            return pickle.loads(self.pickled) if self.pickled is not None else None
        except Exception:  # noqa: BLE001 - a class this process cannot import
            return None


@dataclass(frozen=True)
class Stop:
    """Exit cleanly (the server's atexit hooks run)."""


class Server(Protocol):
    def handle(self, payload: Any) -> Any: ...


class RemoteError(Exception):
    """A remote's code raised: its type name, message and traceback, and `error`, the exception itself when it
    could travel (else None)."""

    def __init__(self, raised: Raised) -> None:
        super().__init__(f"{raised.type_name}: {raised.message}")
        self.type_name, self.message, self.trace = raised.type_name, raised.message, raised.trace
        self.error = raised.exception()


class LoadError(StartFailed):
    """A remote could not build its server (an import or a configuration error): restarting cannot help."""


class Unsendable(ValueError):
    """A request that cannot be pickled; nothing was sent, the process is still idle."""


# ---------------------------------------------------------------------------------------------- the remote


def _die_with_parent() -> None:
    """SIGKILL when the fork server (which exits with the driver) goes; Linux only, best effort."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:
        os._exit(0)


def serve(conn: Connection, factory: Callable[[], Server], env: dict[str, str], orphan_kill: bool) -> None:
    """A remote process's life: build the server, say Ready, answer requests until Stop or EOF."""
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)  # its own process group: a kill takes the server's subprocesses with it
    if orphan_kill:
        _die_with_parent()
    for name in set(os.environ) - set(env):  # a forkserver child inherits the server's environment
        del os.environ[name]
    os.environ.update(env)
    try:
        server = factory()
    except BaseException as e:  # noqa: BLE001 - SystemExit from a plugin's import too
        raised = Raised.of(e)
        conn.send(LoadFailed(raised.type_name, raised.message, raised.trace))
        return
    conn.send(Ready(os.getpid()))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        except BaseException as e:  # noqa: BLE001 - a request of a class this process cannot import
            conn.send(Raised.of(e))
            continue
        if not isinstance(message, Request):
            return  # Stop
        try:
            reply: Reply | Raised = Reply(server.handle(message.payload))
        except BaseException as e:  # noqa: BLE001 - SystemExit and KeyboardInterrupt from a plugin too
            reply = Raised.of(e)
        try:
            conn.send(reply)
        except Exception as e:  # noqa: BLE001 - a value that cannot be pickled: nothing was written
            conn.send(Raised.of(e))


# ---------------------------------------------------------------------------------------------- the parent


@dataclass(eq=False)
class ProcessCall:
    """A transport future: the one message a process owes (``ready``, ``call``), or its exit (``exit``)."""

    handle: ProcessHandle
    kind: str
    done: bool = False
    value: Any = None
    error: BaseException | None = None

    def resolve(self, value: Any = None, error: BaseException | None = None) -> None:
        if not self.done:
            self.value, self.error, self.done = value, error, True


@dataclass(eq=False)
class ProcessHandle:
    slot: int
    pid: int
    proc: Any  # multiprocessing's Process of the transport's context
    conn: Connection
    pending: ProcessCall | None = None
    stopping: list[ProcessCall] = field(default_factory=list)  # exit futures (Stop sent)
    closed: bool = False


def describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}" if code is not None else "its pipe closed"


def _kill(handle: ProcessHandle) -> None:
    if handle.closed:
        return
    handle.closed = True
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(handle.pid, signal.SIGKILL)  # fails only before it leads its group, or once it is gone
    if handle.proc.exitcode is None:
        handle.proc.kill()
    handle.proc.join(10)
    handle.conn.close()
    died = SlotDied(f"killed ({describe_exit(handle.proc.exitcode)})")
    for future in [handle.pending, *handle.stopping]:
        if future is not None:
            future.resolve(error=None if future.kind == "exit" else died)
    if handle.proc.exitcode is not None:
        handle.proc.close()


def _stop_all(live: set[ProcessHandle], grace_s: float = 2.0) -> None:
    """Idle processes are asked to exit (their atexit hooks run); the rest, and laggards, are killed."""
    idle = [h for h in live if not h.closed and h.pending is None]
    for h in idle:
        with contextlib.suppress(OSError):
            h.conn.send(Stop())
    end = time.monotonic() + grace_s
    for h in idle:
        h.proc.join(max(0.0, end - time.monotonic()))
    for h in list(live):
        _kill(h)
    live.clear()


class ProcessTransport:
    """A supervisor `Transport` whose remotes are processes, each serving ``factory()`` (a picklable
    callable, run in the process). `call(handle, payload)` sends one request; `stop(handle)` asks an idle
    process to exit. `close()` (also at garbage collection and interpreter exit, before multiprocessing
    joins its children) stops every process this transport started."""

    def __init__(
        self,
        factory: Callable[[], Server],
        *,
        name: str = "remote",
        preload: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
        self._ctx = multiprocessing.get_context(method)
        if method == "forkserver" and preload:
            self._ctx.set_forkserver_preload(list(preload))  # takes effect only if no server runs yet
        self._orphan_kill = method == "forkserver"  # the parent is then the fork server, not a driver thread
        self.factory, self.name, self.env = factory, name, env
        self._live: set[ProcessHandle] = set()
        # exitpriority: run at interpreter exit before multiprocessing joins its (non-daemon) children
        self._finalizer = multiprocessing.util.Finalize(self, _stop_all, args=(self._live,), exitpriority=10)

    def start(self, slot: int) -> ProcessHandle:
        parent, child = self._ctx.Pipe()
        env = dict(os.environ) if self.env is None else dict(self.env)
        args = (child, self.factory, env, self._orphan_kill)
        # not a daemon: a daemonic process may not start processes of its own, and a plugin may
        proc = self._ctx.Process(target=serve, args=args, name=f"{self.name}-{slot}", daemon=False)
        proc.start()
        child.close()
        handle = ProcessHandle(slot, proc.pid, proc, parent)
        handle.pending = ProcessCall(handle, "ready")
        self._live.add(handle)
        return handle

    def ready(self, handle: ProcessHandle) -> ProcessCall:
        """The future of the Ready message every process owes from its start."""
        assert handle.pending is not None and handle.pending.kind == "ready", "ready() once per start"
        return handle.pending

    def call(self, handle: ProcessHandle, payload: Any) -> ProcessCall:
        """Sends one request to an idle process. Unsendable when `payload` cannot be pickled (nothing sent);
        SlotDied when the process has already exited (its slot should be restarted, the work kept)."""
        if handle.pending is not None and not handle.pending.done:
            raise RuntimeError(f"{self.name} {handle.slot} is busy: one call at a time")
        if handle.closed or handle.proc.exitcode is not None:
            code = None if handle.closed else handle.proc.exitcode
            raise SlotDied(f"exited while idle ({describe_exit(code)})")
        future = ProcessCall(handle, "call")
        try:
            handle.conn.send(Request(payload))  # pickles first: an unpicklable payload sends nothing
        except OSError as err:
            future.resolve(error=SlotDied(f"its pipe broke ({err})"))
        except Exception as err:  # noqa: BLE001 - pickling raises TypeError, AttributeError, PicklingError...
            raise Unsendable(f"{type(err).__name__}: {err}") from err
        handle.pending = future
        return future

    def stop(self, handle: ProcessHandle) -> ProcessCall:
        """Asks an idle process to exit; the future is done when it has."""
        future = ProcessCall(handle, "exit")
        if handle.closed:
            future.resolve()
            return future
        with contextlib.suppress(OSError):
            handle.conn.send(Stop())
        handle.stopping.append(future)
        return future

    def wait(self, futures: Sequence[ProcessCall], timeout_s: float) -> list[ProcessCall]:
        watched: dict[Any, ProcessHandle] = {}
        for f in futures:
            if not f.done and not f.handle.closed:
                watched[f.handle.conn] = watched[f.handle.proc.sentinel] = f.handle
        if watched and not any(f.done for f in futures):
            for ready in dict.fromkeys(watched[r] for r in wait(list(watched), timeout_s)):
                self._pump(ready)
        elif watched:
            for handle in dict.fromkeys(watched.values()):
                if handle.conn.poll() or handle.proc.exitcode is not None:
                    self._pump(handle)
        return [f for f in futures if f.done]

    def get(self, future: ProcessCall) -> Any:
        if not future.done:
            raise RuntimeError("ProcessTransport.get: the call has not ended")
        if future.error is not None:
            raise future.error
        return future.value

    def kill(self, handle: ProcessHandle) -> None:
        _kill(handle)
        self._live.discard(handle)

    def close(self, grace_s: float = 2.0) -> None:
        """Stops every process (idle ones cleanly, within `grace_s`); idempotent."""
        _stop_all(self._live, grace_s)

    def _pump(self, handle: ProcessHandle) -> None:
        """Reads what the process sent; notices its exit (after reading what it sent before exiting)."""
        try:
            while handle.conn.poll():
                self._receive(handle, handle.conn)
        except (EOFError, OSError):
            handle.proc.join(1.0)  # its pipe closed: the exit status follows at once
        if handle.proc.exitcode is None:
            return
        how = describe_exit(handle.proc.exitcode)
        if handle.pending is not None:
            handle.pending.resolve(error=SlotDied(how))
        for future in handle.stopping:
            future.resolve(handle.proc.exitcode)

    def _receive(self, handle: ProcessHandle, conn: Connection) -> None:
        future = handle.pending
        try:
            message = conn.recv()  # EOFError and OSError (it exited) go to _pump
        except (EOFError, OSError):
            raise
        except Exception as err:  # noqa: BLE001 - a reply of a class this process cannot import
            message = Raised.of(err)
        if future is None or future.done:
            return  # nothing is owed (a late answer after Stop): dropped
        if isinstance(message, Ready):
            future.resolve(message.pid)
        elif isinstance(message, LoadFailed):
            text = f"{self.name} {handle.slot} could not load: {message.type_name}: {message.message}"
            future.resolve(error=LoadError(f"{text}\n{message.trace}"))
        elif isinstance(message, Reply):
            future.resolve(message.value)
        elif isinstance(message, Raised):
            future.resolve(error=RemoteError(message))
        else:
            future.resolve(error=RuntimeError(f"{self.name} {handle.slot} sent {type(message).__name__}"))
