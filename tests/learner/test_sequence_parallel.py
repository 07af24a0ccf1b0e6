"""Sequence parallelism (learner.sequence_parallel_size): the all-to-all exchange and Ulysses attention in
two gloo processes, the shard/shift helpers, and the DeepSpeed learner with SP 2 against the
single-process torch learner (tiny hybrid MiniMax and dense Qwen2, T = 2048 and an odd T)."""

from __future__ import annotations

import copy
import dataclasses
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cispo.algo.logprobs import sequence_logprobs
from cispo.core.config import AlgorithmConfig, LearnerConfig
from cispo.core.moe import replay_routing
from cispo.core.testing import tiny_lm
from cispo.core.types import Sample, TrainBatch
from cispo.driver.batch import build_train_batch
from cispo.learner import build_learner
from cispo.learner import sequence_parallel as sp
from cispo.learner import sp_packing as spp
from cispo.learner.micro_batches import plan_micro_batches
from cispo.learner.packing import pack_rows
from tests.learner.helpers import tiny_minimax

os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "cispo" / "torch_extensions"))

# One AdamW step (eps 1e-15, lr 1e-2) moves each weight by ~lr * sign(grad): a wrong gradient shows as
# O(1e-2); SP only reorders fp32 sums (measured: loss 4e-9, weights 1.3e-6, log-probs 1e-6).
ATOL = 1e-5


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _exchange_worker(rank: int, size: int, port: int) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=size)
    try:
        exchange = sp.UlyssesExchange(sp.sequence_groups(rank, size, size), size, rank)
        _check_exchange(exchange, rank, size)
        for kv_heads, cu_seqlens in ((2, None), (1, None), (2, torch.tensor([0, 3, 9, 10]))):
            _check_attention(exchange, rank, size, kv_heads, cu_seqlens)
    finally:
        dist.destroy_process_group()


def _check_exchange(exchange: sp.UlyssesExchange, rank: int, size: int) -> None:
    gen = torch.Generator().manual_seed(1)
    full = torch.randn(2, 4, 10, 3, generator=gen, dtype=torch.float64)  # [B, H, T, d], same on all ranks
    c = 10 // size
    local = full[:, :, rank * c : (rank + 1) * c]
    h0, h1 = exchange.head_range(4)
    assert (h0, h1) == (rank * 2, rank * 2 + 2)
    scattered = exchange.scatter_heads(local)
    torch.testing.assert_close(scattered, full[:, h0:h1], atol=0, rtol=0)  # every column, my heads
    torch.testing.assert_close(exchange.gather_heads(scattered), local, atol=0, rtol=0)
    # The backward of scatter is gather: d/dx sum(w * scatter(x)) = the local columns of w, all heads.
    x = local.clone().requires_grad_()
    weights = torch.randn(2, 4, 10, 3, generator=gen, dtype=torch.float64)
    (exchange.scatter_heads(x) * weights[:, h0:h1]).sum().backward()
    torch.testing.assert_close(x.grad, weights[:, :, rank * c : (rank + 1) * c], atol=0, rtol=0)


def _check_attention(
    exchange: sp.UlyssesExchange, rank: int, size: int, kv_heads: int, cu_seqlens: torch.Tensor | None
) -> None:
    """Ulysses attention over column shards == full attention (forward and gradients) on every rank.
    kv_heads 1 < SP: replicated. cu_seqlens: block-diagonal causal against each segment on its own."""
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, 10, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, kv_heads, 10, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, kv_heads, 10, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    if cu_seqlens is None:
        reference = sp.causal_attention(q, k, v, 0.3, None)
    else:
        bounds = cu_seqlens.tolist()
        reference = torch.cat(
            [
                sp.causal_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], 0.3, None)
                for a, b in zip(bounds, bounds[1:])
            ],
            dim=2,
        )
    reference = reference.transpose(1, 2)  # [B, T, H, d], transformers' layout
    weights = torch.randn(reference.shape, generator=gen, dtype=torch.float64)
    (reference * weights).sum().backward()
    c, cols = 10 // size, slice(rank * (10 // size), (rank + 1) * (10 // size))
    local = [t.detach()[:, :, cols].clone().requires_grad_() for t in (q, k, v)]
    with sp.sequence_layout(exchange, cu_seqlens):
        out, _ = sp.ulysses_attention(None, *local, None, scaling=0.3)
    assert out.shape == (2, c, 4, 8)
    torch.testing.assert_close(out, reference[:, cols], atol=1e-12, rtol=0)
    (out * weights[:, cols]).sum().backward()
    # Each rank backpropagates only its columns' loss, yet its k/v columns also feed the other rank's
    # queries: the backward all-to-all brings that gradient here, so the local grads are the full ones.
    for mine, full in zip(local, (q, k, v)):
        torch.testing.assert_close(mine.grad, full.grad[:, :, cols], atol=1e-12, rtol=0)


def test_exchange_and_ulysses_attention_in_two_processes():
    """Two gloo processes: the all-to-all exchange (values and autograd) and Ulysses attention (GQA,
    replicated KV heads, packed cu_seqlens) equal the unsplit computation."""
    mp.spawn(_exchange_worker, args=(2, _free_port()), nprocs=2, join=True)


def _part(lengths: list[tuple[int, int]], seed: int = 0, vocab: int = 20) -> TrainBatch:
    """Right-padded rows of (prompt, response) lengths, random tokens in [4, vocab), two groups."""
    gen = torch.Generator().manual_seed(seed)
    samples = [
        Sample(
            group_index=i % 2,
            prompt_ids=torch.randint(4, vocab, (p,), generator=gen).tolist(),
            response_ids=torch.randint(4, vocab, (r,), generator=gen).tolist(),
            behaviour_logprobs=(-0.5 - torch.rand(r, generator=gen) * 3).tolist(),
            finish_reason="eos",
            policy_version=0,
        )
        for i, (p, r) in enumerate(lengths)
    ]
    return build_train_batch(samples, torch.randn(len(lengths), generator=gen), pad_token_id=0)


@pytest.mark.parametrize("size", [2, 3])
def test_shards_shift_targets_globally_and_stitch_back(size):
    """L = 7 (not divisible by 2 or 3): padded, never truncated; local column p scores token p + 1
    (across shard edges), every response token on exactly one rank; unshard inverts the layout."""
    part = _part([(3, 4), (2, 2)])
    weights = torch.rand(part.input_ids.shape) * part.response_mask
    shards = [sp.shard_part(part, weights, r, size) for r in range(size)]
    full = sp.padded_length(7, size)
    c = full // size
    for rank, (shard, w) in enumerate(shards):
        assert shard.start == rank * c and shard.length == 7 and shard.targets.shape == (2, c)
        assert w.shape == (2, c)
        torch.testing.assert_close(shard.position_ids()[0], torch.arange(rank * c, rank * c + c))
    targets = torch.cat([s.targets for s, _ in shards], dim=1)
    mask = torch.cat([s.batch.response_mask for s, _ in shards], dim=1)
    torch.testing.assert_close(targets[:, :6], part.input_ids[:, 1:])
    torch.testing.assert_close(mask[:, :6], part.response_mask[:, 1:])
    assert not mask[:, 6:].any()
    torch.testing.assert_close(torch.cat([w for _, w in shards], dim=1)[:, :6], weights[:, 1:])
    assert sum(s.batch.num_response_tokens() for s, _ in shards) == part.num_response_tokens()
    inputs = torch.cat([s.batch.input_ids for s, _ in shards], dim=1)
    torch.testing.assert_close(inputs[:, :7], part.input_ids)
    # What each rank returns (its shifted old log-probs stand in for log-probs) stitches back.
    stitched = sp.unshard_logprobs([s.batch.old_logprobs for s, _ in shards], 7)
    torch.testing.assert_close(stitched, part.old_logprobs)


def test_config_validation_names_the_field():
    LearnerConfig(backend="deepspeed", num_ranks=4, sequence_parallel_size=2)
    bad = [
        {"backend": "deepspeed", "num_ranks": 3, "sequence_parallel_size": 2},
        {"backend": "deepspeed", "num_ranks": 2, "sequence_parallel_size": 0},
        {"backend": "torch", "num_ranks": 2, "sequence_parallel_size": 2},
    ]
    for kwargs in bad:
        with pytest.raises(ValueError, match="learner.sequence_parallel_size"):
            LearnerConfig(**kwargs)


def test_models_whose_heads_do_not_split_are_refused_and_packing_is_accepted():
    from cispo.learner.deepspeed_learner import DeepSpeedLearner

    with pytest.raises(ValueError, match="learner.sequence_parallel_size=3 must divide the model's 4"):
        sp.enable_sequence_parallel(tiny_minimax()[0], 3)
    packed = LearnerConfig(backend="deepspeed", num_ranks=2, sequence_parallel_size=2, packing=True)
    DeepSpeedLearner.check_config(packed)
    with pytest.raises(ValueError, match="learner.router_aux_loss_coef > 0 with learner.packing"):
        DeepSpeedLearner.check_config(dataclasses.replace(packed, router_aux_loss_coef=0.01))


# --- packing with SP: the shard logic alone, then in two gloo processes ---------------------------------

# (prompt, response) lengths: 665 tokens (odd: padded to 666), row starts at 0, 305 (inside the second
# lightning block of the stream), 512; the split point 333 falls inside the second row.
PACKED_ROWS = [(5, 300), (7, 200), (4, 149)]


def test_packed_shards_score_every_token_once_within_its_row():
    """Each rank scores the targets at stream positions (r c, (r + 1) c]; together every trained token
    once, never a row's first token (no score across a row boundary); the weights follow the tokens."""
    part = _with_routing(_part(PACKED_ROWS), 3)
    weights = torch.rand(part.input_ids.shape) * part.response_mask
    shards = [spp.shard_packed(part, weights, r, 2) for r in range(2)]
    masks = [s.batch.response_mask for s, _ in shards]
    assert not (masks[0] * masks[1]).any()
    torch.testing.assert_close(masks[0] + masks[1], part.response_mask)
    torch.testing.assert_close(shards[0][1] + shards[1][1], weights)
    packed = pack_rows(part)
    for rank, (shard, _) in enumerate(shards):
        assert shard.start == rank * 333 and shard.cu_seqlens.tolist() == [0, 305, 512, 665, 666]
        scored = shard.stream.response_mask[0].nonzero(as_tuple=True)[0] + shard.start + 1
        assert packed.predicted[scored].all() and (packed.cols[scored] > 0).all()
        torch.testing.assert_close(shard.targets[0][scored - shard.start - 1], packed.input_ids[0, scored])
        torch.testing.assert_close(part.input_ids[shard.rows, shard.cols], packed.input_ids[0, scored])
        lo = rank * 333
        routed = part.routed_experts[packed.rows, packed.cols]
        torch.testing.assert_close(
            shard.stream.routed_experts[0, : min(333, 665 - lo)], routed[lo : lo + 333]
        )
    assert (shards[1][0].stream.routed_experts[0, -1] == -1).all()  # the padding: the router chooses
    assert shards[1][0].stream.attention_mask[0, -1] == 0 and shards[1][0].position_ids[0, 0] == 333 - 305
    # Each rank's scatter fills exactly its tokens; the stitched sum is the [B, L] layout.
    values = [torch.where(s.stream.response_mask.bool(), s.targets.float(), 0.0) for s, _ in shards]
    stitched = spp.stitch_packed([s.scatter(v) for (s, _), v in zip(shards, values)])
    torch.testing.assert_close(stitched, (part.input_ids * part.response_mask).float())


def _packed_worker(rank: int, size: int, port: int) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=size)
    try:
        _check_packed_shard(rank, size)
    finally:
        dist.destroy_process_group()


def _check_packed_shard(rank: int, size: int) -> None:
    """Tiny MiniMax (lightning + softmax layers, routing replay): the ranks' packed-shard log-probs,
    stitched, equal the padded single-process forward's, and the sum of the ranks' weighted losses has
    the single-process gradient (the all-to-all's backward carries the cross-rank terms)."""
    model = tiny_minimax()[0]
    reference = copy.deepcopy(model)
    part = _with_routing(_part(PACKED_ROWS), 3)
    weights = (
        torch.rand(part.input_ids.shape, generator=torch.Generator().manual_seed(4)) * part.response_mask
    )
    with replay_routing(reference, part.routed_experts):
        expected, _ = sequence_logprobs(reference, part.input_ids, part.attention_mask, part.response_mask)
    (expected * weights).sum().backward()
    exchange = sp.UlyssesExchange(sp.sequence_groups(rank, size, size), size, rank)
    sp.enable_sequence_parallel(model, size)
    shard, mine = spp.shard_packed(part, weights, rank, size)
    stream = shard.stream
    inputs = (
        stream.input_ids,
        stream.attention_mask,
        stream.response_mask,
        shard.targets,
        shard.position_ids,
    )
    with replay_routing(model, stream.routed_experts), sp.sequence_layout(exchange, shard.cu_seqlens):
        values, _ = sp.shard_logprobs(model, inputs, chunk_size=64, temperature=1.0, with_entropy=False)
        logprobs = shard.scatter(values)
        (logprobs * mine).sum().backward()
    stitched = logprobs.detach().clone()
    dist.all_reduce(stitched)
    torch.testing.assert_close(stitched, expected.detach(), atol=1e-5, rtol=0)
    for (name, param), ref in zip(model.named_parameters(), reference.parameters()):
        grad = param.grad.clone()
        dist.all_reduce(grad)
        torch.testing.assert_close(grad, ref.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_packed_shards_match_the_padded_forward_in_two_processes():
    mp.spawn(_packed_worker, args=(2, _free_port()), nprocs=2, join=True)


# --- the learner on Ray ranks --------------------------------------------------------------------------

MICRO_BATCH_TOKENS = 1100  # per rank: several micro-batches per step, and a dummy with 2 groups


def _dense():
    return tiny_lm(
        "qwen2", 0, vocab_size=100, hidden_size=32, intermediate_size=64, max_position_embeddings=4096,
        tie_word_embeddings=False,
    )  # fmt: skip


MODELS = {"minimax": lambda: tiny_minimax()[0], "dense": _dense}


def _with_routing(batch: TrainBatch, seed: int) -> TrainBatch:
    """Recorded experts for the tiny MiniMax (4 MoE layers, 4 experts, top 2), a quarter left to the
    router (-1): routing replay must see them sliced to each rank's columns."""
    gen = torch.Generator().manual_seed(seed)
    rows, length = batch.input_ids.shape
    experts = torch.rand(rows, length, 4, 4, generator=gen).argsort(dim=-1)[..., :2]
    free = torch.rand(rows, length, 4, 1, generator=gen) < 0.25
    batch.routed_experts = torch.where(free, -1, experts)
    return batch


def _minibatches(name: str = "dense") -> list[TrainBatch]:
    # T = 2048 (even), then T = 1105 (odd: padded to 1106 over 2 ranks).
    first = _part([(7, 2041), (6, 1500), (9, 700), (5, 1200), (4, 296)])
    second = _part([(7, 1000), (6, 1010), (9, 600), (5, 1100)], seed=1)
    assert first.input_ids.shape[1] == 2048 and second.input_ids.shape[1] % 2 == 1
    if name == "minimax":
        return [_with_routing(first, 0), _with_routing(second, 1)]
    return [first, second]


# Packed: several rows per stream (a group's micro-batch holds up to 2 x this many padded tokens). The
# first minibatch packs rows of 2048 + 1506 tokens and of 1205 + 709 + 300 (T = 2214: boundaries at 1205
# and 1914 inside lightning blocks, the split point 1107 inside the first row).
PACKED_MICRO_BATCH_TOKENS = 2100


def _cfg(
    name: str, stage: int, num_ranks: int, size: int, checkpointing: bool = False, packing: bool = False
) -> LearnerConfig:
    backend = "deepspeed" if size > 1 else "torch"
    return LearnerConfig(
        backend=backend, lr=1e-2, warmup_steps=0, num_threads=1, zero_stage=stage, num_ranks=num_ranks,
        micro_batch_tokens=PACKED_MICRO_BATCH_TOKENS if packing else MICRO_BATCH_TOKENS,
        sequence_parallel_size=size, routing_replay=name == "minimax", gradient_checkpointing=checkpointing,
        packing=packing,
    )  # fmt: skip


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=4, include_dashboard=False, _temp_dir=f"/tmp/ray_cispo_{os.getpid()}")
    yield
    ray.shutdown()


_REFERENCES: dict[tuple[str, bool], dict] = {}


def _reference(name: str, packing: bool = False) -> dict:
    """Two updates of the single-process torch learner (cached per model and packing)."""
    if (name, packing) not in _REFERENCES:
        model = MODELS[name]()
        algorithm = AlgorithmConfig(normalizer="group")
        cfg = _cfg(name, 2, 1, 1, packing=packing)
        learner = build_learner("torch", model=copy.deepcopy(model), cfg=cfg, algorithm=algorithm)
        results = [learner.train_step(batch, return_logprobs=True) for batch in _minibatches(name)]
        _REFERENCES[name, packing] = {
            "model": model,
            "results": results,
            "state": learner.state_dict_for_sync(),
            "after": learner.compute_logprobs(_minibatches(name)[0]),
        }
    return _REFERENCES[name, packing]


def _check_learner_matches(
    name: str, stage: int, num_ranks: int, checkpointing: bool = False, packing: bool = False
) -> None:
    """SP 2 (packing or not) against the torch learner without packing, and (dense Qwen2 with packing)
    the torch learner with packing too. Not the packed torch learner for MiniMax: it cannot replay
    routing yet (its [B, L] routed experts meet a [1, T] packed forward)."""
    ref = _reference(name)
    refs = [ref, _reference(name, packing=True)] if packing and name == "dense" else [ref]
    batches = _minibatches(name)
    learner = build_learner(
        "deepspeed",
        model=copy.deepcopy(ref["model"]),
        cfg=_cfg(name, stage, num_ranks, 2, checkpointing, packing),
        algorithm=AlgorithmConfig(normalizer="group"),
        ds_config={"zero_optimization": {"stage3_param_persistence_threshold": 0}},
    )
    try:
        results = learner.train_steps(batches, [True, True])  # K = 2 updates in one call
        state = learner.state_dict_for_sync()
        after = learner.compute_logprobs(batches[0])
        assert learner.version == 2
    finally:
        learner.close()
    for reference in refs:
        for mine, theirs in zip(results, reference["results"]):
            for key in ("loss", "grad_norm", "entropy", "clip_frac", "approx_kl"):
                assert mine.metrics[key] == pytest.approx(theirs.metrics[key], abs=ATOL, rel=1e-5), key
            torch.testing.assert_close(mine.logprobs, theirs.logprobs, atol=ATOL, rtol=0)
        for key, value in reference["state"].items():
            torch.testing.assert_close(state[key], value, atol=ATOL, rtol=0, msg=key)
        torch.testing.assert_close(after, reference["after"], atol=ATOL, rtol=0)
    # The check has teeth: the updates moved the weights by far more than the tolerance.
    moved = max((ref["state"][k] - v).abs().max() for k, v in ref["model"].state_dict().items())
    assert moved > 1e-3


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize(("name", "stage"), [("minimax", 2), ("minimax", 3), ("dense", 2), ("dense", 3)])
def test_sp2_matches_the_single_process_learner(ray_cluster, name, stage):
    """SP 2 over 2 ranks (ZeRO over both): loss, gradient norm, metrics, log-probs and weights after two
    updates equal the torch learner's, for the hybrid MiniMax (lightning + softmax layers, routing
    replay) and Qwen2. Under ZeRO-3 with gradient checkpointing: the recompute inside backward
    exchanges too."""
    _check_learner_matches(name, stage, num_ranks=2, checkpointing=stage == 3)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_dp2_by_sp2_matches_the_single_process_learner(ray_cluster):
    """4 ranks: 2 data-parallel groups of 2 SP ranks; the groups run different rows, one padded with a
    dummy micro-batch."""
    plan = plan_micro_batches(_minibatches("minimax")[0], 2, MICRO_BATCH_TOKENS * 2)
    assert any(rows is None for group in plan for rows in group)
    _check_learner_matches("minimax", 3, num_ranks=4)


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize(("name", "stage"), [("minimax", 2), ("minimax", 3), ("dense", 2), ("dense", 3)])
def test_sp2_with_packing_matches_the_single_process_learner(ray_cluster, name, stage):
    """SP 2 with packing (each rank a slice of one packed stream per micro-batch, global cu_seqlens in
    the softmax and lightning layers): the same metrics, log-probs and weights after two updates as the
    torch learner's (ZeRO-3 with gradient checkpointing)."""
    first = _minibatches(name)[0]
    plan = plan_micro_batches(first, 1, PACKED_MICRO_BATCH_TOKENS * 2)[0]
    lengths = [sorted(first.attention_mask[rows].sum(dim=1).tolist(), reverse=True) for rows in plan]
    assert [2048, 1506] in lengths and [1205, 709, 300] in lengths  # the streams the comment describes
    _check_learner_matches(name, stage, num_ranks=2, checkpointing=stage == 3, packing=True)
