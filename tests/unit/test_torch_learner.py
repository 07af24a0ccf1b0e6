import copy
import pickle

import pytest
import torch

from cispo.core.config import AlgorithmConfig, LearnerConfig, ModelConfig
from cispo.core.testing import tiny_lm
from cispo.core.types import Sample
from cispo.driver.batch import build_train_batch, split_minibatches
from cispo.driver.policy import build_policy, load_tokenizer
from cispo.learner import build_learner
from cispo.learner.micro_batches import token_budget_chunks


def tiny_model():
    tok = load_tokenizer("builtin:char")
    return build_policy(
        ModelConfig(arch={"hidden_size": 32, "intermediate_size": 32, "head_dim": 8}), tok
    ), tok


def make_samples(tok, n=6):
    gen = torch.Generator().manual_seed(0)
    samples = []
    for i in range(n):
        prompt = tok(f"{10 + i}+{20 + i}=")["input_ids"]
        length = 1 + i % 3
        response = torch.randint(4, 20, (length,), generator=gen).tolist()
        old = (-torch.rand(length, generator=gen) * 3).tolist()
        samples.append(
            Sample(
                group_index=i // 3,
                prompt_ids=prompt,
                response_ids=response,
                behaviour_logprobs=old,
                finish_reason="eos",
                policy_version=0,
            )
        )
    return samples


def test_build_train_batch_layout():
    _, tok = tiny_model()
    samples = make_samples(tok, 3)
    batch = build_train_batch(samples, torch.tensor([1.0, -1.0, 0.5]), pad_token_id=0)
    p = len(samples[1].prompt_ids)
    assert batch.response_mask[1].tolist()[p : p + 2] == [1.0, 1.0]
    assert batch.response_mask[1].sum() == 2 and batch.attention_mask[1].sum() == p + 2
    assert batch.old_logprobs[1, p : p + 2].tolist() == pytest.approx(samples[1].behaviour_logprobs)
    assert batch.group_ids.tolist() == [0, 0, 0]


@pytest.mark.parametrize("normalizer", ["token", "group", "sample"])
def test_micro_batching_gives_the_full_batch_update(normalizer):
    model, tok = tiny_model()
    batch = build_train_batch(make_samples(tok), torch.tensor([1.0, -0.5, 0.3, -1.0, 2.0, 0.1]), 0)
    algo = AlgorithmConfig(normalizer=normalizer)
    updated = []
    for budget in (10_000, 9):  # one micro-batch vs one row each
        m = copy.deepcopy(model)
        learner = build_learner(
            "torch",
            model=m,
            cfg=LearnerConfig(lr=1e-2, micro_batch_tokens=budget, warmup_steps=0),
            algorithm=algo,
        )
        metrics = learner.train_step(batch).metrics
        updated.append((m.state_dict(), metrics))
    assert len(token_budget_chunks(batch, 9)) == 6
    for key, value in updated[0][0].items():
        torch.testing.assert_close(updated[1][0][key], value, atol=2e-6, rtol=1e-4)
    assert updated[0][1]["loss"] == pytest.approx(updated[1][1]["loss"], abs=1e-5)
    assert updated[0][1]["entropy"] == pytest.approx(updated[1][1]["entropy"], rel=1e-4)


def test_optimizer_is_the_reports_adamw():
    model, _ = tiny_model()
    learner = build_learner("torch", model=model, cfg=LearnerConfig(), algorithm=AlgorithmConfig())
    group = learner.optimizer.param_groups[0]
    assert group["betas"] == (0.9, 0.95) and group["eps"] == 1e-15


def test_minibatches_partition_the_batch():
    _, tok = tiny_model()
    batch = build_train_batch(make_samples(tok), torch.zeros(6), 0)
    parts = split_minibatches(batch, 4, torch.Generator().manual_seed(0))
    assert sorted(len(p) for p in parts) == [1, 1, 2, 2]
    assert sum(p.num_response_tokens() for p in parts) == batch.num_response_tokens()


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match="unknown learner backend 'jax'"):
        build_learner("jax")


def test_bf16_policy_with_a_tied_fp32_head_trains_and_pickles(tmp_path):
    """Tied embeddings (SmolLM2 and most small chat models) share the head's tensor: keeping the head in
    FP32 makes the input embedding FP32 too, and a bf16 body must still receive bf16 activations."""
    tiny_lm("llama", tie_word_embeddings=True).save_pretrained(tmp_path / "tied")
    model = build_policy(ModelConfig(name=str(tmp_path / "tied"), dtype="bfloat16"), tokenizer=None)
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    assert head.weight is embedding.weight and head.weight.dtype == torch.float32
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    ids = torch.randint(1, 64, (4, 7))
    samples = [
        Sample(0, row[:4].tolist(), row[4:].tolist(), [-1.0] * 3, "eos", 0) for row in ids
    ]  # fmt: skip
    batch = build_train_batch(samples, torch.tensor([1.0, -1.0, 0.5, -0.5]), pad_token_id=0)
    before = head.weight.detach().clone()
    learner = build_learner("torch", model=model, cfg=LearnerConfig(lr=1e-2, warmup_steps=0),
                            algorithm=AlgorithmConfig())  # fmt: skip
    metrics = learner.train_step(batch).metrics
    assert torch.isfinite(torch.tensor(metrics["loss"]))
    assert head.weight is embedding.weight and not torch.equal(head.weight, before)
    pickle.loads(pickle.dumps(model))  # DeepSpeed ranks and Ray workers receive the policy pickled


def test_gradient_checkpointing_recomputes_and_changes_nothing():
    """learner.gradient_checkpointing: per-layer recompute is on, and the update is bit-for-bit the plain one
    (the same operations, run again in backward)."""
    import copy

    from cispo.core.config import AlgorithmConfig, LearnerConfig
    from cispo.learner import build_learner
    from tests.learner.helpers import make_batch, tiny_minimax

    model, tok = tiny_minimax()
    batch = make_batch(tok, 8)
    results = []
    for checkpointing in (False, True):
        cfg = LearnerConfig(lr=1e-2, warmup_steps=0, num_threads=1, gradient_checkpointing=checkpointing)
        learner = build_learner("torch", model=copy.deepcopy(model), cfg=cfg, algorithm=AlgorithmConfig())
        assert learner.model.is_gradient_checkpointing == checkpointing
        results.append((learner.train_step(batch).metrics, learner.state_dict_for_sync()))
    (plain, plain_state), (recomputed, recomputed_state) = results
    assert recomputed["loss"] == plain["loss"] and recomputed["grad_norm"] == plain["grad_norm"]
    for name, value in plain_state.items():
        torch.testing.assert_close(recomputed_state[name], value, atol=0, rtol=0, msg=name)
