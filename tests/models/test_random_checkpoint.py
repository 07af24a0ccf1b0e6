"""The rehearsal's random checkpoint trains on what a random model samples, <pad> included (issue #25)."""

from __future__ import annotations

import torch

from cispo.algo.logprobs import sequence_logprobs
from cispo.core.config import ModelConfig
from cispo.driver.policy import load_policy
from cispo.models.loading import learner_dir
from cispo.models.random_checkpoint import write_random_checkpoint


def test_a_sampled_pad_token_leaves_every_gradient_finite(tmp_path):
    """A random model samples <pad> now and then (the rehearsal's first rollout did, in 10 of its 16
    minibatches). With the pad row of the embedding left at zero (nn.Embedding's padding_idx), that
    position's hidden state is zero in every lightning layer and each RMSNorm's backward there multiplies
    the gradient by 1/sqrt(eps) = 316: inf after the 8 layers, and DeepSpeed skipped every such update."""
    torch.manual_seed(0)
    native = learner_dir(str(write_random_checkpoint(tmp_path / "ckpt")), cache=tmp_path / "cache")
    model = load_policy(str(native), ModelConfig(name=str(native), dtype="bfloat16"))
    pad = model.config.pad_token_id
    assert bool(model.get_input_embeddings().weight.abs().sum(dim=1).gt(0).all())  # no all-zero row
    ids = torch.randint(3, model.config.vocab_size, (1, 96))
    ids[0, 60] = pad  # inside the response, attended to like any other sampled token
    mask, response = torch.ones_like(ids), torch.zeros_like(ids)
    response[:, 40:] = 1
    logprobs, _ = sequence_logprobs(model, ids, mask, response)
    (-logprobs.sum()).backward()
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not p.grad.isfinite().all()]
    assert bad == []
