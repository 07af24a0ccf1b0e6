"""``cispo-serve``: a local HF model behind a minimal OpenAI-compatible HTTP API, decoded by the project's
own hf engine; a judge for ``reward=judge`` (the ``openai`` backend) without vLLM.

    cispo-serve --model path/to/hf_dir --port 8000          # or --model smollm2_gguf (the shipped GGUF)

Serves ``POST /v1/chat/completions`` (messages, max_tokens, temperature; 0 is greedy) and
``GET /v1/models``. Concurrent requests are batched: a batcher thread takes every request waiting (up to
``--max-batch-size``) into one engine call. It logs one line per request and per batch to stderr. It binds
127.0.0.1 unless told otherwise, and has no authentication: keep it on a trusted network.
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from rewards.judges.hf_local import HFChat, Messages

FINISH = {"eos": "stop", "length": "length", "repetition": "stop"}


@dataclass
class _Job:
    messages: Messages
    max_tokens: int
    temperature: float
    done: Future = field(default_factory=Future)


class BadRequest(ValueError):
    pass


def parse_request(body: Any, max_new_tokens: int) -> _Job:
    """The job a /v1/chat/completions body asks for; BadRequest naming the field that is wrong."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    messages = body.get("messages")
    ok = (
        isinstance(messages, list)
        and messages
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        )
    )
    if not ok:
        raise BadRequest("'messages' must be a non-empty list of {role, content} strings")
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens", max_new_tokens))
    temperature = body.get("temperature", 0.0)
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise BadRequest(f"'max_tokens' must be a positive integer, got {max_tokens!r}")
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise BadRequest(f"'temperature' must be a number >= 0, got {temperature!r}")
    if body.get("stream"):
        raise BadRequest("'stream' is not supported")
    return _Job(
        [{"role": m["role"], "content": m["content"]} for m in messages],
        min(max_tokens, max_new_tokens),
        float(temperature),
    )


class Batcher:
    """One thread feeding the engine: each round takes every job waiting (up to max_batch_size) and runs
    the ones with the same settings as one batch."""

    def __init__(self, chat: HFChat, max_batch_size: int, log: Any = sys.stderr) -> None:
        self.chat, self.max_batch_size, self.log = chat, max_batch_size, log
        self._queue: queue.Queue[_Job] = queue.Queue()
        threading.Thread(target=self._run, daemon=True, name="cispo-serve-batcher").start()

    def submit(self, job: _Job) -> _Job:
        self._queue.put(job)
        return job

    def _run(self) -> None:
        while True:
            jobs = [self._queue.get()]
            while len(jobs) < self.max_batch_size:
                try:
                    jobs.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            groups: dict[tuple[int, float], list[_Job]] = {}
            for job in jobs:
                groups.setdefault((job.max_tokens, job.temperature), []).append(job)
            for (max_tokens, temperature), group in groups.items():
                self._run_group(group, max_tokens, temperature)

    def _run_group(self, group: list[_Job], max_tokens: int, temperature: float) -> None:
        start = time.perf_counter()
        try:
            results = self.chat.complete([j.messages for j in group], max_tokens, temperature)
        except Exception as e:  # noqa: BLE001 - every request of the batch gets the error as a 500
            for job in group:
                job.done.set_exception(e)
            return
        print(
            f"cispo-serve: batch of {len(group)} in {time.perf_counter() - start:.2f}s",
            file=self.log,
            flush=True,
        )
        for job, result in zip(group, results):
            job.done.set_result(result)


def completion(model_name: str, result: tuple[str, str, int, int]) -> dict[str, Any]:
    text, reason, n_prompt, n_reply = result
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model_name,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": FINISH[reason]}
        ],
        "usage": {
            "prompt_tokens": n_prompt,
            "completion_tokens": n_reply,
            "total_tokens": n_prompt + n_reply,
        },
    }


def make_server(
    chat: HFChat,
    host: str,
    port: int,
    model_name: str,
    max_batch_size: int,
    max_new_tokens: int,
    log: Any = sys.stderr,
) -> ThreadingHTTPServer:
    batcher = Batcher(chat, max_batch_size, log)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass  # one line per request below, not http.server's

        def _send(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path.rstrip("/") != "/v1/models":
                return self._send(404, {"error": {"message": f"no route {self.path}"}})
            self._send(200, {"object": "list", "data": [{"id": model_name, "object": "model"}]})

        def do_POST(self) -> None:  # noqa: N802
            if self.path.rstrip("/") != "/v1/chat/completions":
                return self._send(404, {"error": {"message": f"no route {self.path}"}})
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                job = batcher.submit(parse_request(body, max_new_tokens))
            except (ValueError, BadRequest) as e:
                return self._send(400, {"error": {"message": str(e), "type": "invalid_request_error"}})
            try:
                result = job.done.result()
            except Exception as e:  # noqa: BLE001 - the engine's failure, reported to the client
                return self._send(500, {"error": {"message": repr(e)}})
            print(f"cispo-serve: request {result[3]} tokens", file=log, flush=True)
            self._send(200, completion(model_name, result))

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="cispo-serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="an HF model directory, or smollm2_gguf (the shipped GGUF)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", default=None, help="the name /v1/models reports (default: --model)")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=512, help="the cap on a request's max_tokens")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--num-threads", type=int, default=None)
    args = p.parse_args(argv)
    model = args.model
    if model == "smollm2_gguf":
        from cispo.driver.policy import smollm2_dir

        model = str(smollm2_dir())
    chat = HFChat(
        model,
        tokenizer_path=args.tokenizer,
        dtype=args.dtype,
        device=args.device,
        max_batch_size=args.max_batch_size,
        num_threads=args.num_threads,
    )
    chat.load()  # before listening: a client that sees the port open gets answers, not a load wait
    server = make_server(
        chat, args.host, args.port, args.model_name or args.model, args.max_batch_size, args.max_new_tokens
    )
    print(
        f"cispo-serve: {args.model} on http://{args.host}:{server.server_address[1]}/v1",
        file=sys.stderr,
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
