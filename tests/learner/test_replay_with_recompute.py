"""Routing replay with gradient checkpointing: the backward's recomputed forward must route as the forward
did, so both learners keep the replay in force through the backward (found by the MiniMax-M1 dress
rehearsal, tests/integration/test_rehearsal.py: torch raised CheckpointError on the first step)."""

from __future__ import annotations

import copy

import torch

from cispo.core.config import AlgorithmConfig, LearnerConfig
from cispo.core.moe import find_routers
from cispo.learner import build_learner
from tests.learner.helpers import make_batch, tiny_minimax


def test_replayed_routing_trains_the_same_with_and_without_recompute():
    model, tok = tiny_minimax()
    batch = make_batch(tok, 8)
    routers = find_routers(model)
    experts, top_k = int(routers[0].num_experts), int(routers[0].top_k)
    rows, length = batch.input_ids.shape
    # Experts the routers would not all pick themselves: a random top_k of each position's experts.
    scores = torch.rand(rows, length, len(routers), experts, generator=torch.Generator().manual_seed(1))
    batch.routed_experts = scores.argsort(dim=-1)[..., :top_k]
    results = []
    for checkpointing in (False, True):
        cfg = LearnerConfig(
            lr=1e-2, warmup_steps=0, num_threads=1, gradient_checkpointing=checkpointing, routing_replay=True
        )
        learner = build_learner("torch", model=copy.deepcopy(model), cfg=cfg, algorithm=AlgorithmConfig())
        results.append((learner.train_step(batch).metrics, learner.state_dict_for_sync()))
    (plain, plain_state), (recomputed, recomputed_state) = results
    assert recomputed["loss"] == plain["loss"] and recomputed["grad_norm"] == plain["grad_norm"]
    for name, value in plain_state.items():
        torch.testing.assert_close(recomputed_state[name], value, atol=0, rtol=0, msg=name)
