"""The `vllm` engine for GPU clusters: the same Engine protocol on vLLM, with in-place weight updates.

vLLM is in the `gpu` extra (pip install 'cispo[gpu]'). Behaviour log-probs are requested with
logprobs_mode="processed_logprobs" (vLLM >= 0.10.2), i.e. after temperature and top-k / top-p, the
distribution actually sampled from. vLLM takes the log_softmax in fp32 but runs the LM head matmul in the
model dtype, so with a bf16 model its log-probs are not FP32-head log-probs; pass dtype="float32" (or use
the hf engine) where that difference matters. The repetition stop is applied after sampling (vLLM cannot
stop on it live): the response is cut where the rule fires, so samples match the hf engine's but no decode
time is saved.

Weight updates run inside vLLM's worker processes through a worker extension (CispoWorkerExtension), the
same seam as OpenRLHF's vllm_worker_wrap: from a CPU state dict (object-store path) or by receiving the
learner's broadcast (rollout/weight_sync.py). The prefix cache is reset after every update so no KV computed
with old weights is reused.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from cispo.core.types import Generation, SamplingParams
from rollout.engine import register_engine
from rollout.stopping import repetition_cut
from rollout.weight_sync import TensorMeta, init_weight_group, receive_state_dict, to_cpu_state_dict

_FINISH = {"stop": "eos", "length": "length"}
_EXTENSION = "rollout.vllm_engine.CispoWorkerExtension"


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


class CispoWorkerExtension:
    """Methods mixed into every vLLM worker (worker_extension_cls); `self` is the vLLM worker."""

    model_runner: Any
    device: Any

    def cispo_load_weights(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        self.model_runner.model.load_weights(weights=[(n, t.to(self.device)) for n, t in weights])

    def cispo_init_weight_group(self, host: str, port: int, rank: int, world_size: int, backend: str) -> None:
        from vllm.distributed.parallel_state import get_world_group

        # Tensor-parallel ranks of one engine take consecutive ranks after the engine's offset.
        self._cispo_group = init_weight_group(host, port, rank + get_world_group().rank, world_size, backend)

    def cispo_receive_weights(self, metas: list[TensorMeta]) -> None:
        weights = receive_state_dict(self._cispo_group, metas, self.device)
        self.model_runner.model.load_weights(weights=list(weights.items()))


@register_engine("vllm")
class VLLMEngine:
    def __init__(
        self,
        model_path: str,
        dtype: str = "bfloat16",
        device: str = "cuda",
        max_batch_size: int = 256,
        num_threads: int | None = None,
        seed: int = 0,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.85,
        **llm_kwargs: Any,
    ) -> None:
        vllm = _require_vllm()
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        self.device = device
        self.seed = seed
        self.llm = vllm.LLM(
            model=model_path,
            dtype=dtype,
            seed=seed,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            max_num_seqs=max_batch_size,
            worker_extension_cls=_EXTENSION,
            logprobs_mode="processed_logprobs",
            **llm_kwargs,
        )
        self.version = 0
        self.last_timings: dict[str, float] = {}
        self._calls = 0

    def _sampling_params(self, params: SamplingParams, index: int) -> Any:
        import vllm

        # A per-request seed must differ between the copies of one prompt, or a group's samples coincide.
        seed = None if params.seed is None else params.seed + index
        return vllm.SamplingParams(
            n=1,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k if params.top_k > 0 else -1,
            max_tokens=params.max_new_tokens,
            stop_token_ids=list(params.eos_token_ids),
            ignore_eos=True,  # stop only on the ids the caller names, as the hf engine does
            logprobs=0,  # the sampled token's log-prob only
            detokenize=False,
            seed=seed,
        )

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Generation]:
        from vllm.inputs import TokensPrompt

        start = time.perf_counter()
        requests = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
        sampling = [self._sampling_params(params, i) for i in range(len(prompts))]
        outputs = self.llm.generate(requests, sampling, use_tqdm=False)
        generations = [self._to_generation(out.outputs[0], params) for out in outputs]
        elapsed = time.perf_counter() - start
        new_tokens = sum(len(g.response_ids) for g in generations)
        self.last_timings = {
            "generate_s": elapsed,
            "new_tokens": float(new_tokens),
            "tokens_per_s": new_tokens / max(elapsed, 1e-9),
        }
        return generations

    def _to_generation(self, completion: Any, params: SamplingParams) -> Generation:
        ids = list(completion.token_ids)
        logprobs = [float(completion.logprobs[t][token].logprob) for t, token in enumerate(ids)]
        reason = _FINISH.get(completion.finish_reason, "length")
        cut = repetition_cut(logprobs, params.repetition_stop_tokens, params.repetition_prob)
        # Same priority as the live rules: an EOS on the very token where the rule fires stays an EOS.
        if cut is not None and (cut < len(ids) or reason == "length"):
            ids, logprobs, reason = ids[:cut], logprobs[:cut], "repetition"
        return Generation(ids, logprobs, reason, self.version)

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        start = time.perf_counter()
        self.llm.collective_rpc("cispo_load_weights", args=(list(to_cpu_state_dict(state_dict).items()),))
        self.llm.reset_prefix_cache()
        self.version = version
        self.last_timings = {**self.last_timings, "load_weights_s": time.perf_counter() - start}

    def init_weight_group(self, host: str, port: int, rank: int, world_size: int, backend: str) -> None:
        self.llm.collective_rpc("cispo_init_weight_group", args=(host, port, rank, world_size, backend))

    def receive_weights(self, metas: list[TensorMeta], version: int) -> None:
        self.llm.collective_rpc("cispo_receive_weights", args=(metas,))
        self.llm.reset_prefix_cache()
        self.version = version
