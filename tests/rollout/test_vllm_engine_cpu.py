"""The vLLM engine's pieces that run without vLLM or a GPU: LLM and sampling arguments, weight names
(checked against save_pretrained, which is what vLLM loads from disk), the wire format of weights, the
FP32-head hook on a fake module with vLLM's attributes, the routing rows, and the engine itself over a fake
`vllm` whose workers are the real CispoWorkerExtension around a fake model (object-store and gloo broadcast
paths)."""

from __future__ import annotations

import socket
import sys
import threading
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cispo.core.moe import NO_CHOICE
from cispo.core.testing import tiny_lm
from cispo.core.types import SamplingParams
from cispo.core.weight_channel import broadcast_state_dict, init_weight_group, state_dict_metas
from rollout import vllm_engine as ve
from rollout.worker import RolloutWorker

H, V, V_PADDED = 16, 10, 16  # hidden, vocabulary, vocabulary padded like vLLM's ParallelLMHead


# --------------------------------------------------------------------------------------------- fakes


class FakeLogitsProcessor(nn.Module):
    """The shape of vLLM's LogitsProcessor: forward -> _get_logits -> quant matmul, gather, vocab cut."""

    def __init__(self, org_vocab_size: int) -> None:
        super().__init__()
        self.org_vocab_size = org_vocab_size
        self.gathers = 0

    def forward(self, lm_head, hidden_states, embedding_bias=None):
        return self._get_logits(hidden_states, lm_head, embedding_bias)

    def _gather_logits(self, logits):
        self.gathers += 1
        return logits

    def _get_logits(self, hidden_states, lm_head, embedding_bias):
        logits = F.linear(hidden_states, lm_head.weight, embedding_bias)  # model dtype, as vLLM does
        return self._gather_logits(logits)[..., : self.org_vocab_size]


class FakeHead(nn.Module):
    def __init__(self, rows: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(rows, H, dtype=dtype), requires_grad=False)


class FakeVllmLM(nn.Module):
    """A bf16 causal LM with vLLM's attributes (lm_head, logits_processor, load_weights taking HF names)."""

    def __init__(self, tied: bool = False, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = FakeHead(V_PADDED, dtype)
        self.model.norm = nn.Linear(H, H, bias=False, dtype=dtype)
        self.model.norm.requires_grad_(False)
        self.lm_head = self.model.embed_tokens if tied else FakeHead(V_PADDED, dtype)
        self.logits_processor = FakeLogitsProcessor(V)
        self.loaded: list[str] = []

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.norm(F.embedding(ids, self.model.embed_tokens.weight))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.logits_processor(self.lm_head, hidden)

    def load_weights(self, weights):
        params = dict(self.named_parameters(remove_duplicate=False))
        for name, tensor in weights:
            param = params[name]
            param.data[: tensor.shape[0]].copy_(tensor)  # vocabulary rows: padding stays
            self.loaded.append(name)
        return set(self.loaded)


def full_head(seed: int) -> torch.Tensor:
    """An FP32 head whose values bf16 really rounds."""
    return torch.randn(V, H, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ arguments


def test_llm_kwargs_defaults():
    assert ve.llm_kwargs("/ckpt") == {
        "model": "/ckpt",
        "dtype": "bfloat16",
        "seed": 0,
        "tensor_parallel_size": 1,
        "gpu_memory_utilization": 0.85,
        "max_num_seqs": 256,
        "enable_prefix_caching": True,
        "worker_extension_cls": "rollout.vllm_engine.CispoWorkerExtension",
        "logprobs_mode": "processed_logprobs",
        "skip_tokenizer_init": True,
    }


def test_llm_kwargs_everything_set():
    kwargs = ve.llm_kwargs(
        "/ckpt", dtype="float32", seed=7, tensor_parallel_size=8, gpu_memory_utilization=0.6,
        max_batch_size=64, enable_prefix_caching=False, max_model_len=4096, record_routing=True,
        extra={"enforce_eager": True, "skip_tokenizer_init": False},
    )  # fmt: skip
    assert kwargs == {
        "model": "/ckpt",
        "dtype": "float32",
        "seed": 7,
        "tensor_parallel_size": 8,
        "gpu_memory_utilization": 0.6,
        "max_num_seqs": 64,
        "enable_prefix_caching": False,
        "worker_extension_cls": "rollout.vllm_engine.CispoWorkerExtension",
        "logprobs_mode": "processed_logprobs",
        "skip_tokenizer_init": False,
        "max_model_len": 4096,
        "enable_return_routed_experts": True,
        "enforce_eager": True,
    }


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: ve.llm_kwargs("/c", extra={"logprobs_mode": "raw_logprobs"}), "set by the engine"),
        (lambda: ve.llm_kwargs("/c", extra={"model": object()}), "set by the engine"),
        (lambda: ve.llm_kwargs(None), "model_path is required"),
        (lambda: ve.llm_kwargs("/c", tensor_parallel_size=0), ">= 1"),
        (lambda: ve.llm_kwargs("/c", gpu_memory_utilization=1.5), "gpu_memory_utilization"),
    ],
)
def test_llm_kwargs_refusals(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_sampling_kwargs():
    params = SamplingParams(
        max_new_tokens=32, temperature=0.7, top_p=0.9, top_k=0, eos_token_ids=(2, 5), seed=11
    )
    assert ve.sampling_kwargs(params, 3) == {
        "n": 1,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": -1,
        "max_tokens": 32,
        "stop_token_ids": [2, 5],
        "ignore_eos": True,
        "logprobs": 0,
        "detokenize": False,
        "seed": 14,
    }
    unseeded = ve.sampling_kwargs(SamplingParams(top_k=20), 0)
    assert unseeded["top_k"] == 20 and unseeded["seed"] is None and unseeded["stop_token_ids"] == []


# -------------------------------------------------------------------------------------- weight names


def _saved(model: nn.Module, tmp_path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    model.save_pretrained(tmp_path)
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(tmp_path.glob("*.safetensors")):
        out.update(load_file(str(shard)))
    return out


SMALL_MOE = {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2, "head_dim": 8}


@pytest.mark.parametrize(
    "family, overrides",
    [
        ("qwen2", {}),
        ("qwen2", {"tie_word_embeddings": True}),
        ("llama", {}),
        ("qwen3_moe", {**SMALL_MOE, "intermediate_size": 64, "moe_intermediate_size": 16, "num_experts": 4}),
        ("minimax", {"vocab_size": 64}),
    ],
)
def test_checkpoint_names_match_what_save_pretrained_writes(family, overrides, tmp_path):
    """What load_weights gets after a sync == what vLLM read from the checkpoint at start (the directory
    the engine is given: for MiniMax, engine_dir's layout without the derived lightning buffers)."""
    from safetensors.torch import load_file

    from cispo.models.loading import engine_dir

    model = tiny_lm(family, **overrides)
    _saved(model, tmp_path / "saved")
    on_disk = {}
    for shard in sorted(engine_dir(tmp_path / "saved", cache=tmp_path / "cache").glob("*.safetensors")):
        on_disk.update(load_file(str(shard)))
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    model_type = model.config.model_type
    mapped = dict(ve.checkpoint_names(model.state_dict().items(), tied=tied, model_type=model_type))
    assert sorted(mapped) == sorted(on_disk)
    for name, tensor in on_disk.items():
        assert torch.equal(mapped[name], tensor), name


def test_checkpoint_names_strip_wrapper_prefixes():
    t = torch.zeros(1)
    names = [n for n, _ in ve.checkpoint_names([
        ("module.model.norm.weight", t), ("_orig_mod.lm_head.weight", t),
        ("model.layers.0._checkpoint_wrapped_module.mlp.up_proj.weight", t),
    ])]  # fmt: skip
    assert names == ["model.norm.weight", "lm_head.weight", "model.layers.0.mlp.up_proj.weight"]


# ------------------------------------------------------------------------------------- wire format


def test_metas_round_trip_through_plain_values():
    sd = {"a": torch.zeros(2, 3, dtype=torch.bfloat16), "b": torch.zeros(4, dtype=torch.float32)}
    wire = ve.metas_to_wire(state_dict_metas(sd))
    assert wire == [("a", [2, 3], "bfloat16"), ("b", [4], "float32")]
    assert ve.metas_from_wire(wire) == state_dict_metas(sd)
    with pytest.raises(ValueError, match="unknown dtype"):
        ve.metas_from_wire([("x", [1], "Tensor")])


def test_packed_buckets_carry_every_tensor_exactly():
    model = tiny_lm("qwen2", tie_word_embeddings=True)  # tied: two names, one storage
    sd = model.state_dict()
    blobs = list(ve.packed_buckets(sd, bucket_bytes=8192))
    assert len(blobs) > 1 and all(isinstance(b, bytes) for b in blobs)
    back: dict[str, torch.Tensor] = {}
    for blob in blobs:
        back.update(ve.unpack_weights(blob))
    assert sorted(back) == sorted(sd)
    assert all(torch.equal(back[n], sd[n]) for n in sd)
    bf16 = ve.unpack_weights(ve.pack_weights({"w": sd["model.norm.weight"].bfloat16()}))["w"]
    assert bf16.dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------- FP32 head


def _install(model: FakeVllmLM, source: torch.Tensor) -> None:
    with torch.no_grad():
        model.load_weights([("lm_head.weight", source), ("model.norm.weight", torch.eye(H) * 0.5)])
    ve.install_fp32_head(model, source)


def test_fp32_head_logits_equal_an_fp32_matmul_while_the_body_is_bf16():
    model = FakeVllmLM()
    source = full_head(0)
    ids = torch.arange(8) % V
    embed = torch.randn(V, H, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        model.load_weights([
            ("lm_head.weight", source), ("model.norm.weight", torch.eye(H) * 0.5),
            ("model.embed_tokens.weight", embed),
        ])  # fmt: skip
        hidden = model.hidden(ids)
        assert hidden.dtype == torch.bfloat16
        reference = hidden.float() @ source.T
        before = model.compute_logits(hidden).float()
        ve.install_fp32_head(model, source)
        after = model.compute_logits(hidden)
    assert after.dtype == torch.float32 and after.shape == (8, V)
    assert float((after - reference).abs().max()) < 1e-6
    assert float((before - reference).abs().max()) > 1e-3  # the bf16 head really differs
    assert model.logits_processor.gathers == 2  # vLLM's gather still runs
    assert model.lm_head.weight.dtype == torch.bfloat16  # the module itself is untouched


def test_fp32_head_is_refreshed_by_load_weights_and_kept_otherwise():
    model = FakeVllmLM()
    _install(model, full_head(0))
    head = model._cispo_fp32_head
    new = full_head(1)
    # A one-shot iterable, as vLLM's loader passes.
    model.load_weights(iter([("lm_head.weight", new), ("model.norm.weight", torch.eye(H))]))
    assert torch.equal(head.weight[:V], new) and not head.weight[V:].any()
    assert model.loaded[-2:] == ["lm_head.weight", "model.norm.weight"]  # everything still reached the model
    model.load_weights([("model.norm.weight", torch.eye(H) * 2)])  # no head in this bucket: kept
    assert torch.equal(head.weight[:V], new)
    hidden = torch.randn(3, H).bfloat16()
    torch.testing.assert_close(model.compute_logits(hidden), hidden.float() @ new.T, atol=1e-6, rtol=0)
    assert ve.install_fp32_head(model) is head  # idempotent: no second wrapper


def test_fp32_head_tied_to_the_embedding():
    model = FakeVllmLM(tied=True)
    assert ve.head_weight_names(model) == ["model.embed_tokens.weight", "lm_head.weight"]
    ve.install_fp32_head(model)
    pointer = model.model.embed_tokens.weight.data_ptr()
    new = full_head(2)
    model.load_weights([("model.embed_tokens.weight", new)])
    assert torch.equal(model._cispo_fp32_head.weight[:V], new)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16  # the embedding lookup stays bf16
    assert model.model.embed_tokens.weight.data_ptr() == pointer  # same storage (CUDA graphs hold it)


def test_fp32_head_takes_this_ranks_vocabulary_shard():
    model = FakeVllmLM()
    model.lm_head.shard_indices = types.SimpleNamespace(org_vocab_start_index=5, org_vocab_end_index=10)
    head = ve.install_fp32_head(model, full := full_head(3))
    assert torch.equal(head.weight[:5], full[5:10]) and not head.weight[5:].any()
    with pytest.raises(ValueError, match="does not fit"):
        head.set_full(torch.zeros(V, H + 1))


def test_fp32_head_leaves_other_heads_and_refuses_non_vllm_modules():
    model = FakeVllmLM()
    ve.install_fp32_head(model, full_head(0))
    other = FakeHead(V_PADDED, torch.bfloat16)
    hidden = torch.randn(2, H).bfloat16()
    assert model.logits_processor(other, hidden).dtype == torch.bfloat16  # the original path
    with pytest.raises(ValueError, match="lm_head"):
        ve.install_fp32_head(nn.Linear(2, 2))


# -------------------------------------------------------------------------------------------- routing


def test_routing_rows():
    prompt, sampled, layers, top_k = 3, 4, 2, 2
    routed = np.arange((prompt + sampled - 1) * layers * top_k, dtype=np.int16).reshape(-1, layers, top_k) % 8
    rows = ve.routing_rows(routed, prompt, sampled, torch.int8)
    assert rows.shape == (prompt + sampled, layers, top_k) and rows.dtype == torch.int8
    assert torch.equal(rows[:-1], torch.as_tensor(routed).to(torch.int8))
    assert (rows[-1] == NO_CHOICE).all()
    cut = ve.routing_rows(routed, prompt, 2, torch.int8)  # response cut by the repetition stop
    assert cut.shape[0] == prompt + 2 and torch.equal(cut[:4], rows[:4]) and (cut[-1] == NO_CHOICE).all()
    with pytest.raises(RuntimeError, match="no routed_experts"):
        ve.routing_rows(None, prompt, sampled, torch.int8)
    with pytest.raises(ValueError, match="were fed"):
        ve.routing_rows(routed[:2], prompt, sampled, torch.int8)


def test_num_experts_of():
    ns = types.SimpleNamespace
    assert ve.num_experts_of(ns(num_experts=8)) == 8
    assert ve.num_experts_of(ns(num_local_experts=32)) == 32
    assert ve.num_experts_of(ns(n_routed_experts=256)) == 256
    assert ve.num_experts_of(ns(hidden_size=4)) is None


# ------------------------------------------------- the engine over a fake vllm with the real worker extension


class FakeWorker(ve.CispoWorkerExtension):
    def __init__(self, model: FakeVllmLM) -> None:
        hf_config = types.SimpleNamespace(tie_word_embeddings=False, model_type="qwen2")
        config = types.SimpleNamespace(hf_config=hf_config)
        self.vllm_config = types.SimpleNamespace(model_config=config)
        self.model_runner = types.SimpleNamespace(model=model, model_config=config)
        self.device = "cpu"


class FakeLLM:
    last: FakeLLM | None = None

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.worker = FakeWorker(FakeVllmLM())
        self.calls: list[str] = []
        self.resets = 0
        self.outputs: list = []
        FakeLLM.last = self

    def collective_rpc(self, method, args=()):
        self.calls.append(method)
        return [getattr(self.worker, method)(*args)]

    def reset_prefix_cache(self):
        self.resets += 1

    def generate(self, requests, sampling, use_tqdm=False):
        return self.outputs


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.LLM = FakeLLM
    module.SamplingParams = lambda **kw: kw
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = lambda prompt_token_ids: {"prompt_token_ids": prompt_token_ids}
    module.inputs = inputs
    parallel_state = types.ModuleType("vllm.distributed.parallel_state")
    parallel_state.get_world_group = lambda: types.SimpleNamespace(rank=0)
    for name, mod in {"vllm": module, "vllm.inputs": inputs, "vllm.distributed": types.ModuleType("d"),
                      "vllm.distributed.parallel_state": parallel_state}.items():  # fmt: skip
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    return module


def _checkpoint(tmp_path, head: torch.Tensor) -> str:
    from safetensors.torch import save_file

    save_file({"lm_head.weight": head.contiguous()}, str(tmp_path / "model.safetensors"))
    return str(tmp_path)


def test_engine_builds_installs_the_checkpoint_head_and_loads_buckets(fake_vllm, tmp_path):
    head = full_head(4)
    engine = ve.VLLMEngine(model_path=_checkpoint(tmp_path, head), tensor_parallel_size=1, enforce_eager=True)
    llm = FakeLLM.last
    assert llm.kwargs["enforce_eager"] is True and llm.kwargs["worker_extension_cls"] == ve._EXTENSION
    assert engine.fp32_head_from_checkpoint == [True]
    model = llm.worker.model_runner.model
    assert torch.equal(model._cispo_fp32_head.weight[:V], head)  # unrounded, from the checkpoint
    new = {"module.lm_head.weight": full_head(5), "model.norm.weight": torch.eye(H)}
    engine.bucket_bytes = 256  # smaller than one head: one bucket per tensor
    engine.load_weights(new, version=3)
    assert llm.calls.count("cispo_load_packed") == 2 and llm.resets == 1 and engine.version == 3
    assert torch.equal(model._cispo_fp32_head.weight[:V], new["module.lm_head.weight"])
    assert torch.equal(model.model.norm.weight, torch.eye(H).bfloat16())


def test_engine_generation_routing_and_repetition_cut(fake_vllm, tmp_path, monkeypatch):
    engine = ve.VLLMEngine(model_path=_checkpoint(tmp_path, full_head(0)), fp32_head=False)
    engine.record_routing, engine._routing_dtype = True, torch.int8
    lp = types.SimpleNamespace
    completion = lp(
        token_ids=[4, 4, 4, 4],
        logprobs=[{4: lp(logprob=-1e-4)} for _ in range(4)],
        finish_reason="length",
        routed_experts=np.ones((2 + 4 - 1, 3, 2), dtype=np.int16),
    )
    FakeLLM.last.outputs = [lp(outputs=[completion])]
    params = SamplingParams(max_new_tokens=4, repetition_stop_tokens=2, repetition_prob=0.99)
    (gen,) = engine.generate([[1, 2]], params)
    assert gen.response_ids == [4, 4] and gen.finish_reason == "repetition"
    assert gen.routed_experts.shape == (4, 3, 2) and (gen.routed_experts[-1] == NO_CHOICE).all()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_worker_broadcast_path_passes_bucket_bytes_to_the_engine(fake_vllm, tmp_path):
    """Learner rank 0 broadcasts over gloo with a small bucket size; the RolloutWorker hands that size to the
    vLLM engine, whose extension receives with the same bucket plan and loads bucket by bucket."""
    worker = RolloutWorker("vllm", {"model_path": _checkpoint(tmp_path, full_head(0))})
    engine, llm = worker.engine, FakeLLM.last
    state = {"lm_head.weight": full_head(6), "model.norm.weight": torch.eye(H) * 3}
    port, errors = _free_port(), []

    def sender():
        try:
            group = init_weight_group("127.0.0.1", port, 0, 2, "gloo", timeout_s=60)
            broadcast_state_dict(group, state, "cpu", bucket_bytes=256)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    thread = threading.Thread(target=sender)
    thread.start()
    worker.init_weight_group("127.0.0.1", port, 1, 2, "gloo")
    loads: list[int] = []
    model = llm.worker.model_runner.model
    original = model.load_weights
    model.load_weights = lambda weights: loads.append(len(list_ := list(weights))) or original(list_)
    worker.receive_weights(state_dict_metas(state), version=5, bucket_bytes=256)
    thread.join(60)
    assert not errors
    assert loads == [1, 1]  # two buckets at 256 bytes, loaded one at a time
    assert engine.version == 5 and llm.resets == 1
    assert torch.equal(model._cispo_fp32_head.weight[:V], state["lm_head.weight"])
    assert torch.equal(model.model.norm.weight.float(), state["model.norm.weight"])
