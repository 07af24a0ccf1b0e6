"""The program the ``code`` reward runs in the sandbox: a test process, and the solution in a process apart.

Run as the sandbox's main program this file is the *test process*. It forks the *solution process*
(``code_solution``: it runs nothing but the harness until it is sent the solution), makes itself
non-dumpable, drops every ``sys.path`` entry the solution could write and leaves the work dir, reads the
job (the pass line, the solution, the tests) from stdin to its end, and sends the solution over. The tests
run in the test process (``code_runner`` says how). Each name they use that the solution defines is, there,
a plain value, a :class:`Remote` whose calls go to the solution process and come back as plain data (None,
bool, int, float, complex, str, bytes and lists, tuples, sets, frozensets and dicts of those; list, dict and
set arguments the call changed are changed in place) or as a handle to an object that stays in the
solution process, or a module, but only one the tests named themselves: a top-level module imported by the
test process under the very name the tests use (F7). Callables of the tests that they pass to the solution
stay in the test process and run there when the solution calls them. Only when the tests finish and the
solution process never died, exited or broke the protocol does the test process write the pass line.

How this closes each forgery class (F1-F7) is in the threat model in ``sandboxes``. The sandbox runs this
file with ``code_protocol``, ``code_runner`` and ``code_solution`` in front of it, as one program
(``rewards.code.harness_source``), on its interpreter: standard library only, Python 3.9 or newer.
"""

import builtins
import os
import select
import sys
import types

from rewards.code_protocol import (
    _EXITS,
    MAX_REPLY,
    PASS_PREFIX,
    _rebuilt,
    decode,
    encode,
    error_reply,
    loads,
    send_frame,
)
from rewards.code_runner import TESTS_FILE, names_loaded, run_collected
from rewards.code_solution import serve

__all__ = ["PASS_PREFIX", "run_tests"]
# Top-level modules that act on import; never imported for the solution even under the tests' own name.
_NOT_IMPORTED = ("antigravity", "this", "idlelib", "turtledemo", "__hello__", "__phello__")
# Callables of the tests the solution may call back: functions and methods the tests' source defines, and
# these pure built-ins (never getattr, eval, open, __import__, ...: those would hand over the test process).
_PURE_BUILTINS = frozenset(
    "abs all any bin bool bytes chr complex dict divmod float format frozenset hash hex int isinstance len "
    "list max min oct ord pow repr round set sorted str sum tuple".split()
)
_PURE_MODULES = ("math", "cmath", "operator", "_operator")
_IMMUTABLE = (str, bytes, int, float, complex, tuple, frozenset)


def may_call_back(obj):
    """Whether the tests may hand ``obj`` to the solution as a callable (see _PURE_BUILTINS)."""
    if isinstance(obj, types.MethodType):
        obj = obj.__func__
    if isinstance(obj, types.FunctionType):
        return obj.__code__.co_filename == TESTS_FILE
    if isinstance(obj, types.BuiltinFunctionType):
        name, module = getattr(obj, "__name__", ""), getattr(obj, "__module__", None)
        if not isinstance(getattr(obj, "__self__", None), (types.ModuleType, type(None))):
            return False  # a method bound to an object of the tests
        if module == "builtins":
            return name in _PURE_BUILTINS and getattr(builtins, name, None) is obj
        return module in _PURE_MODULES
    if isinstance(obj, types.MethodDescriptorType):  # str.lower, int.bit_length: methods of immutable types
        return obj.__objclass__ in _IMMUTABLE and obj.__name__ not in ("format", "format_map")  # "{0.x.y}"
    if isinstance(obj, type):
        return (
            obj.__module__ == "builtins"
            and obj.__name__ in _PURE_BUILTINS
            and getattr(builtins, obj.__name__) is obj
        )
    getter = type(obj).__name__ in ("itemgetter", "attrgetter")
    return getter and type(obj).__module__ in ("operator", "_operator")


class SolutionGone(BaseException):
    """The solution process died, exited or broke the protocol; a BaseException so that no test's
    ``except Exception`` swallows it (the run fails at the end anyway)."""


class Channel:
    """The test process's end of the pipes to the solution process; one request, one reply (callbacks of
    the solution into the tests' callables are served while a reply is awaited)."""

    def __init__(self, pid, wfd, rfd):
        self.pid, self.wfd, self.rfd = pid, wfd, rfd
        try:  # readable once the solution process ends, even if a child of it holds the pipe
            self.pidfd = os.pidfd_open(pid)
        except (AttributeError, OSError):  # Python < 3.9, Linux < 5.3, or a seccomp filter: EOF only
            self.pidfd = None
        self.buf = bytearray()
        self.broken = ""
        self.local, self.local_ids = {}, {}  # the tests' callables the solution holds, by id

    def fail(self, why):
        self.broken = self.broken or why
        raise SolutionGone(self.broken)

    def encode(self, value):
        return encode(value, self._handle)

    def dec(self, data):
        try:
            return decode(data, self.remote, self._local)
        except Exception as e:
            self.fail(f"the solution process sent a value that is not plain data ({type(e).__name__})")

    def _handle(self, obj):
        if isinstance(obj, Remote) and object.__getattribute__(obj, "_chan") is self:
            return ["h", object.__getattribute__(obj, "_id")]
        if may_call_back(obj):
            if id(obj) not in self.local_ids:
                self.local_ids[id(obj)] = len(self.local)
                self.local[len(self.local)] = obj
            return ["t", self.local_ids[id(obj)]]
        raise TypeError(f"the tests passed a {type(obj).__name__} to the solution; only plain data crosses")

    def _local(self, tid):
        if tid not in self.local:
            raise ValueError("not a callable of the tests")
        return self.local[tid]

    def remote(self, ident):
        return Remote(self, ident)

    def request(self, msg):
        """Send ``msg``, return the reply's JSON; any failure of the solution process is SolutionGone."""
        if self.broken:
            raise SolutionGone(self.broken)
        try:
            send_frame(self.wfd, msg)
            while True:
                reply = self._reply()
                if type(reply) is not list or reply[:1] != ["cb"]:
                    return reply
                send_frame(self.wfd, self._callback(reply))
        except OSError as e:
            self.fail(f"the solution process is gone ({type(e).__name__})")

    def _reply(self):
        line = self._line()
        try:
            return loads(line.decode("ascii"))
        except Exception as e:  # the scanner raises StopIteration, ValueError, RecursionError, ...
            self.fail(f"the solution process broke the protocol ({type(e).__name__})")

    def _callback(self, msg):
        """The solution calls a callable the tests passed it: run it here on plain data; the reply."""
        if len(msg) != 4 or type(msg[1]) is not int or msg[1] not in self.local:
            self.fail("the solution process sent a reply that is not the protocol")
        args, kwargs = self.dec(msg[2]), self.dec(msg[3])
        if type(args) is not list or type(kwargs) is not dict or not all(type(k) is str for k in kwargs):
            self.fail("the solution process sent a reply that is not the protocol")
        try:
            return ["cbok", self.encode(self.local[msg[1]](*args, **kwargs))]
        except Exception as e:
            return error_reply(e, "cberr")

    def ask(self, *msg):
        return self.answer(self.request(list(msg)), msg[0])

    def call(self, ident, args, kwargs):
        """Call the solution's object ``ident``; arguments it changed are changed here too."""
        reply = self.request(["call", ident, self.encode(list(args)), self.encode(kwargs)])
        if type(reply) is list and len(reply) == 3 and reply[0] == "ok" and type(reply[2]) is list:
            for item in reply[2]:
                self._write_back(item, args, kwargs)
            reply = reply[:2]
        return self.answer(reply, "call")

    def _write_back(self, item, args, kwargs):
        key, value = item if type(item) is list and len(item) == 2 else (None, None)
        target = args[key] if type(key) is int and 0 <= key < len(args) else kwargs.get(key)
        value = self.dec(value)
        if isinstance(target, list) and type(value) is list:
            target[:] = value
        elif isinstance(target, (dict, set)) and type(value) is type(target).__mro__[-2]:
            target.clear()
            target.update(value)

    def answer(self, reply, op):
        """The value in an ``ok`` reply; the solution's exception, rebuilt, for an ``err`` reply."""
        if type(reply) is list and len(reply) == 2 and reply[0] == "ok":
            return self.dec(reply[1])
        if type(reply) is list and len(reply) == 3 and reply[0] == "err" and type(reply[1]) is list:
            exits = [n for n in reply[1] if n in _EXITS]
            if exits:
                self.fail(f"the solution raised {exits[0]}")
            raise _rebuilt(reply[1], str(reply[2]), op)
        self.fail("the solution process sent a reply that is not the protocol")

    def _line(self):
        while True:
            end = self.buf.find(b"\n")
            if end >= 0:
                line = bytes(self.buf[:end])
                del self.buf[: end + 1]
                return line
            if len(self.buf) > MAX_REPLY:
                self.fail("the solution process sent a reply over the size limit")
            fds = [self.rfd] if self.pidfd is None else [self.rfd, self.pidfd]
            if self.rfd in select.select(fds, [], [])[0]:
                chunk = os.read(self.rfd, 1 << 20)
                if not chunk:
                    self.fail("the solution process closed its channel")
                self.buf += chunk
            else:
                self.fail("the solution process exited")

    def close(self):
        try:
            os.kill(self.pid, 9)
            os.waitpid(self.pid, 0)
        except OSError:
            pass


class Remote:
    """An object that stays in the solution process. Calls, attributes, iteration, len, bool, indexing,
    repr, str and isinstance/issubclass against it are asked of the solution process and come back as plain
    data. It equals itself, and another Remote only when both are dataclass instances of the same class whose
    compared fields, fetched as plain data, are equal here; never a value of the tests (F4)."""

    __slots__ = ("_chan", "_id")

    def __init__(self, chan, ident):
        object.__setattr__(self, "_chan", chan)
        object.__setattr__(self, "_id", ident)

    def _ask(self, op, *args):
        return self._chan.ask(op, self._id, *args)

    def __call__(self, *args, **kwargs):
        return self._chan.call(self._id, args, kwargs)

    def __getattr__(self, name):
        if name in ("_chan", "_id") or name.startswith("__") and name not in ("__name__", "__qualname__"):
            raise AttributeError(name)
        return self._ask("getattr", name)

    def __setattr__(self, name, value):
        raise AttributeError("objects of the solution are read-only to the tests")

    def __getitem__(self, key):
        return self._ask("getitem", self._chan.encode(key))

    def __eq__(self, other):
        if not isinstance(other, Remote) or other._chan is not self._chan:
            return False
        if other._id == self._id:
            return True
        mine = self._ask("fields")
        return mine is not None and mine == other._ask("fields")

    def __ne__(self, other):
        return not self.__eq__(other)

    def __hash__(self):
        return hash(("cispo-remote", self._id))

    def _check(self, op, other):
        try:
            data = self._chan.encode(other)
        except TypeError:
            return False
        result = self._ask(op, data)
        if type(result) is not bool:
            self._chan.fail("the solution process sent a reply that is not the protocol")
        return result

    def __instancecheck__(self, instance):
        return self._check("isinstance", instance)

    def __subclasscheck__(self, subclass):
        return self._check("issubclass", subclass)


for _op in ("iter", "next", "len", "bool", "repr", "str"):  # asked of the solution; Python checks the types
    setattr(Remote, f"__{_op}__", lambda self, _op=_op: self._ask(_op))


# ---------------------------------------------------------------------------------------------- the tests


def _not_dumpable():
    """PR_SET_DUMPABLE 0: same-uid processes without CAP_SYS_PTRACE cannot read, trace or take our fds."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(4, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0) failed")


def read_only_paths():
    """F7: keep no ``sys.path`` entry the solution could write or create (the work dir, TMPDIR, missing
    paths, and as a non-root user any writable one), and leave the work dir for ``/``."""
    cwd, tmp = os.getcwd(), os.environ.get("TMPDIR", "/tmp")
    mine = tuple(p for p in (cwd, tmp) if p not in ("", "/"))
    root = os.geteuid() == 0  # only unsafe_subprocess runs as root: W_OK means nothing then
    sys.path[:] = [
        p
        for p in sys.path
        if p and os.path.exists(p) and not p.startswith(mine) and (root or not os.access(p, os.W_OK))
    ]
    os.chdir("/")


def _names_used(code):
    """Global names the tests' code (and every function in it) loads."""
    names = set(code.co_names)
    for const in code.co_consts:
        if hasattr(const, "co_names"):
            names |= _names_used(const)
    return names


def start_solution():
    """Fork the solution process before the job is read, so its copy of our memory holds no pass line and
    no tests. Until the ``load`` request it runs only this program; its fd 0/1 are our pipes, 2 is null."""
    req_r, req_w = os.pipe()
    resp_r, resp_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            null = os.open(os.devnull, os.O_RDWR)
            for fd, to in ((req_r, 0), (resp_w, 1), (null, 2)):
                os.dup2(fd, to)
            os.closerange(3, os.sysconf("SC_OPEN_MAX"))  # the sandbox's pipes and our ends
            serve()
        finally:
            os._exit(0)
    os.close(req_r)
    os.close(resp_w)
    return Channel(pid, req_w, resp_r)


def load(chan, solution, wanted):
    """Run the solution there; the names the tests use from it: values, Remotes, and modules (F7: only a
    top-level module imported here under the tests' own name for it, never a name the solution chose)."""
    import importlib

    reply = chan.request(["load", solution, sorted(wanted)])
    if type(reply) is list and reply[:1] == ["err"]:
        chan.answer(reply, "load")  # raises the solution's error
    if type(reply) is not list or len(reply) != 2 or reply[0] != "names" or type(reply[1]) is not list:
        chan.fail("the solution process sent a reply that is not the protocol")
    ns = {}
    for entry in reply[1]:
        if type(entry) is not list or len(entry) != 3 or type(entry[0]) is not str or entry[0] not in wanted:
            chan.fail("the solution process sent a reply that is not the protocol")
        name, kind, payload = entry
        if name.startswith("__") or hasattr(builtins, name):
            continue  # the tests' builtins are never the solution's (a module-level `abs` must not shadow)
        if kind == "m" and type(payload) is str:
            if payload == name and name not in _NOT_IMPORTED:
                try:
                    ns[name] = importlib.import_module(name)
                except Exception:
                    pass  # the tests get a NameError if they use it
        elif kind == "v":
            ns[name] = chan.dec(payload)
        else:
            chan.fail("the solution process sent a reply that is not the protocol")
    return ns


def _run(chan, tests, solution):
    """Run the tests as the module ``__main__`` (see code_runner); returns normally only if they passed."""
    code = compile(tests, TESTS_FILE, "exec")
    module = types.ModuleType("__main__")
    ns = module.__dict__
    ns.update(load(chan, solution, _names_used(code)))
    ns.update(__name__="__main__", __builtins__=builtins)
    sys.modules["__main__"], sys.argv = module, ["tests"]  # for the tests' own unittest.main()
    try:
        exec(code, ns)
    except SystemExit as e:  # the tests chose their verdict (unittest.main(), sys.exit)
        if e.code not in (None, 0):
            raise
        return
    ran = run_collected(ns, "__main__", names_loaded(code))
    if ran:
        sys.stderr.write(f"cispo: {ran} collected tests passed\n")


def run_tests():
    """The test process (see the module docstring); exits 0 after writing the pass line, else 1."""
    passed, chan = False, start_solution()
    try:
        _not_dumpable()  # before the pass line is in our memory
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if hasattr(sys, "set_int_max_str_digits"):
            sys.set_int_max_str_digits(0)
        read_only_paths()
        job = loads(sys.stdin.buffer.read().decode("utf-8"))  # to the end: nothing stays in the pipe
        pass_line, solution, tests = str(job["pass"]), str(job["solution"]), str(job["tests"])
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        _run(chan, tests, solution)
        if chan.broken:  # the tests caught SolutionGone themselves
            raise SolutionGone(chan.broken)
        passed = True
    except BaseException:
        sys.excepthook(*sys.exc_info())
    finally:
        chan.close()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            passed = False
    if passed:
        os.write(1, ("\n" + pass_line + "\n").encode())
    os._exit(0 if passed else 1)


if __name__ == "__main__":
    run_tests()
