"""An hf engine with a gate, named by dotted path in tests so Ray workers build it themselves.

generate() first records that this process started decoding (a file named by its pid in `gate_dir`),
then, while `gate_dir/hold` exists, waits before decoding. A test can therefore kill a worker that is
provably inside generate(), on a machine of any speed, and release the others afterwards.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from cispo.core.types import Generation, SamplingParams
from rollout.hf_engine import HFEngine


class GatedHFEngine(HFEngine):
    def __init__(self, *, gate_dir: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.gate = Path(gate_dir)

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Generation]:
        (self.gate / f"started-{os.getpid()}").touch()
        while (self.gate / "hold").exists():
            time.sleep(0.01)
        return super().generate(prompts, params)
