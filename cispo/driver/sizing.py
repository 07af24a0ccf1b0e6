"""The arithmetic behind `cispo-plan`: model shapes, GPUs, memory terms and FLOPs. No config, no printing.

Parameters (what transformers' MiniMaxForCausalLM and the usual dense / MoE decoders hold), with
h = hidden size, q = heads x head_dim, kv = kv_heads x head_dim, f = the MLP's (one expert's) width,
E experts (1: a dense MLP, no router), top-k, V vocabulary:
  softmax-attention mixer   h*q + 2*h*kv + q*h                      (q, k, v, o projections)
  lightning mixer           3*h*q + q*h + h*q + q                   (qkv, out, output gate, norm)
  every layer               + 2h (two RMSNorms) + h*E (router, E > 1) + E * 3*h*f (SwiGLU experts)
  model                     + V*h (embedding) + V*h (head, unless tied) + h (final norm)
Active per token: the same with top-k experts instead of E; "active" excludes embedding and head (as the
MiniMax-M1 report counts 45.9B), while the FLOP count adds the head's V*h matmul.

Learner activations per rank, in the model dtype's bytes (a), for a micro-batch of T tokens. Elements
kept per token and layer (an estimate in the spirit of Korthikanti et al. 2022, flash/SDPA attention so
no T^2 term, no dropout):
  every layer       4h                     (two norm inputs, two norm outputs)
  softmax layer     + 2q + 2kv             (q, k, v, attention output)
  lightning layer   + 8q + H*(d*d/B + 2B)  (qkv before and after SiLU, output, gate; per block of B
                                            tokens its H x d x d state and two H x B x B score tiles)
  MoE / MLP         + E (router logits, E > 1) + k*(2h + 4f)  (each chosen expert's input and output,
                                            gate, up, SiLU and product)
  without recompute  A = T * a * (sum of that over the layers)
  with recompute     A = T * a * (L*h + the largest layer's count)   (per-layer checkpoints: each layer's
                                            input, plus one layer rebuilt in full during backward)
The FP32 log-prob head (cispo.algo.logprobs) adds T*h*4 (hidden states kept in FP32) + 3*c*V*4 (one
chunk of c rows: logits, softmax, gradient).

Sequence parallelism (Ulysses, learner.sequence_parallel_size = S; num_ranks = DP x S): each rank of an
S-group holds T/S tokens of the micro-batch, so the activations and the log-prob head above are taken at
T/S tokens. Around attention an all-to-all swaps the sequence split for a head split: the rank then runs
attention over the full sequence for H/S heads (S divides H; KV heads fewer than S, or not divisible by
it, are replicated first, as cispo/learner/sequence_parallel.py does), which is the same number of
elements (T x q/S = T/S x q) and, with flash/SDPA or lightning blocks, no T^2 term; the
lightning per-block d x d states and B x B tiles are per head, so they divide by S too. What SP adds is
the all-to-all's receive buffer, one layer at a time: T/S x (q + 2kv) (softmax) or T/S x 3q (lightning)
elements ("Ulysses buffers"). Parameters, gradients and Adam states stay partitioned (ZeRO) over all
num_ranks = DP x S ranks, as without SP.
Ulysses traffic per attention layer (softmax and lightning alike): forward, q, k, v in (q + 2kv elements
per token, kv after that replication; 3q for lightning, which has no GQA) and the output back (q);
backward the same again; with
recompute the forward's once more. Each rank sends (S-1)/S of the tensors it holds (the 1/S kept for its
own heads stays put) and receives as much.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

GIB = 1024**3


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gib: float  # what the driver reports as total (nvidia-smi MiB / 1024)
    bf16_tflops: float  # dense (no sparsity) BF16 peak, TFLOP/s
    hbm_tb_s: float  # memory bandwidth, TB/s
    # NVLink bandwidth per GPU and direction, GB/s: what the learner's sequence-parallel all-to-alls run
    # at, since an SP group sits inside one node (SP divides gpus_per_node). Peak: NCCL's all-to-all gets
    # less, so the all-to-all time is a lower bound (plan.sp_bandwidth_gb_s sets another figure).
    nvlink_gb_s: float = 450.0


# SXM parts. H100 80 GB: 81559 MiB, 989 TFLOP/s, 3.35 TB/s; H200 141 GB: 143771 MiB, same compute,
# 4.8 TB/s; B200 (HGX) 180 GB: 183359 MiB, 2.25 PFLOP/s dense BF16, 8 TB/s. NVLink: H100 / H200 NVLink 4,
# 900 GB/s per GPU both directions together (450 each way); B200 NVLink 5, 1.8 TB/s (900 each way).
GPUS: dict[str, Gpu] = {
    "H100": Gpu("H100", 79.6, 989.4, 3.35, 450.0),
    "H200": Gpu("H200", 140.4, 989.4, 4.8, 450.0),
    "B200": Gpu("B200", 179.1, 2250.0, 8.0, 900.0),
}


@dataclass(frozen=True)
class Arch:
    name: str
    hidden: int
    layer_types: tuple[str, ...]  # per layer: "full" (softmax attention) or "linear" (lightning)
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int  # one expert's (or the dense MLP's) SwiGLU width
    vocab: int
    experts: int = 1  # 1: a dense MLP without a router
    top_k: int = 1
    tied: bool = False
    block_size: int = 256  # lightning attention's block
    published: str = ""  # public figures, printed next to the computed ones

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def count(self, kind: str) -> int:
        return sum(1 for t in self.layer_types if t == kind)


def _minimax01(name: str) -> Arch:
    # MiniMax-Text-01 / M1 config.json: hidden_size 6144, intermediate_size 9216, num_hidden_layers 80,
    # num_attention_heads 64, num_key_value_heads 8, head_dim 128, num_local_experts 32,
    # num_experts_per_tok 2, vocab_size 200064, attn_type_list [0]*7+[1] repeated (1: softmax).
    layers = ("linear",) * 7 + ("full",)
    return Arch(
        name, 6144, layers * 10, 64, 8, 128, 9216, 200064, experts=32, top_k=2, block_size=256,
        published="456B total, 45.9B active (MiniMax-M1 report)",
    )  # fmt: skip


# Architectures cispo-plan knows without loading a config (hub ids that may not load offline).
KNOWN_ARCHS: dict[str, Arch] = {
    "MiniMaxAI/MiniMax-Text-01": _minimax01("MiniMax-Text-01"),
    "MiniMaxAI/MiniMax-M1-40k": _minimax01("MiniMax-M1-40k"),
    "MiniMaxAI/MiniMax-M1-80k": _minimax01("MiniMax-M1-80k"),
    "smollm2_gguf": Arch(
        "SmolLM2-135M-Instruct", 576, ("full",) * 30, 9, 3, 64, 1536, 49152, tied=True, published="135M"
    ),
}


def arch_from_hf_config(config: object, name: str) -> Arch:
    """An Arch from a transformers config (MiniMax, Llama/Qwen-style dense, Mixtral/Qwen-MoE-style)."""
    get = lambda key, default=None: getattr(config, key, None) or default  # noqa: E731
    hidden, layers, heads = get("hidden_size"), get("num_hidden_layers"), get("num_attention_heads")
    if get("layer_types"):
        types = tuple("linear" if "linear" in t else "full" for t in get("layer_types"))
    elif get("attn_type_list"):
        types = tuple("full" if t == 1 else "linear" for t in get("attn_type_list"))
    else:
        types = ("full",) * layers
    experts = int(get("num_local_experts") or get("num_experts") or 1)
    width = get("moe_intermediate_size") if experts > 1 and get("moe_intermediate_size") else None
    return Arch(
        name=name, hidden=hidden, layer_types=types, heads=heads,
        kv_heads=get("num_key_value_heads", heads), head_dim=get("head_dim", hidden // heads),
        intermediate=width or get("intermediate_size"), vocab=get("vocab_size"), experts=experts,
        top_k=int(get("num_experts_per_tok", 1)), tied=bool(getattr(config, "tie_word_embeddings", False)),
        block_size=int(get("block_size", 256)),
    )  # fmt: skip


# ---------------------------------------------------------------- parameters


def mixer_params(arch: Arch, kind: str) -> int:
    h, q, kv = arch.hidden, arch.q_dim, arch.kv_dim
    return 5 * h * q + q if kind == "linear" else 2 * h * q + 2 * h * kv


def layer_params(arch: Arch, kind: str, experts: int) -> int:
    router = arch.hidden * arch.experts if arch.experts > 1 else 0
    return mixer_params(arch, kind) + 2 * arch.hidden + router + experts * 3 * arch.hidden * arch.intermediate


def total_params(arch: Arch) -> int:
    body = sum(layer_params(arch, t, arch.experts) for t in arch.layer_types) + arch.hidden
    return body + arch.vocab * arch.hidden * (1 if arch.tied else 2)


def active_params(arch: Arch) -> int:
    """Per token, without embedding and head (the report's convention)."""
    return sum(layer_params(arch, t, arch.top_k) for t in arch.layer_types) + arch.hidden


def flop_params(arch: Arch) -> int:
    """The matmul parameters a token passes through: active plus the LM head."""
    return active_params(arch) + arch.vocab * arch.hidden


# ---------------------------------------------------------------- learner memory


def layer_activation_elems(arch: Arch, kind: str) -> float:
    h, q, kv, d, b = arch.hidden, arch.q_dim, arch.kv_dim, arch.head_dim, arch.block_size
    mixer = 8 * q + arch.heads * (d * d / b + 2 * b) if kind == "linear" else 2 * q + 2 * kv
    router = arch.experts if arch.experts > 1 else 0
    return 4 * h + mixer + router + arch.top_k * (2 * h + 4 * arch.intermediate)


def activation_bytes(arch: Arch, tokens: int, act_bytes: int, recompute: bool) -> float:
    per_layer = [layer_activation_elems(arch, t) for t in arch.layer_types]
    if recompute:
        return tokens * act_bytes * (len(per_layer) * arch.hidden + max(per_layer))
    return tokens * act_bytes * sum(per_layer)


def head_bytes(arch: Arch, tokens: int, chunk: int) -> float:
    return tokens * arch.hidden * 4 + 3 * min(chunk, tokens) * arch.vocab * 4


@dataclass(frozen=True)
class LearnerSetup:
    backend: str  # "deepspeed" (ZeRO over `ranks`) or "torch" (one process)
    ranks: int
    zero_stage: int
    bf16: bool
    offload_optimizer: bool
    tokens: int  # tokens of the largest micro-batch a rank runs
    recompute: bool
    chunk: int  # learner.logprob_chunk_size
    sp: int = 1  # learner.sequence_parallel_size: a rank holds tokens / sp of each micro-batch


# DeepSpeed defaults: stage3_max_live_parameters 1e9, reduce / allgather buckets 5e8 elements.
ZERO_BUFFER_ELEMS = {0: 5e8, 1: 1e9, 2: 1e9, 3: 1.5e9}


def learner_memory(arch: Arch, s: LearnerSetup) -> dict[str, float]:
    """Bytes per GPU (per rank), term by term. DeepSpeed bf16: 2 (bf16 params) + 2 (bf16 grads) + 12
    (fp32 master, m, v) bytes per parameter; fp32: 4 + 4 + 8. ZeRO-1 shards the optimizer states over
    the ranks, ZeRO-2 also the gradients, ZeRO-3 also the parameters. torch: one process, AdamW's two
    moments in the parameters' dtype (4 x 2 or 4 x 4 bytes per parameter)."""
    p, b = total_params(arch), (2 if s.bf16 else 4)
    n = s.ranks if s.backend == "deepspeed" else 1
    if s.backend == "deepspeed":
        optim = (12 if s.bf16 else 8) * p
        shard = {
            "parameters": s.zero_stage >= 3,
            "gradients": s.zero_stage >= 2,
            "optimizer": s.zero_stage >= 1,
        }
        terms = {
            "parameters": b * p / (n if shard["parameters"] else 1),
            "gradients": b * p / (n if shard["gradients"] else 1),
            "optimizer states": 0.0 if s.offload_optimizer else optim / (n if shard["optimizer"] else 1),
            "ZeRO buffers": b * min(ZERO_BUFFER_ELEMS[s.zero_stage], p),
        }
    else:
        terms = {"parameters": b * p, "gradients": b * p, "optimizer states": 2 * b * p}
    local = ceil_div(s.tokens, s.sp)  # the tokens of the micro-batch this rank holds
    terms["activations"] = activation_bytes(arch, local, b, s.recompute)
    terms["log-prob head"] = head_bytes(arch, local, s.chunk)
    if s.sp > 1:
        terms["Ulysses buffers"] = ulysses_buffer_bytes(arch, local, s.sp, b)
    return terms


# ---------------------------------------------------------------- sequence parallelism (Ulysses)


def exchanged_kv_heads(arch: Arch, sp: int) -> int:
    """KV heads a softmax layer exchanges: replicated to sp (or, failing that, to one per query head) when
    sp does not divide them, as cispo.learner.sequence_parallel does so each rank gets its heads' K, V."""
    if arch.kv_heads % sp == 0:
        return arch.kv_heads
    return sp if sp % arch.kv_heads == 0 else arch.heads


def ulysses_in_out_elems(arch: Arch, kind: str, sp: int) -> tuple[int, int]:
    """Elements per token an attention layer's all-to-alls move: (q, k, v in; the output back)."""
    q, kv = arch.q_dim, exchanged_kv_heads(arch, sp) * arch.head_dim
    return (3 * q if kind == "linear" else q + 2 * kv), q


def ulysses_buffer_bytes(arch: Arch, local_tokens: int, sp: int, act_bytes: int) -> float:
    """The all-to-all's receive buffer for the widest layer's q, k, v (one layer at a time)."""
    widest = max(ulysses_in_out_elems(arch, kind, sp)[0] for kind in set(arch.layer_types))
    return local_tokens * widest * act_bytes


def ulysses_bytes(arch: Arch, local_tokens: float, sp: int, act_bytes: int, recompute: bool) -> float:
    """Bytes one rank sends (and as many it receives) in all-to-alls for `local_tokens` tokens it holds,
    forward and backward (and the forward again under recompute), over every attention layer."""
    if sp <= 1:
        return 0.0
    per_token = sum(sum(ulysses_in_out_elems(arch, kind, sp)) for kind in arch.layer_types)
    passes = 3 if recompute else 2
    return (sp - 1) / sp * local_tokens * act_bytes * per_token * passes


def smallest_sp(
    arch: Arch, s: LearnerSetup, gpus_per_node: int, limit: float
) -> tuple[int | None, dict[str, float]]:
    """The smallest sequence-parallel size whose learner memory fits `limit` bytes, and that memory;
    (None, the memory at the largest candidate) when none does."""
    memory: dict[str, float] = {}
    for sp in sp_candidates(s.ranks, gpus_per_node, arch):
        memory = learner_memory(arch, replace(s, sp=sp))
        if over(memory, limit) is None:
            return sp, memory
    return None, memory


def sp_candidates(ranks: int, gpus_per_node: int, arch: Arch) -> list[int]:
    """Sequence-parallel sizes possible: powers of 2 dividing the ranks, the GPUs of a node (an SP group
    stays on NVLink; 0, a CPU cluster, does not bound it) and the attention heads (KV heads replicate)."""
    bounds = [ranks, arch.heads] + ([gpus_per_node] if gpus_per_node > 0 else [])
    out, sp = [], 1
    while all(n % sp == 0 for n in bounds):
        out.append(sp)
        sp *= 2
    return out


def micro_batch_tokens(budget_tokens: int, row_tokens: int) -> int:
    """The largest micro-batch token_budget_chunks makes of equal rows: as many as fit, at least one."""
    return max(1, budget_tokens // row_tokens) * row_tokens


# ---------------------------------------------------------------- rollout memory


@dataclass(frozen=True)
class RolloutSetup:
    tp: int  # tensor-parallel size of one engine
    dtype_bytes: int
    concurrent: int  # sequences one engine holds at once
    tokens: int  # prompt + generation budget
    usable_fraction: float  # of GPU memory (vLLM's gpu_memory_utilization)


def kv_bytes_per_token(arch: Arch, tp: int, dtype_bytes: int) -> float:
    """Softmax layers' K and V on one GPU; vLLM replicates KV heads when tp exceeds them."""
    heads_per_gpu = max(1, arch.kv_heads // tp)
    return arch.count("full") * 2 * heads_per_gpu * arch.head_dim * dtype_bytes


def linear_state_bytes(arch: Arch, tp: int, dtype_bytes: int) -> float:
    """Lightning layers' fixed H x d x d state per sequence on one GPU (heads split over tp)."""
    return arch.count("linear") * (arch.heads // tp) * arch.head_dim**2 * dtype_bytes


def rollout_memory(arch: Arch, s: RolloutSetup) -> dict[str, float]:
    """Bytes per GPU of one engine, term by term."""
    return {
        "weights": total_params(arch) * s.dtype_bytes / s.tp,
        "KV cache": s.concurrent * s.tokens * kv_bytes_per_token(arch, s.tp, s.dtype_bytes),
        "lightning state": s.concurrent * linear_state_bytes(arch, s.tp, s.dtype_bytes),
    }


# ---------------------------------------------------------------- FLOPs and time


def attention_train_flops(arch: Arch, seq: int) -> float:
    """Forward + backward (3x forward) attention FLOPs of one sequence beyond the projections: causal
    softmax 2*q*S^2 per layer (QK^T and AV, half the square each); lightning q*(4d + 2B) per token
    (the d x d state update and read, the intra-block scores)."""
    full = arch.count("full") * 2 * arch.q_dim * seq**2
    linear = arch.count("linear") * arch.q_dim * (4 * arch.head_dim + 2 * arch.block_size) * seq
    return 3 * (full + linear)


def generation_flops(arch: Arch, prompt: int, new: int) -> float:
    """One sequence: 2 x (active + head) per token, prefill included; decode attention reads the p + t
    cached keys at step t (4*q each per softmax layer) and the d x d state (4*q*d per lightning layer)."""
    matmul = 2 * flop_params(arch) * (prompt + new)
    full = arch.count("full") * 4 * arch.q_dim * (prompt * new + new * (new - 1) / 2)
    linear = arch.count("linear") * 4 * arch.q_dim * arch.head_dim * new
    return matmul + full + linear


def seconds(flops: float, devices: int, gpu: Gpu, mfu: float) -> float:
    return flops / (devices * gpu.bf16_tflops * 1e12 * mfu)


def decode_read_bytes(arch: Arch, s: RolloutSetup, live_tokens: float) -> float:
    """Bytes one GPU reads per decode step: its weights, except the experts no sequence in the batch
    routed to (each of E experts is missed by one token with probability 1 - k/E), and the live cache."""
    expert = len(arch.layer_types) * arch.experts * 3 * arch.hidden * arch.intermediate
    touched = 1 - (1 - arch.top_k / arch.experts) ** s.concurrent if arch.experts > 1 else 1.0
    weights = (total_params(arch) - expert * (1 - touched)) * s.dtype_bytes / s.tp
    per_seq = linear_state_bytes(arch, s.tp, s.dtype_bytes) + live_tokens * kv_bytes_per_token(
        arch, s.tp, s.dtype_bytes
    )
    return weights + s.concurrent * per_seq


def decode_bound_seconds(waves: int, new: int, bytes_per_step: float, gpu: Gpu) -> float:
    """HBM lower bound of decoding: every step reads the GPU's weights and its live cache once."""
    return waves * new * bytes_per_step / (gpu.hbm_tb_s * 1e12)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b) if b > 0 else 0


def over(terms: dict[str, float], limit: float) -> str | None:
    """None when the terms fit in `limit` bytes, else what does not fit: the first term that alone
    exceeds it, or the total with its largest term."""
    for name, value in terms.items():
        if value > limit:
            return f"{name} {value / GIB:.1f} GiB > {limit / GIB:.1f} GiB"
    total = sum(terms.values())
    if total > limit:
        name = max(terms, key=lambda k: terms[k])
        return (
            f"total {total / GIB:.1f} GiB > {limit / GIB:.1f} GiB "
            f"(largest: {name} {terms[name] / GIB:.1f} GiB)"
        )
    return None
