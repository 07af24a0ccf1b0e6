import copy

import pytest
import torch
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from cispo.algo.logprobs import sequence_logprobs
from cispo.core.config import AlgorithmConfig, LearnerConfig
from cispo.core.moe import NO_CHOICE, RoutingRecorder, find_routers, replay_routing
from cispo.learner import build_learner
from tests.learner.helpers import make_batch, tiny_minimax


def engine_rollout(model, tok, steps: int = 5):
    """A cached greedy generate on a copy whose routers are perturbed (a stand-in for the engine's
    different numerics), recording its routing. Returns ids [B, T], routed [B, T, layers, k]."""
    engine = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for router in find_routers(engine):
            router.weight.add_(torch.randn(router.weight.shape, generator=gen) * router.weight.std())
    prompts = torch.tensor(
        [tok("12+34=")["input_ids"], tok("56+78=")["input_ids"], tok("90+11=")["input_ids"]]
    )
    with RoutingRecorder(engine) as recorder:
        ids = engine.generate(prompts, max_new_tokens=steps, do_sample=False, pad_token_id=tok.pad_token_id)
    routed = recorder.routed_experts(batch_size=ids.shape[0])
    layers = len(find_routers(model))
    assert routed.shape == (3, ids.shape[1] - 1, layers, 2)  # the last sampled token is never fed back
    full = torch.full((3, ids.shape[1], layers, 2), NO_CHOICE, dtype=torch.long)
    full[:, :-1] = routed
    return ids, full


def learner_routing(model, ids, routed):
    with replay_routing(model, routed), RoutingRecorder(model) as recorder, torch.no_grad():
        model(input_ids=ids)
    return recorder.routed_experts(batch_size=ids.shape[0])


def test_replay_makes_learner_routing_identical_to_the_recorded_one():
    model, tok = tiny_minimax()
    ids, routed = engine_rollout(model, tok)
    fed = routed[:, :-1]
    own = learner_routing(model, ids, None)[:, :-1]
    # The perturbed engine chose differently for a good share of (token, layer, slot) decisions ...
    assert (own.sort(-1).values != fed.sort(-1).values).float().mean() > 0.1
    # ... and with replay the learner takes exactly the recorded experts, in order, at every fed position.
    assert torch.equal(learner_routing(model, ids, routed)[:, :-1], fed)


def test_replaying_the_models_own_choice_changes_nothing():
    model, tok = tiny_minimax()
    batch = make_batch(tok, 4)
    with RoutingRecorder(model) as recorder, torch.no_grad():
        plain, _ = sequence_logprobs(model, batch.input_ids, batch.attention_mask, batch.response_mask)
    own = recorder.routed_experts(batch_size=4)
    with replay_routing(model, own), torch.no_grad():
        replayed, _ = sequence_logprobs(model, batch.input_ids, batch.attention_mask, batch.response_mask)
    torch.testing.assert_close(replayed, plain, atol=0, rtol=0)
    with pytest.raises(ValueError, match="must be"):
        with replay_routing(model, own[:, :, :1]):
            pass


def test_learner_replays_routing_from_the_batch():
    model, tok = tiny_minimax()
    batch = make_batch(tok, 4)
    routed = (
        torch.randint(0, 4, (*batch.input_ids.shape, len(find_routers(model)), 1))
        .expand(-1, -1, -1, 2)
        .clone()
    )
    routed[..., 1] = (routed[..., 0] + 1) % 4  # two distinct experts per token
    batch.routed_experts = routed
    logprobs = {}
    for replay in (False, True):
        cfg = LearnerConfig(routing_replay=replay, num_threads=1)
        learner = build_learner("torch", model=model, cfg=cfg, algorithm=AlgorithmConfig())
        logprobs[replay] = learner.compute_logprobs(batch)
    with replay_routing(model, routed), torch.no_grad():
        expected, _ = sequence_logprobs(model, batch.input_ids, batch.attention_mask, batch.response_mask)
    torch.testing.assert_close(logprobs[True], expected, atol=1e-6, rtol=0)
    assert (logprobs[True] - logprobs[False]).abs().max() > 1e-4


def test_router_aux_loss_is_transformers_load_balancing_loss():
    model, tok = tiny_minimax()
    batch = make_batch(tok, 6)
    with torch.no_grad():
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_router_logits=True)
    expected = float(load_balancing_loss_func(out.router_logits, 4, 2, batch.attention_mask))
    results = {}
    for coef in (0.0, 0.5):
        cfg = LearnerConfig(router_aux_loss_coef=coef, num_threads=1, warmup_steps=0)
        results[coef] = (
            build_learner("torch", model=copy.deepcopy(model), cfg=cfg, algorithm=AlgorithmConfig())
            .train_step(batch)
            .metrics
        )
    assert results[0.5]["router_aux_loss"] == pytest.approx(expected, rel=1e-5)
    assert expected > 1.0  # num_experts * sum f_e P_e >= 1, equality only for perfectly balanced routing
    assert results[0.5]["loss"] - results[0.0]["loss"] == pytest.approx(0.5 * expected, rel=1e-5)
    assert results[0.5]["grad_norm"] != pytest.approx(results[0.0]["grad_norm"], rel=1e-3)


def test_packing_replays_the_same_routing_and_aux_loss_as_padded_rows():
    """Packed [1, T] forwards take their replayed experts (and the aux loss its tokens) from the packed
    stream: the same log-probs, loss and aux loss as the padded micro-batch."""
    model, tok = tiny_minimax()
    batch = make_batch(tok, 4)
    assert (batch.attention_mask == 0).any()  # rows of different lengths, so packing moves tokens
    routed = torch.randint(0, 4, (*batch.input_ids.shape, len(find_routers(model)), 2))
    routed[..., 1] = (routed[..., 0] + 1) % 4
    batch.routed_experts = routed
    results = {}
    for packing in (False, True):
        cfg = LearnerConfig(routing_replay=True, packing=packing, router_aux_loss_coef=0.01, num_threads=1)
        learner = build_learner("torch", model=copy.deepcopy(model), cfg=cfg, algorithm=AlgorithmConfig())
        logprobs = learner.compute_logprobs(batch)
        results[packing] = (logprobs, learner.train_step(batch).metrics)
    torch.testing.assert_close(results[True][0], results[False][0], atol=1e-5, rtol=0)
    for key in ("loss", "router_aux_loss", "grad_norm"):
        assert results[True][1][key] == pytest.approx(results[False][1][key], abs=1e-5), key
