"""The `vllm` engine for GPU clusters: the same Engine protocol on vLLM, with in-place weight updates.

vLLM is in the `gpu` extra (pip install 'cispo[gpu]'; MiniMax-M1 needs the `gpu-minimax` environment).
Nothing here imports vLLM at module level: the pure pieces (LLM arguments, sampling arguments, weight names,
the FP32 head hook, the routing rows) run and are unit-tested without it (tests/rollout/
test_vllm_engine_cpu.py). None of this has run on a GPU yet: benchmarks/gpu_smoke.sh is the check.

FP32 LM head (the MiniMax-M1 report's fix for the train/inference probability mismatch). vLLM runs the
head matmul in the model dtype. After the LLM is built, every vLLM worker runs `install_fp32_head` on its
model (via the worker extension): it keeps an FP32 copy of the head weight (this rank's vocabulary shard,
padding rows zero) taken from the checkpoint's stored tensor (the learner's FP32 head stays unrounded even
when the body is bf16) and replaces the model's `logits_processor._get_logits` with fp32 hidden states @
fp32 weight, followed by vLLM's own tensor-parallel gather and vocabulary-padding cut. Every later
`model.load_weights` refreshes the copy from the head tensor passing through it (a tied head answers to the
embedding's name too; the embedding itself stays in the model dtype). Behaviour log-probs are requested
with logprobs_mode="processed_logprobs" (vLLM >= 0.10.2): vLLM's sampler takes them from these fp32 logits
after temperature and top-k / top-p, the distribution actually sampled from. Not covered:
`LogitsProcessor.get_top_tokens` (speculative-decoding drafts only) and LoRA-wrapped heads. vLLM's own
`hf_overrides={"head_dtype": "float32"}` (vllm-project/vllm#48390, generation models since 2026-07)
computes in fp32 from the bf16-rounded weight; the hook here supersedes it (it replaces `_get_logits`).
The copy costs vocab x hidden x 4 bytes / TP per GPU and is allocated after vLLM sized its KV cache: leave
that much headroom under gpu_memory_utilization.

Weights. `model.load_weights` of vLLM's dense models (Qwen2, Llama) takes Hugging Face checkpoint names and
stacks q/k/v into qkv_proj and gate/up into gate_up_proj itself (skipping lm_head.* when the head is tied).
The learner's state dict is transformers' in-memory layout, which differs from the checkpoint only for MoE
experts (transformers 5 fuses them: experts.gate_up_proj [E, 2I, H], experts.down_proj [E, H, I];
Mixtral-style models also rename block_sparse_moe to mlp) and by wrapper prefixes (module., _orig_mod.);
`checkpoint_names` undoes exactly that (tested against save_pretrained's output). Weights never touch disk:
the object-store path packs buckets of `bucket_bytes` with safetensors into bytes for vLLM's RPC (msgpack
carries bytes natively; tensors and torch.dtype inside RPC arguments do not survive it), the broadcast path
receives bucket by bucket over the weight channel (cispo/core/weight_channel.py, the same bucket plan as
the sender) and loads each bucket before taking the next. The prefix cache is reset after every update so
no KV computed with old weights is reused. MoE models whose kernels re-lay expert weights after loading
(process_weights_after_loading) are not covered by a plain load_weights: a GPU run must confirm them.

MoE routing record (record_routing=True, for learner.routing_replay). vLLM records the experts chosen at
every fed position with `enable_return_routed_experts=True` (vllm-project/vllm#28284; engine-level in
releases from at least 0.21, so in the `gpu` extra's >= 0.33 and in 0.23.0): `CompletionOutput.
routed_experts`, an array [prompt + response - 1, MoE layers, top_k] (the scheduler reads num_tokens - 1
slots: the last sampled token is never fed). `routing_rows` turns that into the hf engine's layout
[P + n, layers, top_k] with NO_CHOICE for the unfed last position, cut with the response. Only a GPU run
can confirm that the layer axis matches the learner's routers (cispo.core.moe) in order.

The repetition stop is applied after sampling (vLLM cannot stop on it live): the response is cut where the
rule fires, so samples match the hf engine's but no decode time is saved.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import torch

from cispo.core.moe import routing_dtype
from cispo.core.types import Generation, SamplingParams
from cispo.core.weight_channel import (
    BUCKET_BYTES,
    TensorMeta,
    init_weight_group,
    iter_received,
    refuse_weights_here,
)
from rollout.engine import register_engine
from rollout.stopping import repetition_cut
from rollout.vllm_parts import (  # noqa: F401 - re-exported: tests and callers use rollout.vllm_engine
    _MIXTRAL_STYLE,
    _WRAPPERS,
    Fp32Head,
    _strip_wrappers,
    checkpoint_names,
    head_weight_names,
    install_fp32_head,
    metas_from_wire,
    metas_to_wire,
    num_experts_of,
    pack_weights,
    packed_buckets,
    routing_rows,
    unpack_weights,
)

_FINISH = {"stop": "eos", "length": "length"}
_EXTENSION = "rollout.vllm_engine.CispoWorkerExtension"
# Set by the engine itself: the contract with the worker extension and the behaviour log-probs depend on them.
_RESERVED = ("model", "worker_extension_cls", "logprobs_mode", "enable_return_routed_experts")


def _require_vllm() -> Any:
    try:
        import vllm
    except ImportError as exc:
        raise RuntimeError(
            "rollout engine 'vllm' needs vLLM and a CUDA GPU: install the gpu extra "
            "(pip install 'cispo[gpu]') on a GPU machine, or select engine 'hf' (CPU or GPU)"
        ) from exc
    if not torch.cuda.is_available():
        raise RuntimeError("rollout engine 'vllm' needs a CUDA GPU and none is visible; select engine 'hf'")
    return vllm


# ---------------------------------------------------------------------------------------------- arguments


def llm_kwargs(
    model_path: str | None,
    dtype: str = "bfloat16",
    seed: int = 0,
    tensor_parallel_size: int = 1,
    gpu_memory_utilization: float = 0.85,
    max_batch_size: int = 256,
    enable_prefix_caching: bool = True,
    max_model_len: int | None = None,
    record_routing: bool = False,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The keyword arguments of `vllm.LLM(...)` for these engine arguments (`extra`: further vLLM args)."""
    extra = dict(extra or {})
    clash = sorted(set(extra) & set(_RESERVED))
    if clash:
        raise ValueError(
            f"vllm engine: {clash} are set by the engine itself (model comes from model_path; the "
            "worker extension, processed log-probs and routing record are its contract); remove them "
            "from engine_kwargs"
        )
    if not model_path:
        raise ValueError("vllm engine: model_path is required (vLLM loads the policy from a directory)")
    if tensor_parallel_size < 1 or max_batch_size < 1:
        raise ValueError(
            f"vllm engine: tensor_parallel_size and max_batch_size must be >= 1, "
            f"got {tensor_parallel_size}, {max_batch_size}"
        )
    if not 0 < gpu_memory_utilization <= 1:
        raise ValueError(
            f"vllm engine: gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}"
        )
    kwargs: dict[str, Any] = {
        "model": str(model_path),
        "dtype": dtype,
        "seed": seed,
        "tensor_parallel_size": tensor_parallel_size,
        "gpu_memory_utilization": gpu_memory_utilization,
        "max_num_seqs": max_batch_size,
        "enable_prefix_caching": enable_prefix_caching,
        "worker_extension_cls": _EXTENSION,
        "logprobs_mode": "processed_logprobs",
        # Prompts arrive as token ids and responses leave as token ids: no tokenizer needed in the engine.
        "skip_tokenizer_init": True,
    }
    if max_model_len is not None:
        kwargs["max_model_len"] = int(max_model_len)
    if record_routing:
        kwargs["enable_return_routed_experts"] = True
    return {**kwargs, **extra}


def sampling_kwargs(params: SamplingParams, index: int) -> dict[str, Any]:
    """The keyword arguments of `vllm.SamplingParams(...)` for copy `index` of a request."""
    # A per-request seed must differ between the copies of one prompt, or a group's samples coincide.
    return {
        "n": 1,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k if params.top_k > 0 else -1,
        "max_tokens": params.max_new_tokens,
        "stop_token_ids": list(params.eos_token_ids),
        "ignore_eos": True,  # stop only on the ids the caller names, as the hf engine does
        "logprobs": 0,  # the sampled token's log-prob only
        "detokenize": False,
        "seed": None if params.seed is None else params.seed + index,
    }


# ------------------------------------------------------------------------------------------ weight names


def _checkpoint_head(model_path: str | None, names: list[str]) -> torch.Tensor | None:
    if not model_path:
        return None
    from rollout.hf_engine import checkpoint_tensor

    return checkpoint_tensor(model_path, names)


class CispoWorkerExtension:
    """Methods mixed into every vLLM worker (worker_extension_cls); `self` is the vLLM worker."""

    model_runner: Any
    device: Any

    def _cispo_model(self) -> Any:
        get_model = getattr(self.model_runner, "get_model", None)
        return get_model() if callable(get_model) else self.model_runner.model

    def _cispo_naming(self) -> tuple[bool, str]:
        config = getattr(getattr(self, "vllm_config", None), "model_config", None)
        hf_config = getattr(config, "hf_config", None) or self.model_runner.model_config.hf_config
        tied = bool(getattr(hf_config, "tie_word_embeddings", False))
        return tied, str(getattr(hf_config, "model_type", ""))

    def _cispo_load(self, pairs: Iterable[tuple[str, torch.Tensor]]) -> None:
        tied, model_type = self._cispo_naming()
        named = checkpoint_names(pairs, tied=tied, model_type=model_type)
        weights = ((n, t.to(self.device)) for n, t in named)
        self._cispo_model().load_weights(weights)

    def cispo_install_fp32_head(self, model_path: str | None) -> bool:
        """True when the unrounded head came from the checkpoint (False: this rank has no head, or the
        checkpoint had none and the module's weight was cast)."""
        model = self._cispo_model()
        if not isinstance(getattr(getattr(model, "lm_head", None), "weight", None), torch.Tensor):
            return False  # a pipeline stage without the head
        source = _checkpoint_head(model_path, head_weight_names(model))
        install_fp32_head(model, source)
        return source is not None

    def cispo_load_packed(self, blob: bytes) -> None:
        self._cispo_load(unpack_weights(blob).items())

    def cispo_init_weight_group(self, host: str, port: int, rank: int, world_size: int, backend: str) -> None:
        from vllm.distributed.parallel_state import get_world_group

        # Tensor-parallel ranks of one engine take consecutive ranks after the engine's offset.
        self._cispo_group = init_weight_group(host, port, rank + get_world_group().rank, world_size, backend)

    def cispo_receive_weights(self, wire_metas: list[Any], bucket_bytes: int) -> None:
        metas = metas_from_wire(wire_metas)
        for part in iter_received(self._cispo_group, metas, self.device, bucket_bytes):
            self._cispo_load(part.items())  # each bucket loaded before the next is received


# ------------------------------------------------------------------------------------------- the engine


@register_engine("vllm")
class VLLMEngine:
    def __init__(
        self,
        model_path: str | None = None,
        dtype: str = "bfloat16",
        device: str = "cuda",
        max_batch_size: int = 256,
        num_threads: int | None = None,
        seed: int = 0,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.85,
        enable_prefix_caching: bool = True,
        max_model_len: int | None = None,
        record_routing: bool = False,
        fp32_head: bool = True,
        bucket_bytes: int = BUCKET_BYTES,
        **extra: Any,
    ) -> None:
        kwargs = llm_kwargs(
            model_path, dtype, seed, tensor_parallel_size, gpu_memory_utilization, max_batch_size,
            enable_prefix_caching, max_model_len, record_routing, extra,
        )  # fmt: skip
        vllm = _require_vllm()
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        self.device = device
        self.seed = seed
        self.bucket_bytes = bucket_bytes
        # Ranks this engine holds in the weight group: one per tensor-parallel worker process.
        self.weight_group_size = tensor_parallel_size
        self.record_routing = record_routing
        self.llm = vllm.LLM(**kwargs)
        self._routing_dtype = torch.int64
        if record_routing:
            experts = num_experts_of(self.llm.llm_engine.model_config.hf_config)
            if experts is None:
                raise ValueError("vllm engine: record_routing needs an MoE model; this config has no experts")
            self._routing_dtype = routing_dtype(experts)
        self.fp32_head_from_checkpoint: list[bool] = []
        if fp32_head:
            self.fp32_head_from_checkpoint = list(
                self.llm.collective_rpc("cispo_install_fp32_head", args=(model_path,))
            )
        self.version = 0
        self.last_timings: dict[str, float] = {}

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Generation]:
        import vllm
        from vllm.inputs import TokensPrompt

        start = time.perf_counter()
        requests = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
        sampling = [vllm.SamplingParams(**sampling_kwargs(params, i)) for i in range(len(prompts))]
        outputs = self.llm.generate(requests, sampling, use_tqdm=False)
        generations = [
            self._to_generation(out.outputs[0], len(prompt), params) for out, prompt in zip(outputs, prompts)
        ]
        elapsed = time.perf_counter() - start
        new_tokens = sum(len(g.response_ids) for g in generations)
        self.last_timings = {
            "generate_s": elapsed,
            "new_tokens": float(new_tokens),
            "tokens_per_s": new_tokens / max(elapsed, 1e-9),
        }
        return generations

    def _to_generation(self, completion: Any, prompt_len: int, params: SamplingParams) -> Generation:
        ids = list(completion.token_ids)
        logprobs = [float(completion.logprobs[t][token].logprob) for t, token in enumerate(ids)]
        reason = _FINISH.get(completion.finish_reason, "length")
        cut = repetition_cut(logprobs, params.repetition_stop_tokens, params.repetition_prob)
        # Same priority as the live rules: an EOS on the very token where the rule fires stays an EOS.
        if cut is not None and (cut < len(ids) or reason == "length"):
            ids, logprobs, reason = ids[:cut], logprobs[:cut], "repetition"
        routing = None
        if self.record_routing:
            routed = getattr(completion, "routed_experts", None)
            routing = routing_rows(routed, prompt_len, len(ids), self._routing_dtype)
        return Generation(ids, logprobs, reason, self.version, routing)

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        """Object-store path: safetensors-packed buckets into every worker, no file round-trip."""
        refuse_weights_here("object-store weight sync")
        start = time.perf_counter()
        for blob in packed_buckets(state_dict, self.bucket_bytes):
            self.llm.collective_rpc("cispo_load_packed", args=(blob,))
        self.llm.reset_prefix_cache()
        self.version = version
        self.last_timings = {**self.last_timings, "load_weights_s": time.perf_counter() - start}

    def init_weight_group(self, host: str, port: int, rank: int, world_size: int, backend: str) -> None:
        self.llm.collective_rpc("cispo_init_weight_group", args=(host, port, rank, world_size, backend))

    def receive_weights(
        self, metas: list[TensorMeta], version: int, bucket_bytes: int = BUCKET_BYTES
    ) -> None:
        """Broadcast path: every worker receives the sender's buckets (same bucket_bytes) and loads each."""
        self.llm.collective_rpc("cispo_receive_weights", args=(metas_to_wire(metas), bucket_bytes))
        self.llm.reset_prefix_cache()
        self.version = version
