"""DeepSpeed checkpoints read without running code.

DeepSpeed writes its checkpoints (`<checkpoint>/learner/*.pt`) with torch.save and reads them back with
`torch.load(weights_only=False)`, which unpickles any object a file names. Here every read goes through
`torch.load(weights_only=True)` instead, with only the few DeepSpeed classes its files hold on the
allowlist (the loss scaler, the ZeRO stage enum, ZeRO-2's fragment addresses): a file that names anything
else is refused, never executed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

TAG = "learner"  # the DeepSpeed tag every checkpoint directory holds its files under


def safe_globals() -> list[Any]:
    """The non-tensor classes DeepSpeed's own checkpoint files contain (found by
    torch.serialization.get_unsafe_globals_in_checkpoint on ZeRO-2 and ZeRO-3 checkpoints)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_load(path: Any, map_location: Any = None, **_: Any) -> Any:
    """torch.load with weights_only=True and DeepSpeed's data classes allowed: nothing else is unpickled."""
    with torch.serialization.safe_globals(safe_globals()):
        return torch.load(path, map_location=map_location, weights_only=True)


@contextlib.contextmanager
def safe_engine_loads(engine: Any) -> Iterator[None]:
    """engine.load_checkpoint reads every file through its checkpoint engine: swap in safe_load."""
    checkpoint_engine = engine.checkpoint_engine
    original = checkpoint_engine.load
    checkpoint_engine.load = lambda path, map_location=None: safe_load(path, map_location)
    try:
        yield
    finally:
        checkpoint_engine.load = original


class _SafeTorch:
    """torch, except that load is safe_load."""

    load = staticmethod(safe_load)

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


def zero_checkpoint_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights from a ZeRO-2/3 checkpoint directory, gathered in this process (no ranks), with
    DeepSpeed's reader held to safe_load. The ranks wrap the policy in a log-prob module whose attribute is
    `policy`; the names come back without that prefix."""
    from deepspeed.utils import zero_to_fp32

    real = zero_to_fp32.torch
    zero_to_fp32.torch = _SafeTorch()  # the module's own reference only: no global patch of torch.load
    try:
        state = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=TAG)
    finally:
        zero_to_fp32.torch = real
    return {name.removeprefix("policy."): tensor for name, tensor in state.items()}
