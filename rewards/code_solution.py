"""The code reward's solution process (part of the sandbox program; see ``rewards.code_harness``).

It runs the solution as a module named ``solution`` (never ``__main__``, so an ``if __name__ ==
"__main__":`` block does not run), answers the test process's requests about the names and objects the
solution made, and calls back into the test process when the solution calls a callable the tests passed.
Its own stdio is /dev/null; fd 0/1 of :func:`serve` are the pipes to the test process.
"""

import builtins
import os
import sys

from rewards.code_protocol import (
    _rebuilt,
    decode,
    dumps,
    encode,
    error_reply,
    read_frame,
)

SOLUTION_MODULE = "solution"
_MUTABLE = (list, dict, set)  # arguments whose changes go back to the test process after a call
_UNARY = {"iter": iter, "next": next, "len": len, "bool": bool, "repr": repr, "str": str}


class TestCallable:
    """A callable of the tests, held here as its id: calling it runs it in the test process."""

    __slots__ = ("_server", "_tid")

    def __init__(self, server, tid):
        self._server, self._tid = server, tid

    def __call__(self, *args, **kwargs):
        return self._server.callback(self._tid, args, kwargs)

    def __repr__(self):
        return f"<callable of the tests #{self._tid}>"


class Server:
    """Requests on ``rfd``, replies (and callbacks) on ``wfd``, one JSON line each."""

    def __init__(self, rfd, wfd):
        self.rfd, self.wfd = rfd, wfd
        self.objects, self.ids = {}, {}
        module = type(sys)(SOLUTION_MODULE)
        module.__builtins__ = builtins
        sys.modules[SOLUTION_MODULE] = module  # dataclasses, pickle and typing look classes up here
        self.ns = module.__dict__

    def handle(self, obj):
        if isinstance(obj, TestCallable):
            return ["t", obj._tid]
        if id(obj) not in self.ids:
            self.ids[id(obj)] = len(self.objects)
            self.objects[len(self.objects)] = obj
        return ["h", self.ids[id(obj)]]

    def enc(self, value):
        return encode(value, self.handle)

    def dec(self, data):
        return decode(data, self.objects.__getitem__, lambda tid: TestCallable(self, tid))

    def write(self, msg):
        data = (dumps(msg) + "\n").encode("ascii")
        while data:
            data = data[os.write(self.wfd, data) :]

    def forever(self):
        while True:
            msg = read_frame(self.rfd)
            if msg is None:
                return
            self.write(self.answer(msg))

    def answer(self, msg):
        try:
            return self.serve_one(msg[0], msg[1:])
        except BaseException as e:  # the tests decide what the solution's exception means
            return error_reply(e)

    def callback(self, tid, args, kwargs):
        """Ask the test process to call its callable ``tid``; serve its requests until the result comes."""
        self.write(["cb", tid, self.enc(list(args)), self.enc(kwargs)])
        while True:
            msg = read_frame(self.rfd)
            if msg is None:
                os._exit(1)
            if msg[0] == "cbok":
                return self.dec(msg[1])
            if msg[0] == "cberr":
                raise _rebuilt(msg[1], msg[2], "call")
            self.write(self.answer(msg))

    def load(self, source, wanted):
        try:
            exec(compile(source, "<solution>", "exec"), self.ns)
        except SystemExit as e:  # sys.exit(0) after the definitions: what was defined stands
            if e.code not in (None, 0):
                raise
        found = []
        for name in wanted:
            if name in self.ns and not name.startswith("__"):
                value = self.ns[name]
                if type(value) is type(sys):
                    found.append([name, "m", value.__name__])
                else:
                    found.append([name, "v", self.enc(value)])
        return ["names", found]

    def serve_one(self, op, args):
        if op == "load":
            return self.load(args[0], args[1])
        target = self.objects[args[0]]
        if op == "call":
            pos, kw = self.dec(args[1]), self.dec(args[2])
            result = target(*pos, **kw)
            sent = {**dict(enumerate(args[1][1])), **dict(args[2][1])}
            now = [[k, self.enc(v)] for k, v in [*enumerate(pos), *kw.items()] if isinstance(v, _MUTABLE)]
            return ["ok", self.enc(result), [kv for kv in now if kv[1] != sent[kv[0]]]]
        if op == "getitem":
            result = target[self.dec(args[1])]
        elif op == "getattr":
            result = getattr(target, args[1])
        elif op == "isinstance":
            result = isinstance(self.dec(args[1]), target)
        elif op == "issubclass":
            result = issubclass(self.dec(args[1]), target)
        elif op == "fields":
            result = self.fields(target)
        else:
            result = _UNARY[op](target)
        return ["ok", self.enc(result)]

    def fields(self, obj):
        """``[its class, [[name, value], ...]]`` of a dataclass instance that compares by fields, else None:
        the test process compares two of them itself."""
        dc = sys.modules.get("dataclasses")
        params = getattr(type(obj), "__dataclass_params__", None)
        if dc is None or isinstance(obj, type) or not dc.is_dataclass(obj) or not getattr(params, "eq", 0):
            return None
        return [type(obj), [[f.name, getattr(obj, f.name)] for f in dc.fields(obj) if f.compare]]


def serve():
    """The solution process: requests on fd 0, replies on fd 1; the solution's own stdio is /dev/null."""
    rfd, wfd = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    if hasattr(sys, "set_int_max_str_digits"):
        sys.set_int_max_str_digits(0)
    Server(rfd, wfd).forever()
