"""The wire format between the code reward's test process and solution process (``rewards.code_harness``).

Both ends run in the sandbox, on its interpreter: standard library only, Python 3.9 or newer. The sandbox
gets this file, ``code_runner.py``, ``code_solution.py`` and ``code_harness.py`` as one program
(``rewards.code.harness_source``); lines marked ``# scorer only`` are left out of it.

Test process -> solution process: length-prefixed marshal frames (the solution process trusts the tests).
Solution process -> test process: one line of strict JSON per message, read by json's C scanner and rebuilt
as built-in values only (:func:`decode`): what the solution sends can never be an object of its choosing.
Values are scalars, tagged containers, ``["h", id]`` (an object that stays in the solution process) or
``["t", id]`` (a callable of the tests that the solution may call back).
"""

import builtins
import marshal
import os

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


def read_frame(fd):
    """The next frame's message, or None at EOF."""
    size = _read_exactly(fd, 8)
    msg = _read_exactly(fd, int.from_bytes(size, "big")) if size else None
    return None if msg is None else marshal.loads(msg)


def encode(value, handle, depth=0):
    """JSON-ready form of ``value``: scalars as themselves, containers tagged, anything else ``handle(obj)``
    (its ``["h", id]`` or ``["t", id]`` form; it raises TypeError for an object that may not cross)."""
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
    return handle(value)


def _no_callables(ident):
    raise ValueError("no callable of the tests is expected here")


def decode(data, remote, local=_no_callables, depth=0):
    """Built-in values rebuilt from :func:`encode`'s form, ``["h", id]`` through ``remote(id)`` and
    ``["t", id]`` through ``local(id)``; anything else raises ValueError."""
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
        return _SEQ[tag](decode(v, remote, local, depth + 1) for v in body)
    elif tag == "d" and type(body) is list:
        if not all(type(p) is list and len(p) == 2 for p in body):
            raise ValueError("not a dict")
        return {decode(k, remote, local, depth + 1): decode(v, remote, local, depth + 1) for k, v in body}
    elif tag == "b" and type(body) is str:
        return bytes.fromhex(body)
    elif tag == "h" and type(body) is int:
        return remote(body)
    elif tag == "t" and type(body) is int:
        return local(body)
    raise ValueError("not a value")


def _rebuilt(names, message, op):
    """The exception the other side raised, as the first built-in Exception class in its MRO. StopIteration
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


def error_reply(e, tag="err"):
    """``[tag, [class names of its MRO], message]`` for an exception."""
    try:
        message = str(e)[:2000]
    except BaseException:
        message = ""
    return [tag, [c.__name__ for c in type(e).__mro__], message]
