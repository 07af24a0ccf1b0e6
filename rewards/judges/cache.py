"""The judge reply cache: one entry per full request (endpoint or model, sampling settings, messages).

Judging is deterministic (temperature 0 / greedy), so the same request always gets the same reply; the
same completion is often judged again (a repeated sample in a group, a re-scored batch after a restart).
In memory (least recently used entries dropped past ``max_entries``) and, with ``cache_dir``, one JSON file
per entry, written atomically, so several processes can share the directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any


def request_key(request: dict[str, Any]) -> str:
    """A stable hash of a JSON-serialisable request."""
    blob = json.dumps(request, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


class JudgeCache:
    def __init__(self, cache_dir: str | os.PathLike | None = None, max_entries: int = 100_000) -> None:
        if max_entries < 1:
            raise ValueError(f"judge cache: max_entries must be >= 1, got {max_entries}")
        self.dir = Path(cache_dir) if cache_dir else None
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
        self.max_entries = max_entries
        self._memory: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> str | None:
        with self._lock:
            if key in self._memory:
                self._memory.move_to_end(key)
                return self._memory[key]
        if self.dir is None:
            return None
        try:
            reply = json.loads((self.dir / f"{key}.json").read_text())["reply"]
        except (OSError, ValueError, KeyError, TypeError):
            return None  # absent, or a damaged file: ask the judge again (and overwrite it)
        self._remember(key, reply)
        return reply

    def put(self, key: str, reply: str) -> None:
        self._remember(key, reply)
        if self.dir is None:
            return
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".tmp-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump({"reply": reply}, f)
        os.replace(tmp, self.dir / f"{key}.json")

    def _remember(self, key: str, reply: str) -> None:
        with self._lock:
            self._memory[key] = reply
            self._memory.move_to_end(key)
            while len(self._memory) > self.max_entries:
                self._memory.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            return len(self._memory)
