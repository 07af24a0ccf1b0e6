import copy

import pytest
import torch

from cispo.algo.logprobs import sequence_logprobs
from cispo.core.config import AlgorithmConfig, LearnerConfig
from cispo.learner import build_learner
from cispo.learner.packing import PackingNotSupported, pack_rows, packed_sequence_logprobs, padded_fraction
from tests.learner.helpers import make_batch, tiny_dense, tiny_minimax


def per_row_logprobs(model, batch):
    """Each row alone, unpadded: the ground truth packing must reproduce."""
    out = torch.zeros_like(batch.old_logprobs)
    for b, n in enumerate(batch.attention_mask.sum(1).tolist()):
        lp, _ = sequence_logprobs(
            model,
            batch.input_ids[b : b + 1, :n],
            batch.attention_mask[b : b + 1, :n],
            batch.response_mask[b : b + 1, :n],
        )
        out[b, :n] = lp[0]
    return out


def test_pack_rows_restarts_positions_and_drops_padding():
    _, tok = tiny_minimax()
    batch = make_batch(tok, 4)
    packed = pack_rows(batch)
    lengths = batch.attention_mask.sum(1).tolist()
    assert packed.num_tokens == sum(lengths) < batch.input_ids.numel()
    starts = (packed.position_ids[0] == 0).nonzero().flatten().tolist()
    assert starts == [sum(lengths[:i]) for i in range(4)]
    assert not packed.predicted[starts].any()
    assert int(packed.predicted.sum()) == batch.num_response_tokens()
    assert padded_fraction(batch) == pytest.approx(1 - sum(lengths) / batch.input_ids.numel())


def test_dense_packing_matches_each_row_alone():
    model, (_, tok) = tiny_dense(), tiny_minimax()
    batch = make_batch(tok, 6)
    packed, _ = packed_sequence_logprobs(model, batch)
    # 2e-6: fp32 rounding of differently shaped matmuls; a boundary leak would be O(0.1).
    torch.testing.assert_close(packed, per_row_logprobs(model, batch), atol=2e-6, rtol=0)


def test_dense_learner_update_is_the_same_packed_or_padded():
    model, (_, tok) = tiny_dense(), tiny_minimax()
    batch = make_batch(tok, 6)
    states = []
    for packing in (False, True):
        cfg = LearnerConfig(lr=1e-2, warmup_steps=0, num_threads=1)
        cfg.packing = packing  # read with getattr: the config group may not declare the field yet
        m = copy.deepcopy(model)
        learner = build_learner("torch", model=m, cfg=cfg, algorithm=AlgorithmConfig())
        metrics = learner.train_step(batch).metrics
        states.append((m.state_dict(), metrics["loss"]))
    assert states[0][1] == pytest.approx(states[1][1], abs=1e-6)
    for key, value in states[0][0].items():
        torch.testing.assert_close(states[1][0][key], value, atol=2e-6, rtol=1e-4)


def test_minimax_refuses_packing_because_lightning_state_leaks():
    model, tok = tiny_minimax()
    batch = make_batch(tok, 4)
    with pytest.raises(PackingNotSupported, match="linear_attention"):
        packed_sequence_logprobs(model, batch)
    cfg = LearnerConfig()
    cfg.packing = True
    with pytest.raises(PackingNotSupported, match="token-budget micro-batches"):
        build_learner("torch", model=model, cfg=cfg, algorithm=AlgorithmConfig())
    # Why: forced through anyway, rows after the first read the previous rows' lightning state.
    packed = pack_rows(batch)
    hidden = model.model(input_ids=packed.input_ids, position_ids=packed.position_ids).last_hidden_state[0]
    alone = model.model(
        input_ids=batch.input_ids[1:2, : int(batch.attention_mask[1].sum())]
    ).last_hidden_state[0]
    start = int(batch.attention_mask[0].sum())
    leak = (hidden[start : start + alone.shape[0]] - alone).abs().max().item()
    assert leak > 1e-2
