"""The frozen reference policy of the reference-model KL (algorithm.kl_coef > 0, cispo/algo/kl.py).

What it is: the policy as RL started (after any warm start), frozen (requires_grad False, eval mode; the
models have no dropout, so the mode changes nothing), run by the same forward path as the policy
(packing, routing replay, the FP32 head, sequence parallelism) under no_grad. It exists only when
kl_coef > 0: no memory or time is spent otherwise.

Who holds it: the torch learner a deepcopy of the model it is given, at construction; every DeepSpeed rank
one of its own (RankReference): under ZeRO-2 a plain full copy on the rank's device, under ZeRO-3 a module
wrapped the way OpenRLHF wraps its reference (deepspeed.initialize with the stage-3 config and no
optimizer), so its parameters are partitioned over the ranks and gathered per forward. A policy built
inside zero.Init (zero_init) cannot be deep-copied: the reference is then built again by the same loader.

Resume: the reference is saved in every checkpoint (REFERENCE_FILE, safetensors) and loaded back with
the learner's state. Rebuilding it from the learner's source was rejected: on resume the driver skips the
warm start (cispo/driver/loop.py), so the torch learner is given the fresh initialisation, not the
step-0 policy; and a resume from another run directory's checkpoint writes that run's `policy_init/`
(what the DeepSpeed ranks load) from the fresh initialisation too. The checkpoint is the one place that
always has it, at the cost of one extra copy of the weights per checkpoint (less than the optimizer
state beside it). A checkpoint without the file (written with kl_coef 0) keeps the reference as built,
with a warning.
"""

from __future__ import annotations

import copy
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cispo.learner.hf_export import unique_tensors
from cispo.learner.rank_weights import RankWeights
from cispo.learner.sequence_parallel import enable_sequence_parallel

REFERENCE_FILE = "reference.safetensors"


def freeze(model: nn.Module) -> nn.Module:
    """`model` with no parameter requiring a gradient, in eval mode (for good: nothing trains it)."""
    for param in model.parameters():
        param.requires_grad_(False)
    return model.eval()


def frozen_copy(model: nn.Module) -> nn.Module:
    """A frozen deep copy of `model` (its own storage: the policy's updates never reach it)."""
    return freeze(copy.deepcopy(model))


def save_reference_state(state: Mapping[str, Tensor], directory: str | Path) -> None:
    """The reference's full state dict as `<directory>/reference.safetensors` (each shared tensor once)."""
    from safetensors.torch import save_file

    save_file(unique_tensors(state), str(Path(directory) / REFERENCE_FILE), metadata={"format": "pt"})


def load_reference(model: nn.Module, directory: str | Path) -> bool:
    """The checkpoint's reference weights into `model` (a plain module, or a ZeRO-3 partitioned one: every
    rank calls it, each parameter is gathered, written and re-partitioned from rank 0's copy), read one
    tensor at a time. False, with a warning, when the checkpoint has no reference (written with
    kl_coef 0): `model` stays as built."""
    from safetensors import safe_open

    path = Path(directory) / REFERENCE_FILE
    if not path.exists():
        print(
            f"warning: {path.parent} has no {REFERENCE_FILE} (written with algorithm.kl_coef 0): the KL "
            "reference is the policy this learner was built from, not the run's step-0 policy",
            file=sys.stderr,
            flush=True,
        )
        return False
    tensors = RankWeights(model, rank=0).tensors  # name -> parameter or buffer, state-dict order
    with safe_open(str(path), framework="pt") as weights:
        names = set(weights.keys())
        # A tied tensor is written once, under its first name: covered when any of its names is there.
        covered = {id(tensors[name]) for name in names if name in tensors}
        missing = sorted(name for name, t in tensors.items() if id(t) not in covered)
        unexpected = sorted(names - set(tensors))
        if unexpected or missing:
            raise RuntimeError(f"{path} does not fit the policy: missing {missing}, unexpected {unexpected}")
        with torch.no_grad():
            for name, tensor in tensors.items():
                if name in names:
                    _assign(tensor, weights.get_tensor(name))
    return True


def _assign(tensor: Tensor, value: Tensor) -> None:
    if not hasattr(tensor, "ds_id"):
        tensor.copy_(value.to(tensor.device, tensor.dtype))
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters([tensor], modifier_rank=0):
        tensor.data.copy_(value.to(tensor.device, tensor.dtype))


def reference_ds_config(train_config: Mapping[str, Any]) -> dict[str, Any]:
    """The policy's DeepSpeed config without what belongs to training (optimizer, scheduler, their
    offload): what deepspeed.initialize needs to partition and gather a module that never steps."""
    config = copy.deepcopy(dict(train_config))
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)
    config.get("zero_optimization", {}).pop("offload_optimizer", None)
    return config


class RankReference:
    """One DeepSpeed rank's reference: `policy` (the frozen model), `module` (its LogprobModule) and
    `forward` (what runs the module: the ZeRO-3 engine, or the module itself)."""

    def __init__(self, policy: nn.Module, module: nn.Module, forward: Callable[..., Any], rank: int) -> None:
        self.policy, self.module, self.forward, self.rank = policy, module, forward, rank

    @classmethod
    def build(
        cls,
        policy: nn.Module,
        wrap: Callable[[nn.Module], nn.Module],
        rebuild: Callable[[], nn.Module],
        *,
        rank: int,
        sp_size: int,
        ds_config: Mapping[str, Any],
    ) -> RankReference:
        """From the rank's policy before its own deepspeed.initialize. `wrap`: the policy's LogprobModule
        around a model; `rebuild`: the policy's loader, run again when the policy was built partitioned
        (zero.Init); `ds_config`: the policy's DeepSpeed config."""
        partitioned = any(hasattr(p, "ds_id") for p in policy.parameters())
        if partitioned:
            reference = freeze(rebuild())
            if sp_size > 1:
                enable_sequence_parallel(reference, sp_size)
        else:
            reference = frozen_copy(policy)  # a copy of the SP-enabled policy runs Ulysses attention too
        module = wrap(reference)
        if int(ds_config.get("zero_optimization", {}).get("stage", 0)) != 3:
            from deepspeed.accelerator import get_accelerator

            device = torch.device(get_accelerator().device_name(int(os.environ.get("LOCAL_RANK", "0"))))
            module.to(device)
            return cls(reference, module, module, rank)
        import deepspeed

        engine, *_ = deepspeed.initialize(model=module, config=reference_ds_config(ds_config))
        engine.eval()
        # The FP32 head reads the weight directly (see LogprobModule): gathered with the module's forward.
        deepspeed.zero.register_external_parameter(module, reference.get_output_embeddings().weight)
        return cls(reference, module, engine, rank)

    def save(self, directory: str) -> None:
        """Rank 0 writes the full reference into the checkpoint; every rank takes part in the gathers."""
        state = RankWeights(self.policy, self.rank).full_state()
        if state is not None:
            save_reference_state(state, directory)

    def load(self, directory: str) -> None:
        load_reference(self.policy, directory)
