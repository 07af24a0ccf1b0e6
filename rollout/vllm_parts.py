"""The pieces of the vLLM engine that need no vLLM: checkpoint names, the wire format of weights, the FP32
LM head installed on a vLLM model tree, and the routing layout (rollout/vllm_engine.py uses them; they are
unit-tested on CPU with fakes of vLLM's modules)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

from cispo.core.moe import NO_CHOICE
from cispo.core.weight_channel import BUCKET_BYTES, TensorMeta, plan_buckets, state_dict_metas
from cispo.models.minimax_layout import NATIVE_MODEL_TYPE, REMOTE_MODEL_TYPES, derived_buffer

_WRAPPERS = ("module.", "_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
# transformers' "mixtral" conversion family: checkpoints say block_sparse_moe.experts.E.w1/w3/w2.
_MIXTRAL_STYLE = frozenset({"mixtral", "minimax", "minimax_text_01", "minimax_m1"})


def _strip_wrappers(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPERS:
            if name.startswith(prefix):
                name, changed = name[len(prefix) :], True
            if f".{prefix}" in name:
                name, changed = name.replace(f".{prefix}", "."), True
    return name


def checkpoint_names(
    pairs: Iterable[tuple[str, torch.Tensor]], *, tied: bool = False, model_type: str = ""
) -> Iterator[tuple[str, torch.Tensor]]:
    """The learner's (transformers in-memory) names and tensors as a Hugging Face checkpoint has them,
    which is what vLLM's `load_weights` takes: wrapper prefixes dropped, fused MoE experts split per expert
    (views, no copies), Mixtral-style `mlp` back to `block_sparse_moe`, a tied lm_head left out (the
    embedding carries it), and MiniMax's derived lightning buffers left out (vLLM has no parameter of
    their names; cispo/models/minimax_layout.py)."""
    mixtral = model_type in _MIXTRAL_STYLE
    minimax = model_type in (NATIVE_MODEL_TYPE, *REMOTE_MODEL_TYPES)
    gate, up, down = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
    for raw, tensor in pairs:
        name = _strip_wrappers(raw)
        if (tied and name == "lm_head.weight") or (minimax and derived_buffer(name)):
            continue
        if mixtral:
            name = name.replace(".mlp.", ".block_sparse_moe.")
        if name.endswith(".experts.gate_up_proj") and tensor.dim() == 3:
            base, half = name[: -len("gate_up_proj")], tensor.shape[1] // 2
            for e in range(tensor.shape[0]):
                yield f"{base}{e}.{gate}.weight", tensor[e, :half]
                yield f"{base}{e}.{up}.weight", tensor[e, half:]
        elif name.endswith(".experts.down_proj") and tensor.dim() == 3:
            base = name[: -len("down_proj")]
            for e in range(tensor.shape[0]):
                yield f"{base}{e}.{down}.weight", tensor[e]
        else:
            yield name, tensor


# ---------------------------------------------------------------------------------------- the wire format


def metas_to_wire(metas: list[TensorMeta]) -> list[tuple[str, list[int], str]]:
    """TensorMeta as msgpack-safe values (vLLM's RPC cannot carry torch.dtype)."""
    return [(m.name, list(m.shape), str(m.dtype).removeprefix("torch.")) for m in metas]


def metas_from_wire(wire: Iterable[Any]) -> list[TensorMeta]:
    out = []
    for name, shape, dtype in wire:
        torch_dtype = getattr(torch, str(dtype), None)
        if not isinstance(torch_dtype, torch.dtype):
            raise ValueError(f"vllm engine: unknown dtype {dtype!r} for {name}")
        out.append(TensorMeta(str(name), tuple(int(s) for s in shape), torch_dtype))
    return out


def pack_weights(weights: dict[str, torch.Tensor]) -> bytes:
    """A safetensors blob of `weights` (CPU, contiguous; tensors sharing storage are copied apart)."""
    from safetensors.torch import save

    seen: set[int] = set()
    flat: dict[str, torch.Tensor] = {}
    for name, tensor in weights.items():
        t = tensor.detach().to("cpu").contiguous()
        if t.untyped_storage().data_ptr() in seen:  # a tied tensor: safetensors refuses shared storage
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        flat[name] = t
    return save(flat)


def unpack_weights(blob: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(bytes(blob))


def packed_buckets(state_dict: dict[str, torch.Tensor], bucket_bytes: int = BUCKET_BYTES) -> Iterator[bytes]:
    """The state dict as safetensors blobs of about bucket_bytes each (the weight channel's bucket plan)."""
    for bucket in plan_buckets(state_dict_metas(state_dict), bucket_bytes):
        yield pack_weights({m.name: state_dict[m.name] for m in bucket})


# ---------------------------------------------------------------------------------------- the FP32 head


def head_weight_names(model: torch.nn.Module) -> list[str]:
    """Every parameter name the LM head's weight answers to (a tied head: the embedding's name too)."""
    head = model.lm_head
    return [f"{name}.weight" for name, m in model.named_modules(remove_duplicate=False) if m is head]


class Fp32Head:
    """An FP32 copy of one rank's LM head shard, and the logits computed from it."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.lm_head = model.lm_head
        self.processor = model.logits_processor
        self.names = head_weight_names(model)
        self.weight = self.lm_head.weight.detach().to(torch.float32, copy=True)
        self.original_get_logits = self.processor._get_logits

    def set_full(self, full: torch.Tensor) -> None:
        """Copy this rank's rows of the full [vocab, hidden] head (vLLM's vocabulary shard layout: the rank's
        slice of the original vocabulary first, padding rows zero)."""
        indices = getattr(self.lm_head, "shard_indices", None)
        start, end = (
            (0, full.shape[0])
            if indices is None
            else (indices.org_vocab_start_index, indices.org_vocab_end_index)
        )
        rows = full[start:end]
        if rows.shape[0] > self.weight.shape[0] or rows.shape[1:] != self.weight.shape[1:]:
            raise ValueError(
                f"fp32 head: a head of shape {tuple(full.shape)} does not fit this rank's "
                f"{tuple(self.weight.shape)} (rows {start}:{end})"
            )
        with torch.no_grad():
            self.weight.zero_()
            self.weight[: rows.shape[0]].copy_(rows.to(self.weight.device, torch.float32))

    def logits(
        self, hidden_states: torch.Tensor, lm_head: Any, embedding_bias: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """vLLM's LogitsProcessor._get_logits with the head in fp32."""
        if lm_head is not self.lm_head:  # another head through the same processor (e.g. a draft head)
            return self.original_get_logits(hidden_states, lm_head, embedding_bias)
        bias = None if embedding_bias is None else embedding_bias.float()
        logits = F.linear(hidden_states.float(), self.weight, bias)
        gather = getattr(self.processor, "_gather_logits", None)
        if gather is not None:
            logits = gather(logits)
        else:  # releases before _gather_logits existed
            from vllm.distributed import tensor_model_parallel_all_gather, tensor_model_parallel_gather

            use_all = getattr(self.processor, "use_all_gather", False)
            logits = (tensor_model_parallel_all_gather if use_all else tensor_model_parallel_gather)(logits)
        if logits is not None:
            logits = logits[..., : self.processor.org_vocab_size]
        return logits


def install_fp32_head(model: torch.nn.Module, source: torch.Tensor | None = None) -> Fp32Head:
    """Make `model` (anything with vLLM's `lm_head`, `logits_processor` and `load_weights`) compute its
    logits with an FP32 head. `source`: the full unrounded head weight (None: the module's own weight, cast).
    Every later model.load_weights refreshes the copy from a head tensor passing through. Idempotent."""
    head: Fp32Head | None = getattr(model, "_cispo_fp32_head", None)
    if head is None:
        for attr in ("lm_head", "logits_processor", "load_weights"):
            if getattr(model, attr, None) is None:
                raise ValueError(f"fp32 head: {type(model).__name__} has no {attr!r} (not a vLLM causal LM?)")
        if not isinstance(getattr(model.lm_head, "weight", None), torch.Tensor):
            raise ValueError(f"fp32 head: {type(model).__name__}.lm_head has no weight tensor")
        head = Fp32Head(model)
        head.processor._get_logits = head.logits  # the instance attribute shadows the class method
        original_load = model.load_weights

        def load_weights(weights: Iterable[tuple[str, torch.Tensor]], *args: Any, **kwargs: Any) -> Any:
            captured: list[torch.Tensor] = []

            def tap() -> Iterator[tuple[str, torch.Tensor]]:
                for name, tensor in weights:
                    if name in head.names:  # copy now: the tensor may be a view into a reused bucket
                        captured.append(tensor.detach().to(head.weight.device, torch.float32, copy=True))
                    yield name, tensor

            result = original_load(tap(), *args, **kwargs)
            if captured:
                head.set_full(captured[-1])
            return result

        model.load_weights = load_weights
        model._cispo_fp32_head = head
    if source is not None:
        head.set_full(source)
    return head


# ------------------------------------------------------------------------------------------- routing


def num_experts_of(config: Any) -> int | None:
    """The routed-expert count of a Hugging Face config (None: a dense model)."""
    for attr in ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def routing_rows(routed: Any, prompt_len: int, kept: int, dtype: torch.dtype) -> torch.Tensor:
    """vLLM's routed experts of one completion ([P + N - 1, layers, top_k], N the sampled tokens) as the
    hf engine records them for a response cut to `kept` tokens: [P + kept, layers, top_k], the fed positions'
    choices and NO_CHOICE for the last position (never fed)."""
    if routed is None:
        raise RuntimeError("vllm engine: record_routing is on but vLLM returned no routed_experts")
    fed = torch.as_tensor(routed)
    if fed.dim() != 3:
        raise ValueError(
            f"vllm engine: routed_experts must be [tokens, layers, top_k], got {tuple(fed.shape)}"
        )
    rows = prompt_len + kept
    if fed.shape[0] < rows - 1:
        raise ValueError(f"vllm engine: routed_experts has {fed.shape[0]} positions, {rows - 1} were fed")
    out = torch.full((rows, *fed.shape[1:]), NO_CHOICE, dtype=dtype)
    out[: rows - 1] = fed[: rows - 1].to(dtype)
    return out


# --------------------------------------------------------------------------------- inside vLLM's workers
