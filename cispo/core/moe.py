"""Mixture-of-experts helpers: record routing at rollout, replay it in the learner, router auxiliary loss.

Why routing replay: an MoE router's top-k is a discontinuous function of its input. The rollout engine
(bf16, fused kernels, a KV cache) and the learner (fp32, one padded forward) compute slightly different
hidden states, so near-tied tokens pick different experts, and the learner's log-prob of a sampled token
then comes from a different sub-network than the one that sampled it. Replaying the recorded expert
indices in the learner's forward removes that source of train/infer mismatch; the router's
probabilities (the gate weights of the chosen experts) are still computed, and differentiated, by the
learner.

Layout of routed experts everywhere: [B, L, n_moe_layers, top_k] int64, aligned with input_ids; -1 marks
a position without a recorded choice (padding, or the last sampled token, which is never fed back into
the model), where the learner's router decides by itself.

Routers are found by duck typing: a module with ``top_k``, ``num_experts`` and a ``weight`` of shape
[num_experts, hidden] whose forward returns (router_logits, scores, indices), as transformers'
MiniMaxTopKRouter (and Mixtral's / Qwen-MoE's routers of the same shape) do.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

NO_CHOICE = -1


def find_routers(model: nn.Module) -> list[nn.Module]:
    """The MoE routers of a model, in forward order (the order of their layers)."""
    routers = []
    for module in model.modules():
        if module.__class__.__name__.endswith("TopKRouter") or (
            hasattr(module, "top_k")
            and hasattr(module, "num_experts")
            and isinstance(getattr(module, "weight", None), nn.Parameter)
        ):
            routers.append(module)
    return routers


class RoutingRecorder:
    """Forward hooks that record the top-k expert indices each router picks; for the rollout engine.

    Usage (prefill and every decode step of a cached ``generate`` append along time):

        with RoutingRecorder(model) as rec:
            model.generate(...)
        routed = rec.routed_experts()   # [B, T_fed, n_moe_layers, top_k]

    T_fed counts the positions that went through the model: the prompt and every sampled token but the
    last. Batch rows must stay in place during the recording (no beam reordering). `dtype` is the type the
    indices are kept in (on the model's device) and returned in: a compact one (routing_dtype) keeps a long
    recording small.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.int64) -> None:
        self.routers = find_routers(model)
        self.dtype = dtype
        if not self.routers:
            raise ValueError(f"{type(model).__name__} has no MoE router to record")
        self._steps: list[list[Tensor]] = [[] for _ in self.routers]
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> RoutingRecorder:
        for layer, router in enumerate(self.routers):
            self._handles.append(router.register_forward_hook(self._make_hook(layer)))
        return self

    def _make_hook(self, layer: int):
        def hook(_module: nn.Module, _args: tuple, output: tuple) -> None:
            # Kept on the model's device: a per-step copy to the host would sync the GPU every decode step.
            self._steps[layer].append(output[2].detach().to(self.dtype))

        return hook

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def routed_experts(self, batch_size: int) -> Tensor:
        """[B, T_fed, n_moe_layers, top_k] on the CPU: every recorded forward, concatenated along time
        (routers see hidden states flattened to [B*T, H], so the batch size is needed to unflatten them)."""
        per_layer = []
        for steps in self._steps:
            if not steps:
                raise RuntimeError("no routing was recorded; run the model inside the recorder")
            per_layer.append(torch.cat([s.reshape(batch_size, -1, s.shape[-1]) for s in steps], dim=1))
        return torch.stack(per_layer, dim=2).cpu()


def routing_dtype(num_experts: int) -> torch.dtype:
    """The smallest signed integer type holding expert indices and NO_CHOICE: routed experts travel from
    rollout workers to the driver per sample ([P + R, n_moe_layers, top_k]), so 1-2 bytes a choice
    instead of int64's 8 keeps the Ray payload small."""
    for dtype in (torch.int8, torch.int16):
        if num_experts <= torch.iinfo(dtype).max:
            return dtype
    return torch.int32


def _replayed_forward(router: nn.Module, given: Tensor):
    """A router forward that keeps the router's own probabilities but takes the experts from `given`."""

    def forward(hidden_states: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        hidden_states = hidden_states.reshape(-1, router.weight.shape[1])
        logits = nn.functional.linear(hidden_states, router.weight)
        probs = torch.softmax(logits.float(), dim=-1)
        own = torch.topk(probs, router.top_k, dim=-1).indices
        choice = given.reshape(-1, router.top_k).to(own.device)
        if choice.shape != own.shape:
            raise ValueError(
                f"routing replay: recorded {tuple(choice.shape)} choices for "
                f"{tuple(own.shape)} router rows; routed_experts must align with input_ids"
            )
        indices = torch.where(choice >= 0, choice, own)
        top = probs.gather(1, indices)
        # Same renormalisation as MiniMaxTopKRouter, so replayed gates match the engine's gates exactly
        # whenever the experts agree.
        return logits, top / top.sum(dim=-1, keepdim=True), indices

    return forward


@contextlib.contextmanager
def replay_routing(model: nn.Module, routed_experts: Tensor | None) -> Iterator[None]:
    """Within the block, every router of `model` uses the expert indices in routed_experts
    [B, L, n_moe_layers, top_k] (-1 = let the router choose) for a forward over [B, L] inputs.
    With routed_experts None this does nothing."""
    if routed_experts is None:
        yield
        return
    routers = find_routers(model)
    if routed_experts.dim() != 4 or routed_experts.shape[2] != len(routers):
        raise ValueError(
            f"routed_experts must be [B, L, {len(routers)}, top_k], got {tuple(routed_experts.shape)}"
        )
    for layer, router in enumerate(routers):
        router.forward = _replayed_forward(router, routed_experts[:, :, layer])
    try:
        yield
    finally:
        for router in routers:
            del router.forward  # the instance attribute shadowed the class's forward


@contextlib.contextmanager
def capture_router_logits(model: nn.Module) -> Iterator[list[Tensor]]:
    """Collects each router's logits [B*T, n_experts] (with autograd) during the block, in layer order."""
    captured: list[Tensor] = []
    handles = [
        r.register_forward_hook(lambda _m, _a, out: captured.append(out[0])) for r in find_routers(model)
    ]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def router_aux_loss(router_logits: list[Tensor], attention_mask: Tensor, model: nn.Module) -> Tensor:
    """Switch-Transformer load-balancing loss over the non-padding tokens (transformers' implementation:
    num_experts * sum_e fraction_routed_e * mean_prob_e, averaged over MoE layers' tokens)."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    routers = find_routers(model)
    loss = load_balancing_loss_func(
        tuple(router_logits),
        routers[0].num_experts,
        routers[0].top_k,
        attention_mask.to(router_logits[0].device),
    )
    return loss if isinstance(loss, Tensor) else torch.zeros((), device=attention_mask.device)
