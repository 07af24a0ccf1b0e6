"""Routing replay end to end: the hf engine records the experts it chose, the samples carry them into the
TrainBatch, and the torch learner's forward replays them."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from cispo.algo.logprobs import sequence_logprobs
from cispo.core.config import AlgorithmConfig, LearnerConfig
from cispo.core.moe import NO_CHOICE, RoutingRecorder, find_routers, replay_routing
from cispo.core.types import PromptGroup, SamplingParams, TrainBatch
from cispo.driver.batch import build_train_batch
from cispo.learner.torch_learner import TorchLearner
from rollout.engine import build_engine
from rollout.manager import LocalRolloutManager
from tests.rollout.conftest import make_dense

# Three length buckets, repeated prompts (rows of one bucket finish at different steps), a 1-token prompt.
PROMPTS = [[1, 2, 3, 4, 5]] * 3 + [[7, 8, 9]] * 2 + [[3] * 20] + [[11]]
PARAMS = SamplingParams(max_new_tokens=24, eos_token_ids=(0,), seed=3)
LAYERS, TOP_K = 4, 2  # make_minimax: 4 MoE layers, 4 experts top-2


@torch.no_grad()
def full_forward_routing(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """What the learner's routers choose: one forward over prompt+response, no cache. [T, layers, k]."""
    with RoutingRecorder(model) as recorder:
        model(input_ids=torch.tensor([ids]), use_cache=False)
    return recorder.routed_experts(batch_size=1)[0]


def test_engine_records_the_routing_of_every_fed_position(minimax_model):
    engine = build_engine("hf", model=minimax_model, max_batch_size=8, record_routing=True)
    gens = engine.generate(PROMPTS, PARAMS)
    lengths = [len(g.response_ids) for g in gens]
    assert min(lengths) < max(lengths)  # some rows finished early and decoded discarded pad tokens
    compared = set_mismatches = order_mismatches = 0
    for prompt, gen in zip(PROMPTS, gens):
        routed = gen.routed_experts
        fed = len(prompt) + len(gen.response_ids) - 1
        assert routed.shape == (fed + 1, LAYERS, TOP_K) and routed.dtype == torch.int8
        assert (routed[fed] == NO_CHOICE).all()  # the last sampled token is never fed
        assert ((routed[:fed] >= 0) & (routed[:fed] < 4)).all()
        # Two distinct experts per (position, layer).
        assert (routed[:fed, :, 0] != routed[:fed, :, 1]).all()
        full = full_forward_routing(minimax_model, prompt + gen.response_ids)[:fed]
        compared += fed * LAYERS
        set_mismatches += int((routed[:fed].long().sort(-1).values != full.sort(-1).values).any(-1).sum())
        order_mismatches += int((routed[:fed].long() != full).any(-1).sum())
    print(f"{compared} (pos, layer) decisions; mismatches: {set_mismatches} sets, {order_mismatches} orders")
    assert compared > 400
    # fp32, and a cached decode differs from the full forward by ~1e-6 in the hidden states: no router
    # decision of this tiny model is that close to a tie, so the choices agree exactly, in order.
    assert set_mismatches == 0 and order_mismatches == 0


def test_recording_changes_nothing_else_and_ships_compact_rows(minimax_model):
    plain = build_engine("hf", model=minimax_model, max_batch_size=8).generate(PROMPTS, PARAMS)
    recording = build_engine("hf", model=minimax_model, max_batch_size=8, record_routing=True)
    recorded = recording.generate(PROMPTS, PARAMS)
    assert all(g.routed_experts is None for g in plain)
    assert [g.response_ids for g in recorded] == [g.response_ids for g in plain]
    assert [g.logprobs for g in recorded] == [g.logprobs for g in plain]
    for gen in recorded:
        # One byte a choice, in a tensor that owns its storage (a view would pickle the whole batch).
        routed = gen.routed_experts
        assert routed.untyped_storage().nbytes() == routed.numel() == routed.shape[0] * LAYERS * TOP_K
    longest = max(recorded, key=lambda g: g.routed_experts.shape[0]).routed_experts
    as_tensor, as_lists = len(pickle.dumps(longest)), len(pickle.dumps(longest.tolist()))
    print(f"routing of {longest.shape[0]} positions pickles to {as_tensor} B (int8), {as_lists} B (lists)")
    assert as_tensor < as_lists
    with pytest.raises(ValueError, match="no router"):
        build_engine("hf", model=make_dense(), record_routing=True)


def perturbed_routers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Router weights plus noise: an engine whose routing differs from the learner's (a stand-in for
    bf16 numerics at scale) without changing anything else."""
    gen = torch.Generator().manual_seed(1)
    routers = {id(r) for r in find_routers(model)}
    return {
        f"{name}.weight": m.weight.detach() + torch.randn(m.weight.shape, generator=gen) * m.weight.std()
        for name, m in model.named_modules()
        if id(m) in routers
    }


def engine_batch(model: torch.nn.Module) -> TrainBatch:
    """Samples from an in-process rollout manager with perturbed routers, as the trainer builds them."""
    manager = LocalRolloutManager("hf", {"model": model, "max_batch_size": 8, "record_routing": True})
    manager.update_weights(perturbed_routers(model), version=1)
    groups = [PromptGroup(i, p, "", None, group_size=2) for i, p in enumerate(([1, 2, 3, 4, 5], [7, 8, 9]))]
    samples = manager.generate(groups, SamplingParams(max_new_tokens=12, seed=5))
    assert all(s.routed_experts is not None and s.policy_version == 1 for s in samples)
    return build_train_batch(samples, torch.tensor([1.0, -1.0, 0.5, -0.5]), pad_token_id=0)


@torch.no_grad()
def reference_logprobs(
    model: torch.nn.Module, batch: TrainBatch, routed: torch.Tensor | None
) -> torch.Tensor:
    with replay_routing(model, routed):
        return sequence_logprobs(model, batch.input_ids, batch.attention_mask, batch.response_mask)[0]


def test_torch_learner_replays_the_engines_routing(minimax_model):
    batch = engine_batch(minimax_model)
    routed = batch.routed_experts
    fed = (routed != NO_CHOICE).all(-1).all(-1)  # [B, L]: positions the engine fed through the model
    assert int(fed.sum()) == int(batch.attention_mask.sum()) - len(batch)  # all but each row's last token
    with RoutingRecorder(minimax_model) as recorder, torch.no_grad():
        minimax_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    own = recorder.routed_experts(batch_size=len(batch))
    own_differs = float((own.sort(-1).values != routed.sort(-1).values).any(-1)[fed].float().mean())
    print(f"learner's own routing differs from the engine's on {own_differs:.1%} of (token, layer) decisions")
    assert own_differs > 0.1

    replayed = reference_logprobs(minimax_model, batch, routed)
    free = reference_logprobs(minimax_model, batch, None)
    mask = batch.response_mask.bool()
    effect = float((replayed - free)[mask].abs().max())
    print(f"replay changes the learner log-probs by up to {effect:.2e}")
    # Measured 1.1e-3: small, as the random-init experts add little to the residual stream, yet ~1e4 times
    # fp32 noise; the learner results below must sit on the replayed side of it.
    assert effect > 5e-4
    cfg = LearnerConfig(routing_replay=True, num_threads=1, warmup_steps=0, micro_batch_tokens=40)
    learner = TorchLearner(copy.deepcopy(minimax_model), cfg, AlgorithmConfig())
    stepped = learner.train_step(batch, return_logprobs=True).logprobs  # the forward before the update
    error = float((stepped - replayed)[mask].abs().max())
    print(f"train_step log-probs vs the replayed reference: max |diff| {error:.2e}")
    assert error < 1e-6  # measured 0: same routing, same weights, only the micro-batch split differs
    assert float((stepped - free)[mask].abs().max()) > 5e-4

    # Corrupting the batch's routing changes what the learner computes: the path is really used.
    corrupted = copy.copy(batch)
    corrupted.routed_experts = torch.where(fed[..., None, None], (routed + 1) % 4, routed)
    fresh = TorchLearner(copy.deepcopy(minimax_model), cfg, AlgorithmConfig())
    assert float((fresh.compute_logprobs(corrupted) - replayed)[mask].abs().max()) > 5e-4  # measured 8.6e-4
    torch.testing.assert_close(fresh.compute_logprobs(batch), replayed, atol=1e-6, rtol=0)
