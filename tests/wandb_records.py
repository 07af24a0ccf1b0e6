"""Reads an offline W&B run's `.wandb` file back (W&B ships no Python reader of its own).

The file is a LevelDB-style record log: a 7-byte header, then 32 KiB blocks of chunks, each a 4-byte CRC,
a 2-byte length and a 1-byte type (1 full, 2 first, 3 middle, 4 last); a block's tail shorter than a chunk
header is padding. Each reassembled record is a `wandb_internal_pb2.Record`.
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BLOCK, HEADER, CHUNK = 32768, 7, 7


def read_records(path: Path) -> list[Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, records, pending = path.read_bytes(), HEADER, [], b""
    while pos + CHUNK <= len(data):
        left = BLOCK - pos % BLOCK
        if left < CHUNK:  # padding at a block's end
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + CHUNK])
        if kind == 0:  # zero-filled rest of a block
            pos += left
            continue
        if pos + CHUNK + length > len(data):  # a chunk still being written (or cut short by a kill)
            break
        chunk, pos = data[pos + CHUNK : pos + CHUNK + length], pos + CHUNK + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _key(item: Any) -> str:
    return "/".join(item.nested_key) if item.nested_key else item.key


@dataclass
class OfflineRun:
    run_id: str
    group: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)  # history rows, in order
    summary: dict[str, Any] = field(default_factory=dict)  # the summary updates, last value wins
    metrics: dict[str, str] = field(default_factory=dict)  # define_metric: name -> step metric ("" none)
    artifacts: list[Any] = field(default_factory=list)

    @property
    def steps(self) -> list[int]:
        return [row["_step"] for row in self.rows]


def read_run(path: Path) -> OfflineRun:
    run = OfflineRun("")
    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.run_id, run.group = record.run.run_id, record.run.run_group
            run.config.update({_key(i): json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            run.config.update({_key(i): json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            run.rows.append({_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            run.summary.update({_key(i): json.loads(i.value_json) for i in record.summary.update})
        elif kind == "metric" and record.metric.name:
            run.metrics[record.metric.name] = record.metric.step_metric
        elif kind == "artifact":
            run.artifacts.append(record.artifact)
    return run


def offline_runs(wandb_dir: Path, finished: bool = True, wait_s: float = 60.0) -> list[OfflineRun]:
    """Every offline run under <dir>/wandb, oldest first (the directory names start with the time).
    `finished`: each run's file must end with its exit record; W&B's service process writes the file,
    and may still be writing when finish() has returned, so this waits for it (wait_s: a hang guard)."""
    files = [next(d.glob("*.wandb")) for d in sorted(wandb_dir.glob("offline-run-*"))]
    deadline = time.monotonic() + wait_s
    for path in files if finished else []:
        while not any(r.WhichOneof("record_type") == "exit" for r in read_records(path)):
            assert time.monotonic() < deadline, f"{path} has no exit record"
            time.sleep(0.1)
    return [read_run(path) for path in files]
