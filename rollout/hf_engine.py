"""The `hf` engine: a transformers causal LM in-process, with our own KV-cached decode loop.

Why our own loop instead of model.generate: the behaviour log-probs must come from an FP32 LM head (the
final hidden state times the lm_head weight in float32, even when the body runs in bf16) and from exactly
the distribution sampled from (rollout/sampling.py). The engine keeps its own FP32 copy of the head weight,
taken from the FP32 source (the learner's module, its saved checkpoint, every weight sync): casting the
body to bf16 must not round the head, or engine and learner would score tokens with different heads.

Why prompts are bucketed by exact length: transformers' MiniMax (lightning attention mixed with softmax
attention) drifts from a full forward under left padding with a cache; a batch whose prompts all have the
same length needs no padding at all. Rows that finish early keep decoding a pad token whose output is
discarded; causal attention means it never influences the live rows.

Why record_routing: with learner.routing_replay an MoE learner replays the experts the engine chose
(cispo/moe.py). Routers are hooked during the decode loop, so the recorded choices come from exactly the
forwards that produced the behaviour log-probs (same dtype, same cache), one record per fed position.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from cispo.core.moe import NO_CHOICE, RoutingRecorder, find_routers, routing_dtype
from cispo.core.types import Generation, SamplingParams
from cispo.models.minimax_rope import honour_partial_rotary
from rollout.engine import register_engine
from rollout.sampling import process_logits, sample
from rollout.stopping import StopTracker

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def length_buckets(prompts: list[list[int]], max_batch_size: int) -> list[list[int]]:
    """Prompt indices grouped by exact length, split into micro-batches of at most max_batch_size."""
    by_length: dict[int, list[int]] = defaultdict(list)
    for index, prompt in enumerate(prompts):
        by_length[len(prompt)].append(index)
    batches: list[list[int]] = []
    for length in sorted(by_length):
        indices = by_length[length]
        batches.extend(indices[i : i + max_batch_size] for i in range(0, len(indices), max_batch_size))
    return batches


def head_parameter_names(model: torch.nn.Module) -> list[str]:
    """Every name under which the LM head's weight appears (a tied head also answers to the embedding's)."""
    weight = model.get_output_embeddings().weight
    return [name for name, p in model.named_parameters(remove_duplicate=False) if p is weight]


def checkpoint_tensor(model_path: str, names: list[str]) -> torch.Tensor | None:
    """The first of `names` stored in a local safetensors checkpoint, at its stored precision (an FP32
    head saved by the learner stays FP32 even when the body is loaded in bf16); None if not found."""
    from safetensors import safe_open

    for shard in sorted(Path(model_path).glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            for name in names:
                if name in handle.keys():
                    return handle.get_tensor(name)
    return None


@register_engine("hf")
class HFEngine:
    """Batched sampling from a transformers causal LM (CPU or GPU) with FP32 behaviour log-probs.

    A given `model` is deep-copied: the engine owns its weights and changes them only in load_weights, just
    like a remote engine would, so a learner can hand its own module in without aliasing.
    """

    def __init__(
        self,
        model_path: str | None = None,
        model: torch.nn.Module | None = None,
        dtype: str = "float32",
        device: str = "cpu",
        max_batch_size: int = 64,
        num_threads: int | None = None,
        seed: int = 0,
        trust_remote_code: bool = False,
        record_routing: bool = False,
    ) -> None:
        if (model_path is None) == (model is None):
            raise ValueError("hf engine: pass exactly one of model_path or model")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype)
        self.max_batch_size = max_batch_size
        self.model, source_head = self._load(model_path, model, trust_remote_code)
        self._head_names = head_parameter_names(self.model)
        self._set_head(source_head)
        self.version = 0
        self.last_timings: dict[str, float] = {}
        self._generator = torch.Generator(device=self.device).manual_seed(seed)
        body = self.model.base_model
        params = inspect.signature(body.forward).parameters
        # transformers 5 renamed past_key_values to cache; accept either so the engine spans versions.
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        # "All rows finished?" forces a host-device sync; on a GPU ask every few steps (the extra steps of
        # finished rows only decode discarded pad tokens).
        self._done_every = 1 if self.device.type == "cpu" else 8
        self._refresh_head()
        self.record_routing = record_routing
        self._routing_dtype = torch.int64
        if record_routing:
            routers = find_routers(self.model)
            if not routers:
                name = type(self.model).__name__
                raise ValueError(f"hf engine: record_routing needs an MoE model; {name} has no router")
            self._routing_dtype = routing_dtype(max(int(r.num_experts) for r in routers))

    def _load(
        self, model_path: str | None, model: torch.nn.Module | None, trust_remote_code: bool
    ) -> tuple[Any, torch.Tensor]:
        """The engine's own model at self.dtype, and the head weight at the finest precision available."""
        if model is None:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(
                model_path, dtype=self.dtype, trust_remote_code=trust_remote_code
            )
            stored = checkpoint_tensor(model_path, head_parameter_names(model))
            source = stored if stored is not None else model.get_output_embeddings().weight
        else:
            source = model.get_output_embeddings().weight  # the caller's tensor, before the cast rounds it
            model = copy.deepcopy(model).to(self.dtype)
        # A MiniMax with partial RoPE (the published checkpoints) rotates only its rotary dims, as the learner
        model = honour_partial_rotary(model)
        return model.to(self.device).eval(), source

    def _set_head(self, source: torch.Tensor | None) -> None:
        """The FP32 head weight. An FP32 body's own head parameter is it already (load_state_dict keeps it
        current, no copy needed); a lower-precision body gets a separate FP32 copy of `source`, so the cast
        never rounds the head (None: keep the current copy)."""
        module_weight = self.model.get_output_embeddings().weight
        if module_weight.dtype == torch.float32:
            self._head_weight = module_weight.detach()
        elif source is not None:
            self._head_weight = source.detach().to(self.device, torch.float32, copy=True)

    def _refresh_head(self) -> None:
        head = self.model.get_output_embeddings()
        bias = getattr(head, "bias", None)
        self._head_bias = None if bias is None else bias.detach().float()
        self._softcap = getattr(self.model.config, "final_logit_softcapping", None)

    def fp32_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from final hidden states with the LM head in float32."""
        # W @ h^T rather than h @ W^T: the same product, but MKL runs this layout about 1.3-2x faster at
        # decode shapes (a few rows against a vocabulary-sized weight) on CPU; cuBLAS does not care.
        logits = torch.mm(self._head_weight, hidden.float().T).T.contiguous()
        if self._head_bias is not None:
            logits = logits + self._head_bias
        if self._softcap:
            logits = torch.tanh(logits / self._softcap) * self._softcap
        return logits

    def _forward(self, input_ids: torch.Tensor, cache: Any, past: int) -> tuple[torch.Tensor, Any]:
        # Explicit positions: models infer them from cache.get_seq_length(), which asks layer 0 — and in
        # hybrid MiniMax layer 0 is a linear-attention layer that reports 0, so RoPE would restart at 0
        # on every decode step (silently wrong output once the model has learnt to use positions).
        positions = torch.arange(past, past + input_ids.shape[1], device=input_ids.device)
        out = self.model.base_model(
            input_ids=input_ids,
            position_ids=positions.unsqueeze(0).expand(input_ids.shape[0], -1),
            use_cache=True,
            **{self._cache_kwarg: cache},
        )
        new_cache = getattr(out, "cache", None)
        if new_cache is None:
            new_cache = out.past_key_values
        return out.last_hidden_state[:, -1], new_cache

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Generation]:
        start = time.perf_counter()
        generator = self._generator
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        results: list[Generation | None] = [None] * len(prompts)
        totals = {"prefill_s": 0.0, "decode_s": 0.0, "forwards": 0.0}
        batches = length_buckets(prompts, self.max_batch_size)
        for batch in batches:
            if not prompts[batch[0]]:
                raise ValueError("hf engine: empty prompt (at least one token is needed to condition on)")
            input_ids = torch.tensor([prompts[i] for i in batch], dtype=torch.long, device=self.device)
            for index, generation in zip(batch, self._decode(input_ids, params, generator, totals)):
                results[index] = generation
        new_tokens = sum(len(g.response_ids) for g in results if g is not None)
        elapsed = time.perf_counter() - start
        self.last_timings = {
            **totals,
            "generate_s": elapsed,
            "new_tokens": float(new_tokens),
            "tokens_per_s": new_tokens / max(elapsed, 1e-9),
            "batches": float(len(batches)),
        }
        return [g for g in results if g is not None]

    @torch.inference_mode()
    def _decode(
        self,
        input_ids: torch.Tensor,
        params: SamplingParams,
        generator: torch.Generator,
        totals: dict[str, float],
    ) -> list[Generation]:
        batch_size = input_ids.shape[0]
        tracker = StopTracker(batch_size, params, self.device)
        pad = torch.full((batch_size,), params.pad_token_id, dtype=torch.long, device=self.device)
        tokens_out: list[torch.Tensor] = []
        logprobs_out: list[torch.Tensor] = []
        step_ids, cache = input_ids, None
        recorder = RoutingRecorder(self.model, self._routing_dtype) if self.record_routing else None
        with recorder or contextlib.nullcontext():
            for step in range(params.max_new_tokens):
                tick = time.perf_counter()
                past = 0 if step == 0 else input_ids.shape[1] + step - 1
                hidden, cache = self._forward(step_ids, cache, past)
                tokens, logprobs = sample(process_logits(self.fp32_logits(hidden), params), generator)
                tokens = torch.where(tracker.finished, pad, tokens)
                tokens_out.append(tokens)
                logprobs_out.append(logprobs)
                done = tracker.update(tokens, logprobs, check_done=step % self._done_every == 0)
                totals["prefill_s" if step == 0 else "decode_s"] += time.perf_counter() - tick
                totals["forwards"] += 1
                if done:
                    break
                step_ids = tokens[:, None]
        all_tokens = torch.stack(tokens_out, dim=1).tolist()
        all_logprobs = torch.stack(logprobs_out, dim=1).tolist()
        lengths = tracker.num_tokens.tolist()
        routing = self._row_routing(recorder, input_ids.shape[1], lengths)
        return [
            Generation(all_tokens[row][:n], all_logprobs[row][:n], reason, self.version, routing[row])
            for row, (n, reason) in enumerate(zip(lengths, tracker.reasons()))
        ]

    def _row_routing(
        self, recorder: RoutingRecorder | None, prompt_len: int, lengths: list[int]
    ) -> list[torch.Tensor | None]:
        """Per row, [P + n, n_moe_layers, top_k] in the compact dtype: the recorded choices of the prompt
        and of the n - 1 sampled tokens fed back, then NO_CHOICE for the last one (never fed). Positions
        fed after a row finished (its discarded pad tokens) are dropped."""
        if recorder is None:
            return [None] * len(lengths)
        fed = recorder.routed_experts(batch_size=len(lengths))
        rows: list[torch.Tensor | None] = []
        for row, n in enumerate(lengths):
            routed = torch.full((prompt_len + n, *fed.shape[2:]), NO_CHOICE, dtype=fed.dtype)
            # A fresh tensor per row (not a view of `fed`): pickling a view would ship the whole batch.
            routed[: prompt_len + n - 1] = fed[row, : prompt_len + n - 1]
            rows.append(routed)
        return rows

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        """Copy (possibly a subset of) the learner's weights in place; unknown names are an error."""
        start = time.perf_counter()
        with torch.no_grad():
            result = self.model.load_state_dict(state_dict, strict=False)
        if result.unexpected_keys:
            raise KeyError(f"hf engine: weights not in the model: {sorted(result.unexpected_keys)[:10]}")
        self._set_head(next((state_dict[n] for n in self._head_names if n in state_dict), None))
        self._refresh_head()
        self.version = version
        self.last_timings = {**self.last_timings, "load_weights_s": time.perf_counter() - start}
