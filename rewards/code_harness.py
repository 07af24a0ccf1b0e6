"""The program the ``code`` reward runs in the sandbox: a test process, and the solution in a process apart.

Run as the sandbox's main program this file is the *test process*. It forks the *solution process* (which runs
nothing but this file until it is sent the solution), makes itself non-dumpable, reads the job (the pass line,
the solution, the tests) from stdin to its end, and sends the solution over. The tests run in the test
process. Each name they use that the solution defines is, there, a module the test process imports itself, a
plain value, or a :class:`Remote` whose calls go to the solution process and come back as plain data (None,
bool, int, float, complex, str, bytes and lists, tuples, sets, frozensets and dicts of those; list, dict and
set arguments the call changed are changed in place) or as a handle to an object that stays in the solution
process. Only when the tests return normally and the solution process never died, exited or broke the protocol
does the test process write the pass line.

How this closes each forgery class (F1-F6) is in the threat model in ``sandboxes``. This file runs on the
sandbox's interpreter: standard library only, Python 3.9 or newer.
"""

import builtins
import marshal
import os
import select
import sys

try:  # json's C scanner and quoting without ``import json`` (which costs ``re``: ~10 ms per process)
    from _json import encode_basestring_ascii as _quote
    from _json import make_scanner as _make_scanner
except ImportError:  # pragma: no cover - CPython always has _json
    from json.encoder import encode_basestring_ascii as _quote
    from json.scanner import make_scanner as _make_scanner

PASS_PREFIX = "CISPO-TESTS-PASSED-"
MAX_REPLY = 64 << 20  # bytes of one reply from the solution process
MAX_DEPTH = 100  # nesting of one value
_SEQ = {"l": list, "t": tuple, "s": set, "f": frozenset}
_EXITS = ("SystemExit", "KeyboardInterrupt", "GeneratorExit")
_NOT_IMPORTED = ("__main__", "antigravity", "this")
_MUTABLE = (list, dict, set)  # arguments whose changes come back from a call
_INF = float("inf")


class _Strict:
    """Settings for json's scanner: no hooks; JSON objects come back as dicts, which decode() refuses."""

    strict = True
    object_hook = object_pairs_hook = None
    parse_float, parse_int = float, int
    parse_constant = {"NaN": _INF - _INF, "Infinity": _INF, "-Infinity": -_INF}.__getitem__
    memo: dict = {}


_SCAN = _make_scanner(_Strict())


def loads(text):
    """Exactly one JSON value (any malformed text raises an Exception)."""
    value, end = _SCAN(text, 0)
    if end != len(text):
        raise ValueError("data after the JSON value")
    return value


def dumps(value):
    """JSON text of encode()'s form: None, bool, int, float, str and lists of those; one ASCII line."""
    if value is None or value is True or value is False:
        return "null" if value is None else "true" if value else "false"
    kind = type(value)
    if kind is str:
        return _quote(value)
    if kind is int:
        return int.__repr__(value)
    if kind is float:
        if value != value or value in (_INF, -_INF):
            return "NaN" if value != value else "Infinity" if value > 0 else "-Infinity"
        return float.__repr__(value)
    if kind is list:
        return "[" + ",".join([dumps(v) for v in value]) + "]"
    raise TypeError(f"cannot send a {kind.__name__}")


def send_frame(fd, msg):
    """Test process -> solution process: a length-prefixed marshal frame (the receiver trusts the sender)."""
    data = marshal.dumps(msg)
    data = len(data).to_bytes(8, "big") + data
    while data:
        data = data[os.write(fd, data) :]


def _read_exactly(fd, n):
    data = b""
    while len(data) < n:
        chunk = os.read(fd, n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def encode(value, handle, depth=0):
    """JSON-ready form of ``value``: scalars as themselves, containers tagged, anything else ``["h", id]``.

    ``handle(obj)`` gives the id of an object that does not cross (or raises TypeError).
    """
    if depth > MAX_DEPTH:
        raise ValueError("value nested too deeply")
    if value is None or type(value) in (bool, int, float, str):
        return value
    for kind in (int, float, str):
        if isinstance(value, kind):
            return kind(value)
    if isinstance(value, (bytes, bytearray)):
        return ["b", bytes(value).hex()]
    if isinstance(value, complex):
        return ["c", value.real, value.imag]
    if isinstance(value, dict):
        return ["d", [[encode(k, handle, depth + 1), encode(v, handle, depth + 1)] for k, v in value.items()]]
    for tag, kind in _SEQ.items():
        if isinstance(value, kind):
            return [tag, [encode(v, handle, depth + 1) for v in value]]
    if type(value).__module__ == "numpy" and hasattr(value, "tolist"):
        return encode(value.tolist(), handle, depth + 1)
    return ["h", handle(value)]


def decode(data, remote, depth=0):
    """Built-in values rebuilt from :func:`encode`'s form, handles through ``remote(id)``; else ValueError."""
    if depth > MAX_DEPTH:
        raise ValueError("value nested too deeply")
    if data is None or type(data) in (bool, int, float, str):
        return data
    if type(data) is not list or len(data) not in (2, 3) or type(data[0]) is not str:
        raise ValueError("not a value")
    tag, body = data[0], data[1]
    if len(data) == 3:
        if tag == "c" and all(type(x) in (int, float) for x in data[1:]):
            return complex(data[1], data[2])
    elif tag in _SEQ and type(body) is list:
        return _SEQ[tag](decode(v, remote, depth + 1) for v in body)
    elif tag == "d" and type(body) is list:
        if not all(type(p) is list and len(p) == 2 for p in body):
            raise ValueError("not a dict")
        return {decode(k, remote, depth + 1): decode(v, remote, depth + 1) for k, v in body}
    elif tag == "b" and type(body) is str:
        return bytes.fromhex(body)
    elif tag == "h" and type(body) is int:
        return remote(body)
    raise ValueError("not a value")


class SolutionGone(BaseException):
    """The solution process died, exited or broke the protocol; a BaseException so that no test's
    ``except Exception`` swallows it (the run fails at the end anyway)."""


def _rebuilt(names, message, op):
    """The exception the solution raised, as the first built-in Exception class in its MRO. StopIteration
    only ends an iteration (``next``): from a call it would silently end a ``map()`` the tests consume."""
    for name in names:
        if name in ("StopIteration", "StopAsyncIteration") and op != "next":
            return RuntimeError(f"the solution raised {name} outside next()")
        cls = getattr(builtins, name, None) if type(name) is str else None
        if isinstance(cls, type) and issubclass(cls, Exception):
            try:
                return cls(message)
            except Exception:  # e.g. UnicodeDecodeError wants five arguments
                continue
    return RuntimeError(message)


class Channel:
    """The test process's end of the pipes to the solution process; one request, one reply."""

    def __init__(self, pid, wfd, rfd):
        self.pid, self.wfd, self.rfd = pid, wfd, rfd
        try:  # readable once the solution process ends, even if a child of it holds the pipe
            self.pidfd = os.pidfd_open(pid)
        except (AttributeError, OSError):  # Python < 3.9, Linux < 5.3, or a seccomp filter: EOF only
            self.pidfd = None
        self.buf = bytearray()
        self.broken = ""

    def fail(self, why):
        self.broken = self.broken or why
        raise SolutionGone(self.broken)

    def encode(self, value):
        return encode(value, self._handle)

    def _handle(self, obj):
        if isinstance(obj, Remote) and object.__getattribute__(obj, "_chan") is self:
            return object.__getattribute__(obj, "_id")
        raise TypeError(f"the tests passed a {type(obj).__name__} to the solution; only plain data crosses")

    def remote(self, ident):
        return Remote(self, ident)

    def request(self, msg):
        """Send ``msg``, return the reply's JSON; any failure of the solution process is SolutionGone."""
        if self.broken:
            raise SolutionGone(self.broken)
        try:
            send_frame(self.wfd, msg)
            line = self._line()
        except OSError as e:
            self.fail(f"the solution process is gone ({type(e).__name__})")
        try:
            return loads(line.decode("ascii"))
        except Exception as e:  # the scanner raises StopIteration, ValueError, RecursionError, ...
            self.fail(f"the solution process broke the protocol ({type(e).__name__})")

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
        try:
            value = decode(value, self.remote)
        except Exception:
            self.fail("the solution process sent a value that is not plain data")
        if isinstance(target, list) and type(value) is list:
            target[:] = value
        elif isinstance(target, (dict, set)) and type(value) is type(target).__mro__[-2]:
            target.clear()
            target.update(value)

    def answer(self, reply, op):
        """The value in an ``ok`` reply; the solution's exception, rebuilt, for an ``err`` reply."""
        if type(reply) is list and len(reply) == 2 and reply[0] == "ok":
            try:
                return decode(reply[1], self.remote)
            except Exception as e:
                self.fail(f"the solution process sent a value that is not plain data ({e})")
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
    """An object that stays in the solution process. It equals only itself; calls, attributes, iteration,
    len, bool, indexing, repr and str are asked of the solution process and come back as plain data."""

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
        return isinstance(other, Remote) and (other._chan, other._id) == (self._chan, self._id)

    def __ne__(self, other):
        return not self.__eq__(other)

    def __hash__(self):
        return hash(("cispo-remote", self._id))


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


def _names_used(code):
    """Global names the tests' code (and every function in it) loads."""
    names = set(code.co_names)
    for const in code.co_consts:
        if hasattr(const, "co_names"):
            names |= _names_used(const)
    return names


def start_solution():
    """Fork the solution process before the job is read, so its copy of our memory holds no pass line and
    no tests. Until the ``load`` request it runs only this file; its fd 0/1 are our pipes, 2 is null."""
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
    """Run the solution there; the tests' namespace: stdlib modules imported here, values, Remotes."""
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
        if kind == "m" and type(payload) is str and payload.split(".")[0] not in _NOT_IMPORTED:
            try:
                ns[name] = importlib.import_module(payload)
            except Exception:
                pass  # the tests get a NameError if they use it
        elif kind == "v":
            try:
                ns[name] = decode(payload, chan.remote)
            except Exception:
                chan.fail("the solution process sent a value that is not plain data")
        else:
            chan.fail("the solution process sent a reply that is not the protocol")
    ns.update(__name__="__main__", __builtins__=builtins)
    return ns


def run_tests():
    """The test process (see the module docstring); exits 0 after writing the pass line, else 1."""
    passed, chan = False, start_solution()
    try:
        _not_dumpable()  # before the pass line is in our memory
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if hasattr(sys, "set_int_max_str_digits"):
            sys.set_int_max_str_digits(0)
        tmp = os.environ.get("TMPDIR", "/tmp")
        sys.path[:] = [p for p in sys.path if p and not p.startswith((os.getcwd(), tmp))]  # writable dirs
        job = loads(sys.stdin.buffer.read().decode("utf-8"))  # to the end: nothing stays in the pipe
        pass_line, solution, tests = str(job["pass"]), str(job["solution"]), str(job["tests"])
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        code = compile(tests, "<tests>", "exec")
        exec(code, load(chan, solution, _names_used(code)))
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


# ------------------------------------------------------------------------------------------- the solution


def _serve_one(msg, objects, ns, handle):
    op, args = msg[0], msg[1:]
    if op == "load":
        exec(compile(args[0], "<solution>", "exec"), ns)
        found = []
        for name in args[1]:
            if name in ns and not name.startswith("__"):
                value = ns[name]
                if type(value) is type(sys):
                    found.append([name, "m", value.__name__])
                else:
                    found.append([name, "v", encode(value, handle)])
        return ["names", found]
    target = objects[args[0]]
    if op == "call":
        pos, kw = decode(args[1], objects.__getitem__), decode(args[2], objects.__getitem__)
        result = target(*pos, **kw)
        sent = {**dict(enumerate(args[1][1])), **dict(args[2][1])}
        now = [[k, encode(v, handle)] for k, v in [*enumerate(pos), *kw.items()] if isinstance(v, _MUTABLE)]
        return ["ok", encode(result, handle), [kv for kv in now if kv[1] != sent[kv[0]]]]
    if op == "getitem":
        result = target[decode(args[1], objects.__getitem__)]
    elif op == "getattr":
        result = getattr(target, args[1])
    else:
        result = {"iter": iter, "next": next, "len": len, "bool": bool, "repr": repr, "str": str}[op](target)
    return ["ok", encode(result, handle)]


def _error_reply(e):
    try:
        message = str(e)[:2000]
    except BaseException:
        message = ""
    return ["err", [c.__name__ for c in type(e).__mro__], message]


def serve():
    """The solution process: requests on fd 0, replies on fd 1; the solution's own stdio is /dev/null."""
    rfd, wfd = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    if hasattr(sys, "set_int_max_str_digits"):
        sys.set_int_max_str_digits(0)
    objects, ids = {}, {}

    def handle(obj):
        if id(obj) not in ids:
            ids[id(obj)] = len(objects)
            objects[len(objects)] = obj
        return ids[id(obj)]

    ns = {"__name__": "__main__", "__builtins__": builtins}
    while True:
        size = _read_exactly(rfd, 8)
        msg = _read_exactly(rfd, int.from_bytes(size, "big")) if size else None
        if msg is None:
            return
        try:
            reply = dumps(_serve_one(marshal.loads(msg), objects, ns, handle))
        except BaseException as e:  # the tests decide what the solution's exception means
            reply = dumps(_error_reply(e))
        data = (reply + "\n").encode("ascii")
        while data:
            data = data[os.write(wfd, data) :]


if __name__ == "__main__":
    run_tests()
