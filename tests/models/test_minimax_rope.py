"""Partial RoPE for transformers' MiniMaxForCausalLM (cispo/models/minimax_rope.py): only the first
rotary_dim dims of each q / k head rotate, NeoX style, as the published remote code and vLLM 0.23 do."""

from __future__ import annotations

import json
import math

import pytest
import torch

from cispo.algo.logprobs import sequence_logprobs
from cispo.core.config import ModelConfig
from cispo.core.types import SamplingParams
from cispo.driver.policy import link_pretrained, load_policy
from cispo.models.loading import check_native_rope, learner_dir
from cispo.models.minimax_rope import apply_partial_rotary, honour_partial_rotary, install
from rollout.hf_engine import HFEngine
from tests.models.minimax_fixture import HEAD_DIM, REMOTE_CONFIG_JSON, write_remote_checkpoint


def _modeling():
    install()
    from transformers.models.minimax import modeling_minimax

    return modeling_minimax


def _minimax(factor: float, seed: int = 0) -> torch.nn.Module:
    from transformers import MiniMaxConfig, MiniMaxForCausalLM

    config = MiniMaxConfig(
        vocab_size=40, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, num_local_experts=2, num_experts_per_tok=1, block_size=4,
        layer_types=["linear_attention", "full_attention"], max_position_embeddings=64, initializer_range=0.5,
        rope_parameters={"rope_type": "default", "rope_theta": 100.0, "partial_rotary_factor": factor},
    )  # fmt: skip
    torch.manual_seed(seed)
    return honour_partial_rotary(MiniMaxForCausalLM(config)).eval()


def test_only_the_first_rotary_dims_rotate_neox_style_by_hand():
    """head_dim 8, rotary_dim 4, theta 100: dims 0..3 rotate as pairs (0, 2) and (1, 3) by angles
    p * 100^(-0/4) and p * 100^(-2/4); dims 4..7 come out bit for bit as they went in."""
    modeling = _modeling()
    config = modeling.MiniMaxConfig(
        hidden_size=16, num_attention_heads=2, head_dim=8, max_position_embeddings=16,
        rope_parameters={"rope_type": "default", "rope_theta": 100.0, "partial_rotary_factor": 0.5},
    )  # fmt: skip
    embedding = modeling.MiniMaxRotaryEmbedding(config)
    assert embedding.inv_freq.tolist() == pytest.approx([1.0, 0.1])
    q, k = torch.randn(1, 2, 3, 8), torch.randn(1, 1, 3, 8)
    positions = torch.tensor([[0, 1, 5]])
    cos, sin = embedding(q, positions)
    q_out, k_out = modeling.apply_rotary_pos_emb(q, k, cos, sin)  # the name MiniMaxAttention calls
    for x, out in ((q, q_out), (k, k_out)):
        assert torch.equal(out[..., 4:], x[..., 4:])
        assert torch.equal(out[..., 0, :], x[..., 0, :])  # position 0: no rotation
        for t, p in enumerate((0, 1, 5)):
            for i, freq in ((0, 1.0), (1, 0.1)):
                c, s = math.cos(p * freq), math.sin(p * freq)
                a, b = x[..., t, i], x[..., t, i + 2]
                torch.testing.assert_close(out[..., t, i], a * c - b * s)
                torch.testing.assert_close(out[..., t, i + 2], b * c + a * s)


def test_inside_the_model_the_last_half_of_q_and_k_passes_through(monkeypatch):
    modeling = _modeling()
    patched, seen = modeling.apply_rotary_pos_emb, []

    def recording(q, k, cos, sin, unsqueeze_dim=1):
        out = patched(q, k, cos, sin, unsqueeze_dim)
        seen.append((q, k, *out))
        return out

    monkeypatch.setattr(modeling, "apply_rotary_pos_emb", recording)
    model = _minimax(0.5)
    with torch.no_grad():
        model(torch.tensor([[3, 1, 4, 1, 5, 9]]))
    assert len(seen) == 1  # the one softmax layer
    q, k, q_out, k_out = seen[0]
    assert q.shape[-1] == 16
    assert torch.equal(q_out[..., 8:], q[..., 8:]) and torch.equal(k_out[..., 8:], k[..., 8:])
    assert not torch.allclose(q_out[..., 1:, :8], q[..., 1:, :8])  # the rotary half does rotate


def test_factor_half_changes_the_logits_and_factor_one_is_transformers_own():
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        half, full = _minimax(0.5)(ids).logits, _minimax(1.0)(ids).logits
        assert (half - full).abs().max() > 1e-3
        modeling = _modeling()
        init, apply = modeling._cispo_original_rope  # transformers' own functions, kept by install()
        config = _minimax(1.0).config
        mine, _ = modeling.MiniMaxRotaryEmbedding.compute_default_rope_parameters(config)
        assert torch.equal(mine, init(config)[0])
        q, k = torch.randn(1, 2, 8, 16), torch.randn(1, 1, 8, 16)
        cos, sin = modeling.MiniMaxRotaryEmbedding(config)(q, torch.arange(8)[None])
        for a, b in zip(modeling.apply_rotary_pos_emb(q, k, cos, sin), apply(q, k, cos, sin)):
            assert torch.equal(a, b)


def test_a_model_built_before_the_patch_is_repaired():
    modeling = _modeling()
    model = _minimax(0.5)
    rotary = model.model.rotary_emb
    rotary.inv_freq = torch.ones(8)  # as transformers alone builds it: the whole head_dim 16
    honour_partial_rotary(model)
    assert rotary.inv_freq.shape == (4,) and torch.equal(rotary.inv_freq, rotary.original_inv_freq)
    assert "model.rotary_emb.inv_freq" not in model.state_dict()  # nothing saved or synced changes
    assert modeling.apply_rotary_pos_emb is apply_partial_rotary


def _remote_with_half_rotary(tmp_path, rotary_dim: int = HEAD_DIM // 2):
    remote = write_remote_checkpoint(tmp_path / f"remote{rotary_dim}")
    config = {**REMOTE_CONFIG_JSON, "rotary_dim": rotary_dim, "eos_token_id": 49}
    (remote / "config.json").write_text(json.dumps(config))
    return remote


def test_a_published_layout_checkpoint_with_half_rotary_loads_and_learner_equals_engine(
    tmp_path, monkeypatch
):
    """The published convention (rotary_dim = head_dim / 2) loads (no refusal), rotates half the head, and
    the learner's log-probs of what the hf engine sampled equal the engine's behaviour log-probs."""
    monkeypatch.setenv("CISPO_CACHE", str(tmp_path / "cispo"))
    remote = _remote_with_half_rotary(tmp_path)
    learner = load_policy(str(remote), ModelConfig(name=str(remote), fp32_lm_head=False))
    assert learner.model.rotary_emb.inv_freq.numel() * 2 == HEAD_DIM // 2
    link_pretrained(remote, tmp_path / "policy_init")  # the driver's check passes too
    full = load_policy(str(_remote_with_half_rotary(tmp_path, HEAD_DIM)), ModelConfig(name="x"))
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        assert (learner(ids).logits - full(ids).logits).abs().max() > 1e-3

    engine = HFEngine(model_path=str(learner_dir(str(remote))), num_threads=1, seed=3)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]]  # equal lengths: no padding
    gens = engine.generate(prompts, SamplingParams(max_new_tokens=6))
    rows = [p + g.response_ids for p, g in zip(prompts, gens)]
    width = max(map(len, rows))
    input_ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    response = torch.tensor([[0] * 6 + [1] * (len(r) - 6) + [0] * (width - len(r)) for r in rows])
    with torch.no_grad():
        mine, _ = sequence_logprobs(learner, input_ids, attention, response)
    for row, gen in enumerate(gens):
        got = mine[row, 6 : 6 + len(gen.response_ids)]
        torch.testing.assert_close(got, torch.tensor(gen.logprobs), atol=1e-4, rtol=0)


def test_a_rope_the_patch_does_not_cover_is_still_refused(monkeypatch):
    """A partial factor whose rope init ignores it (simulated: transformers' own default init put back)."""
    modeling = _modeling()
    init, _ = modeling._cispo_original_rope
    embedding = modeling.MiniMaxRotaryEmbedding
    monkeypatch.setattr(embedding, "compute_default_rope_parameters", staticmethod(init))
    config = _minimax(0.5).config
    with pytest.raises(ValueError, match=r"RoPE on 8 of 16 head dims .* rotates 16, .* does not cover"):
        check_native_rope(config)


def test_a_bf16_cast_does_not_round_the_rotary_frequencies():
    """model.to(bfloat16) (the learner; DeepSpeed's bf16 engine) would round inv_freq; an engine loaded
    with dtype=bfloat16 keeps float32. The patched rotary forward restores float32 before use."""
    model = _minimax(0.5).to(torch.bfloat16)
    rotary = model.model.rotary_emb
    assert rotary.inv_freq.dtype == torch.bfloat16
    x = torch.zeros(1, 4, 32, dtype=torch.bfloat16)
    cos, _ = rotary(x, torch.arange(400, 404)[None])
    exact, _ = _modeling().MiniMaxRotaryEmbedding.compute_default_rope_parameters(model.config)
    assert rotary.inv_freq.dtype == torch.float32 and torch.equal(rotary.inv_freq, exact)
    expected = torch.cat([torch.outer(torch.arange(400, 404).float(), exact)] * 2, dim=-1).cos()
    assert torch.equal(cos[0], expected.to(torch.bfloat16))


def test_a_pickled_model_patches_the_process_that_unpickles_it(tmp_path):
    """A learner rank gets the driver's module by pickle; its own transformers is unpatched until the
    model's first forward, which must then rotate half the head (not fail on the half-size inv_freq)."""
    import pickle
    import subprocess
    import sys

    model = _minimax(0.5)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9]])
    with torch.no_grad():
        expected = model(ids).logits
    (tmp_path / "model.pkl").write_bytes(pickle.dumps(model))
    torch.save(ids, tmp_path / "ids.pt")
    code = (
        "import pickle, sys, torch; m = pickle.loads(open(sys.argv[1], 'rb').read()); "
        "torch.save(m(torch.load(sys.argv[2])).logits.detach(), sys.argv[3])"
    )
    args = [str(tmp_path / "model.pkl"), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")]
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected, atol=1e-6, rtol=0)
