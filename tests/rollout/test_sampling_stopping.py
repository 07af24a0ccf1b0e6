"""Sampling distribution, stopping rules and the engine registry (fast, no model)."""

from __future__ import annotations

import math

import pytest
import torch

from cispo.core.types import SamplingParams
from rollout.engine import available_engines, build_engine
from rollout.sampling import process_logits, sample
from rollout.stopping import StopTracker, repetition_cut

LOGITS = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])


def test_default_params_give_plain_log_softmax():
    out = process_logits(LOGITS, SamplingParams())
    assert torch.allclose(out, torch.log_softmax(LOGITS, -1), atol=1e-7)


def test_temperature_top_k_top_p_renormalise_kept_tokens():
    hot = process_logits(LOGITS, SamplingParams(temperature=0.5))
    assert torch.allclose(hot, torch.log_softmax(LOGITS / 0.5, -1), atol=1e-6)
    top2 = process_logits(LOGITS, SamplingParams(top_k=2)).exp()
    assert torch.isfinite(process_logits(LOGITS, SamplingParams(top_k=2))[0, :2]).all()
    assert top2[0, 2:].sum() == 0 and abs(float(top2.sum()) - 1) < 1e-6
    assert abs(float(top2[0, 0]) - 1 / (1 + math.exp(-1))) < 1e-6
    probs = torch.softmax(LOGITS, -1)[0]  # 0.54, 0.20, 0.12, 0.07, 0.03
    nucleus = process_logits(LOGITS, SamplingParams(top_p=0.8)).exp()[0]
    # The smallest prefix with mass >= 0.8 is the first three tokens (0.54 + 0.20 < 0.8 <= + 0.12).
    assert (nucleus[3:] == 0).all()
    assert torch.allclose(nucleus[:3], probs[:3] / probs[:3].sum(), atol=1e-6)


def test_sample_frequencies_and_logprobs_match_the_distribution():
    logprobs = process_logits(LOGITS.expand(40000, -1), SamplingParams(top_k=3))
    tokens, token_logprobs = sample(logprobs, torch.Generator().manual_seed(0))
    freq = torch.bincount(tokens, minlength=5).float() / len(tokens)
    assert (freq - logprobs[0].exp()).abs().max() < 0.01
    assert freq[3:].sum() == 0
    assert torch.equal(token_logprobs, logprobs[0][tokens])


def test_sample_never_draws_excluded_tokens_at_either_end():
    # Excluded tokens first and last: the inverse-CDF draw must skip both the leading zero-mass prefix and
    # the flat tail of the cumulative sum, even for a uniform draw right at the row total.
    row = torch.tensor([float("-inf"), math.log(0.25), math.log(0.75), float("-inf")])
    tokens, token_logprobs = sample(row.expand(40000, -1), torch.Generator().manual_seed(1))
    freq = torch.bincount(tokens, minlength=4).float() / len(tokens)
    assert freq[0] == 0 and freq[3] == 0
    assert abs(float(freq[1]) - 0.25) < 0.01
    assert torch.isfinite(token_logprobs).all()


def test_stop_tracker_priorities_and_counts():
    params = SamplingParams(max_new_tokens=4, eos_token_ids=(9,), repetition_stop_tokens=2)
    tracker = StopTracker(3, params, torch.device("cpu"))
    sure, unsure = math.log(0.995), math.log(0.5)
    steps = [
        ([1, 1, 1], [sure, unsure, unsure]),
        ([1, 9, 1], [sure, sure, unsure]),  # row 0: 2 confident in a row; row 1: EOS
        ([0, 0, 1], [unsure, unsure, unsure]),
        ([0, 0, 1], [unsure, unsure, unsure]),
    ]
    done = [tracker.update(torch.tensor(t), torch.tensor(lp)) for t, lp in steps]
    assert done == [False, False, False, True]
    assert tracker.reasons() == ["repetition", "eos", "length"]
    assert tracker.num_tokens.tolist() == [2, 2, 4]


def test_repetition_cut_matches_the_live_rule():
    sure, unsure = math.log(0.999), math.log(0.9)
    assert repetition_cut([unsure, sure, sure, sure, unsure], 3, 0.99) == 4
    assert repetition_cut([sure, sure, unsure, sure, sure], 3, 0.99) is None
    assert repetition_cut([sure] * 5, 0, 0.99) is None


def test_registry_errors_are_clear():
    assert {"hf", "vllm"} <= set(available_engines())
    with pytest.raises(ValueError, match="registered: hf, vllm"):
        build_engine("nope")
    try:
        import vllm  # noqa: F401

        if torch.cuda.is_available():
            pytest.skip("vllm and a GPU are present; the missing-dependency error cannot be shown")
    except ImportError:
        pass
    with pytest.raises(RuntimeError, match="engine 'vllm' needs"):
        build_engine("vllm", model_path="unused")
