"""Shared output of the benchmark scripts: the table on stdout, the JSON result, and the table beside it as
Markdown."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_report(out: str | Path, result: Any, table: str) -> None:
    print(table)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(table.rstrip("\n") + "\n")
