"""An hf engine with a gate, named by dotted path in tests so Ray workers build it themselves.

generate() and load_weights() first record that this process got there (a file `started-<pid>` or
`loading-<pid>` in `gate_dir`), then, while `gate_dir/hold` (every worker) or `gate_dir/hold-<pid>` (this
worker) exists, wait before going on. A test can therefore kill or freeze a worker that is provably inside
generate() or a weight load, on a machine of any speed, and release the others afterwards.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

from cispo.core.types import Generation, SamplingParams
from rollout.hf_engine import HFEngine


class GatedHFEngine(HFEngine):
    def __init__(self, *, gate_dir: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.gate = Path(gate_dir)

    def _gate(self, arrived: str) -> None:
        pid = os.getpid()
        (self.gate / f"{arrived}-{pid}").touch()
        while (self.gate / "hold").exists() or (self.gate / f"hold-{pid}").exists():
            time.sleep(0.01)

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Generation]:
        self._gate("started")
        return super().generate(prompts, params)

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        self._gate("loading")
        super().load_weights(state_dict, version)
