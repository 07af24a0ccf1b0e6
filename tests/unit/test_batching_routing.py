"""build_train_batch carries the engine's routed experts into TrainBatch, aligned with input_ids."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cispo.core.config import TrainConfig
from cispo.core.moe import NO_CHOICE
from cispo.core.types import Sample
from cispo.driver.batch import build_train_batch
from cispo.driver.build import engine_kwargs

LAYERS, TOP_K = 3, 2


def routed_like_tokens(ids: list[int]) -> torch.Tensor:
    """[len(ids), LAYERS, TOP_K] int8 whose slot 0 is the token id at that position (slot 1 the layer), so
    that alignment with input_ids can be read off the batch; the last position is NO_CHOICE, as the
    engine records it (the final sampled token is never fed)."""
    routed = torch.empty(len(ids), LAYERS, TOP_K, dtype=torch.int8)
    routed[:, :, 0] = torch.tensor(ids, dtype=torch.int8)[:, None]
    routed[:, :, 1] = torch.arange(LAYERS, dtype=torch.int8)
    routed[-1] = NO_CHOICE
    return routed


def make_sample(prompt: list[int], response: list[int], routed: bool = True, group: int = 0) -> Sample:
    return Sample(
        group_index=group,
        prompt_ids=prompt,
        response_ids=response,
        behaviour_logprobs=[-1.0] * len(response),
        finish_reason="eos",
        policy_version=0,
        routed_experts=routed_like_tokens(prompt + response) if routed else None,
    )


SAMPLES = [
    ([1, 2, 3], [10, 11, 12, 13]),  # the longest row: L = 7
    ([4, 5], [20]),
    ([6, 7, 8, 9], [30, 31]),
]


def test_routing_is_aligned_with_input_ids_and_padded_with_no_choice():
    samples = [make_sample(p, r, group=i) for i, (p, r) in enumerate(SAMPLES)]
    batch = build_train_batch(samples, torch.zeros(3), pad_token_id=0)
    routed = batch.routed_experts
    assert routed is not None and routed.dtype == torch.int64
    assert routed.shape == (3, 7, LAYERS, TOP_K)
    lengths = [len(p) + len(r) for p, r in SAMPLES]
    assert batch.attention_mask.sum(dim=1).tolist() == lengths == [7, 3, 6]
    for row, n in enumerate(lengths):
        # Every fed position carries the routing of exactly the token at that position ...
        tokens = batch.input_ids[row, : n - 1].tolist()
        assert routed[row, : n - 1, :, 0].tolist() == [[t] * LAYERS for t in tokens]
        assert routed[row, : n - 1, :, 1].tolist() == [list(range(LAYERS))] * (n - 1)
        # ... the final sampled token and the right padding have no recorded choice.
        assert (routed[row, n - 1 :] == NO_CHOICE).all()
    assert int((routed == NO_CHOICE).all(-1).all(-1).sum()) == 3 * 7 - sum(n - 1 for n in lengths)
    # A minibatch keeps the alignment (select trims to its longest row: 6).
    part = batch.select([2, 1])
    assert part.routed_experts.shape == (2, 6, LAYERS, TOP_K)
    assert part.routed_experts[0, :5, 0, 0].tolist() == [6, 7, 8, 9, 30]
    assert part.routed_experts[1, :2, 0, 0].tolist() == [4, 5]


def test_no_routing_unless_every_sample_has_it():
    plain = [make_sample(p, r, routed=False) for p, r in SAMPLES]
    assert build_train_batch(plain, torch.zeros(3), pad_token_id=0).routed_experts is None
    mixed = [make_sample(*SAMPLES[0]), make_sample(*SAMPLES[1], routed=False)]
    assert build_train_batch(mixed, torch.zeros(2), pad_token_id=0).routed_experts is None


def test_inconsistent_routing_is_rejected():
    with pytest.raises(ValueError, match="routed_experts has shape"):
        Sample(0, [1, 2], [3], [-1.0], "eos", 0, routed_experts=torch.zeros(2, LAYERS, TOP_K))
    other = make_sample(*SAMPLES[1])
    other.routed_experts = other.routed_experts[:, :1]  # one MoE layer instead of three
    with pytest.raises(ValueError, match="row 1"):
        build_train_batch([make_sample(*SAMPLES[0]), other], torch.zeros(2), pad_token_id=0)


def test_engine_kwargs_ask_the_hf_engine_to_record_routing_when_replay_is_on():
    cfg = TrainConfig()
    assert cfg.rollout.engine == "hf"
    assert engine_kwargs(cfg, Path("m"), 1)["record_routing"] is False
    cfg.learner.routing_replay = True
    assert engine_kwargs(cfg, Path("m"), 1)["record_routing"] is True
    cfg.rollout.engine = "vllm"  # it does not take the kwarg (and records nothing)
    assert "record_routing" not in engine_kwargs(cfg, Path("m"), 1)
