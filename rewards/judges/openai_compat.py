"""The ``openai`` judge backend: any OpenAI-compatible ``/v1/chat/completions`` endpoint, stdlib only.

A batch of prompts is answered from the cache where it can; the distinct remaining requests go out
``max_concurrency`` at a time (servers such as vLLM batch concurrent requests themselves). Each request has
its own ``timeout_s`` and is retried ``max_retries`` times, with exponential backoff, on a dropped or refused
connection, a timeout, HTTP 408/429 or a 5xx; another HTTP error or a malformed reply fails at once.
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPException
from typing import Any

from rewards.judges import JudgeError, JudgeTimeout
from rewards.judges.cache import JudgeCache, request_key

_RETRY_STATUS = {408, 429, 500, 502, 503, 504}
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}
MAX_BACKOFF_S = 30.0


class _Retryable(Exception):
    def __init__(self, error: Exception, timed_out: bool = False, wait_s: float = 0.0) -> None:
        super().__init__(str(error))
        self.error, self.timed_out, self.wait_s = error, timed_out, wait_s


def _is_timeout(e: BaseException) -> bool:
    return isinstance(e, TimeoutError) or (
        isinstance(e, urllib.error.URLError) and isinstance(e.reason, TimeoutError)
    )


class OpenAIJudge:
    """``base_url`` is the API root as the OpenAI SDK takes it (``http://127.0.0.1:8000/v1``); the key, if
    any, is read from the environment variable ``api_key_env`` (never from the config)."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str | None = None,
        timeout_s: float = 60.0,
        max_retries: int = 3,
        backoff_s: float = 1.0,
        max_concurrency: int = 8,
        max_tokens: int = 512,
        temperature: float = 0.0,
        system_prompt: str | None = None,
        extra_body: dict[str, Any] | None = None,
        cache_dir: str | None = None,
    ) -> None:
        parsed = urllib.parse.urlparse(base_url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"openai judge: base_url must be http(s)://host[:port]/v1, got {base_url!r}")
        if timeout_s <= 0 or max_retries < 0 or backoff_s < 0 or max_concurrency < 1 or max_tokens < 1:
            raise ValueError(
                "openai judge: need timeout_s > 0, max_retries >= 0, backoff_s >= 0, max_concurrency >= 1, "
                f"max_tokens >= 1; got {timeout_s}, {max_retries}, {backoff_s}, {max_concurrency}, "
                f"{max_tokens}"
            )
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.headers = {"Content-Type": "application/json"}
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise ValueError(f"openai judge: api_key_env={api_key_env!r} is not set in the environment")
            self.headers["Authorization"] = f"Bearer {key}"
        self.model, self.system_prompt, self.extra_body = model, system_prompt, dict(extra_body or {})
        self.timeout_s, self.max_retries, self.backoff_s = timeout_s, max_retries, backoff_s
        self.max_concurrency, self.max_tokens, self.temperature = max_concurrency, max_tokens, temperature
        # A judge on this host must not be sent through the environment's HTTP proxy.
        handlers = [urllib.request.ProxyHandler({})] if parsed.hostname in _LOOPBACK else []
        self._opener = urllib.request.build_opener(*handlers)
        self.cache = JudgeCache(cache_dir)
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def body(self, prompt: str) -> dict[str, Any]:
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        messages.append({"role": "user", "content": prompt})
        return {
            **self.extra_body,
            "model": self.model,
            "messages": messages,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {k: self._counts[k] for k in ("requests", "cache_hits", "retries", "timeouts", "errors")}

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def generate(self, prompts: list[str]) -> list[str | Exception]:
        bodies = [self.body(p) for p in prompts]
        keys = [request_key({"url": self.url, "body": b}) for b in bodies]
        found: dict[str, str | Exception] = {}
        for key in keys:
            if key not in found and (reply := self.cache.get(key)) is not None:
                found[key] = reply
        todo = {k: b for k, b in zip(keys, bodies) if k not in found}  # identical requests go out once
        self._count("cache_hits", len(keys) - len(todo))  # replies had without asking the server
        if todo:
            with ThreadPoolExecutor(min(self.max_concurrency, len(todo)), "judge-request") as pool:
                for key, reply in zip(todo, pool.map(self._request, todo.values())):
                    found[key] = reply
                    if isinstance(reply, str):
                        self.cache.put(key, reply)
        return [found[k] for k in keys]

    def _request(self, body: dict[str, Any]) -> str | Exception:
        """The reply to one request after its retries, or the exception that ended it."""
        last: _Retryable | None = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                self._count("retries")
                time.sleep(
                    max(last.wait_s if last else 0.0, min(self.backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S))
                )
            try:
                return self._post(body)
            except _Retryable as e:
                last = e
                self._count("timeouts" if e.timed_out else "failed_attempts")
            except JudgeError as e:
                self._count("errors")
                return e
        assert last is not None
        self._count("errors")
        tries = self.max_retries + 1
        if last.timed_out:
            return JudgeTimeout(f"openai judge: {self.url} timed out after {self.timeout_s}s, {tries} tries")
        return JudgeError(f"openai judge: {self.url} failed {tries} times; last: {last.error!r}")

    def _post(self, body: dict[str, Any]) -> str:
        self._count("requests")
        request = urllib.request.Request(self.url, json.dumps(body).encode(), self.headers, method="POST")
        try:
            with self._opener.open(request, timeout=self.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as e:
            detail = e.read()[:300].decode(errors="replace")
            if e.code in _RETRY_STATUS:
                retry_after = e.headers.get("Retry-After", "") if e.headers else ""
                wait = min(float(retry_after), MAX_BACKOFF_S) if retry_after.isdigit() else 0.0
                raise _Retryable(e, wait_s=wait) from e
            raise JudgeError(f"openai judge: {self.url} answered HTTP {e.code}: {detail}") from e
        except (urllib.error.URLError, OSError, HTTPException) as e:
            raise _Retryable(e, timed_out=_is_timeout(e)) from e
        return self._content(raw)

    def _content(self, raw: bytes) -> str:
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise JudgeError(f"openai judge: malformed reply from {self.url}: {raw[:200]!r}") from e
        if not isinstance(content, str):
            raise JudgeError(f"openai judge: reply from {self.url} has no text content: {raw[:200]!r}")
        return content
