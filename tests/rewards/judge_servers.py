"""A real local server for the judge tests: an OpenAI-compatible endpoint on 127.0.0.1 whose failures are
scripted (dropped connections, sleeps, HTTP errors, requests held until several arrive together)."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Script:
    """What the scripted server does: the first ``drop`` requests get their connection closed with no
    reply, the first ``fail`` after those an HTTP ``fail_status``; every request sleeps ``sleep_s`` first;
    ``barrier`` holds each request until that many are in flight together (a 500 if they never are)."""

    drop: int = 0
    fail: int = 0
    fail_status: int = 503
    sleep_s: float = 0.0
    sleep_when: Callable[[str], bool] = lambda prompt: True
    barrier: int = 0
    reply: Callable[[str], str] = lambda prompt: f"Judged {len(prompt)} chars.\nScore: 7"
    bodies: list[dict] = field(default_factory=list)
    headers: list[dict] = field(default_factory=list)


class ScriptedServer:
    def __init__(self, script: Script) -> None:
        self.script = script
        self.hits = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._barrier = threading.Barrier(script.barrier) if script.barrier else None
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                server.handle(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        body = json.loads(h.rfile.read(int(h.headers["Content-Length"])))
        with self._lock:
            self.hits += 1
            n = self.hits
            self.script.bodies.append(body)
            self.script.headers.append(dict(h.headers))
        s = self.script
        if n <= s.drop:
            h.connection.shutdown(socket.SHUT_RDWR)  # the client sees the connection drop, no status line
            h.close_connection = True
            return
        prompt = body["messages"][-1]["content"]
        if s.sleep_s and s.sleep_when(prompt):
            self._stop.wait(s.sleep_s)
        if self._barrier is not None:
            try:
                self._barrier.wait(timeout=30)  # a hang guard only: concurrent requests pass at once
            except threading.BrokenBarrierError:
                return self._send(h, 500, {"error": "requests did not arrive together"})
        if n <= s.drop + s.fail:
            return self._send(h, s.fail_status, {"error": "scripted failure"})
        self._send(
            h, 200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": s.reply(prompt)}}]}
        )

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        with contextlib.suppress(OSError):  # a client that timed out has gone
            h.wfile.write(data)

    def close(self) -> None:
        self._stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@contextlib.contextmanager
def scripted_server(**script: object) -> Iterator[ScriptedServer]:
    server = ScriptedServer(Script(**script))  # type: ignore[arg-type]
    try:
        yield server
    finally:
        server.close()
