"""A bounded pool: many programs at once, never more than ``max_concurrency`` running."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from sandboxes.base import Limits, RunResult, Sandbox


class SandboxPool:
    """Threads suffice: each run is a child process, so the GIL is not the bottleneck.

    ``run`` and ``map`` share one semaphore, so callers on several threads stay within the bound too.
    """

    def __init__(self, sandbox: Sandbox, max_concurrency: int = 4) -> None:
        if max_concurrency < 1:
            raise ValueError(f"SandboxPool: max_concurrency must be >= 1, got {max_concurrency}")
        self.sandbox = sandbox
        self.max_concurrency = max_concurrency
        self._slots = threading.BoundedSemaphore(max_concurrency)
        self._executor = ThreadPoolExecutor(max_concurrency, thread_name_prefix="sandbox")

    def run(
        self, source: str, *, stdin: str = "", timeout_s: float = 5.0, limits: Limits | None = None
    ) -> RunResult:
        with self._slots:
            return self.sandbox.run(source, stdin=stdin, timeout_s=timeout_s, limits=limits)

    def map(
        self,
        sources: Sequence[str],
        *,
        stdins: Sequence[str] | None = None,
        timeout_s: float = 5.0,
        limits: Limits | None = None,
    ) -> list[RunResult]:
        """Run every source (with the matching stdin) and return results in input order."""
        if stdins is not None and len(stdins) != len(sources):
            raise ValueError(f"SandboxPool.map: {len(sources)} sources but {len(stdins)} stdins")
        ins = list(stdins) if stdins is not None else [""] * len(sources)
        futures = [
            self._executor.submit(self.run, src, stdin=s, timeout_s=timeout_s, limits=limits)
            for src, s in zip(sources, ins)
        ]
        return [f.result() for f in futures]

    def close(self) -> None:
        self._executor.shutdown(wait=True)

    def __enter__(self) -> SandboxPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
