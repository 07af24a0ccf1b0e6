import pytest
import torch

from cispo.algo.logprobs import naive_token_logprobs, sequence_logprobs, token_logprobs
from cispo.core.testing import tiny_lm


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_equals_naive_forward_and_backward(temperature, with_bias):
    torch.manual_seed(0)
    n, h, v = 37, 16, 101
    hidden = torch.randn(n, h, dtype=torch.float64).float().requires_grad_()
    weight = (torch.randn(v, h) * 0.3).requires_grad_()
    bias = (torch.randn(v) * 0.1).requires_grad_() if with_bias else None
    targets = torch.randint(0, v, (n,))
    coeff = torch.randn(n)  # an arbitrary upstream gradient

    lp, ent = token_logprobs(
        hidden, weight, targets, bias=bias, chunk_size=8, temperature=temperature, with_entropy=True
    )
    (lp * coeff).sum().backward()
    grads = [hidden.grad.clone(), weight.grad.clone()] + ([bias.grad.clone()] if with_bias else [])
    for t in [hidden, weight] + ([bias] if with_bias else []):
        t.grad = None
    lp_ref, ent_ref = naive_token_logprobs(hidden, weight, targets, bias=bias, temperature=temperature)
    (lp_ref * coeff).sum().backward()
    refs = [hidden.grad, weight.grad] + ([bias.grad] if with_bias else [])

    torch.testing.assert_close(lp, lp_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, ent_ref, atol=1e-5, rtol=0)
    for g, r in zip(grads, refs):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


def test_bf16_hidden_uses_fp32_head():
    torch.manual_seed(0)
    hidden = torch.randn(10, 32).bfloat16()
    weight = torch.randn(50, 32).bfloat16()
    targets = torch.randint(0, 50, (10,))
    lp, _ = token_logprobs(hidden, weight, targets, chunk_size=3)
    assert lp.dtype == torch.float32
    # the same numbers as an fp32 computation on the (exactly representable) bf16 values
    ref, _ = naive_token_logprobs(hidden.float(), weight.float(), targets)
    torch.testing.assert_close(lp, ref, atol=1e-5, rtol=0)


def test_sequence_logprobs_matches_full_forward():
    model = tiny_lm("llama", seed=0).eval()
    torch.manual_seed(0)
    input_ids = torch.randint(1, 64, (2, 9))
    attention_mask = torch.ones(2, 9, dtype=torch.long)
    attention_mask[1, 7:] = 0  # right padding
    response_mask = torch.zeros(2, 9)
    response_mask[0, 4:] = 1
    response_mask[1, 3:7] = 1
    lp, ent = sequence_logprobs(
        model, input_ids, attention_mask, response_mask, chunk_size=3, with_entropy=True
    )
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    ref = torch.log_softmax(logits[:, :-1], -1).gather(2, input_ids[:, 1:, None]).squeeze(2)
    ref = torch.nn.functional.pad(ref, (1, 0)) * response_mask
    torch.testing.assert_close(lp.detach(), ref, atol=1e-5, rtol=0)
    assert (lp[response_mask == 0] == 0).all() and (ent[response_mask == 0] == 0).all()
    assert (ent[response_mask == 1] > 0).all()


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="weight must be"):
        token_logprobs(torch.zeros(3, 4), torch.zeros(5, 6), torch.zeros(3, dtype=torch.long))
