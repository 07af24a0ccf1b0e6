import copy
import threading

import pytest
import torch
from torch import nn

from cispo.algo.logprobs import sequence_logprobs
from cispo.core.config import AlgorithmConfig, LearnerConfig
from cispo.core.types import TrainBatch
from cispo.learner import build_learner
from cispo.learner.packing import (
    PackingNotSupported,
    check_packing,
    pack_rows,
    packed_sequence_logprobs,
    padded_fraction,
)
from cispo.models.lightning import (
    LAYOUT_KWARG,
    SequenceLayout,
    install_lightning,
    is_installed,
    lightning_core,
    lightning_layers,
    sequence_layout,
)
from tests.learner.helpers import make_batch, tiny_dense, tiny_minimax

# Rows longer than the tiny MiniMax's block_size (64): several blocks per row, and packed boundaries
# that fall inside a block of the stream (starts 150, 170, 241, 305, 310).
LONG_ROWS = (150, 20, 71, 64, 5, 131)


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


def long_batch(lengths=LONG_ROWS, prompt: int = 4, seed: int = 0) -> TrainBatch:
    gen = torch.Generator().manual_seed(seed)
    rows, width = len(lengths), max(lengths)
    input_ids = torch.zeros(rows, width, dtype=torch.long)
    attention, response = torch.zeros(rows, width, dtype=torch.long), torch.zeros(rows, width)
    for b, n in enumerate(lengths):
        input_ids[b, :n] = torch.randint(4, 20, (n,), generator=gen)
        attention[b, :n] = 1
        response[b, min(prompt, n - 1) : n] = 1
    old = torch.where(response > 0, -torch.rand(rows, width, generator=gen) - 0.5, torch.zeros(()))
    return TrainBatch(
        input_ids, attention, response, old, torch.randn(rows, generator=gen), torch.zeros(rows)
    )


def naive_lightning(q, k, v, slope_rate, starts):
    """Token by token, by the definition: S_t = exp(-slope) S_(t-1) + k_t^T v_t (S = 0 at a sequence
    start), o_t = q_t S_t. The block recurrence must equal it."""
    out = torch.zeros_like(v)
    for a, b in zip(starts, starts[1:]):
        state = torch.zeros(*v.shape[:2], v.shape[-1], v.shape[-1], dtype=torch.float64)
        for t in range(a, b):
            kv = k[:, :, t, :, None].double() * v[:, :, t, None, :].double()
            state = torch.exp(-slope_rate.double()) * state + kv
            out[:, :, t] = (q[:, :, t, None, :].double() @ state)[:, :, 0].to(out.dtype)
    return out


def test_lightning_core_is_the_stock_recurrence_and_resets_at_boundaries():
    model, _ = tiny_minimax()
    layer = lightning_layers(model)[0]
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 150, 8, generator=gen) * 0.5 for _ in range(3))
    slope = layer.slope_rate
    whole = lightning_core(q, k, v, slope, layer.block_size)
    torch.testing.assert_close(whole, naive_lightning(q, k, v, slope, [0, 150]), atol=1e-5, rtol=1e-5)
    starts = [0, 40, 41, 130, 150]  # boundaries inside blocks, a one-token sequence
    packed = lightning_core(q, k, v, slope, layer.block_size, cu_seqlens=torch.tensor(starts))
    torch.testing.assert_close(packed, naive_lightning(q, k, v, slope, starts), atol=1e-5, rtol=1e-5)
    # A cu_seqlens ending before T (a stream padded to a multiple of the SP size): the tail is one more.
    assert torch.equal(lightning_core(q, k, v, slope, layer.block_size, starts[:-1]), packed)
    for a, b in zip(starts, starts[1:]):  # each sequence exactly as alone
        alone = lightning_core(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], slope, layer.block_size)
        assert torch.equal(packed[:, :, a:b], alone)
    # Heads are independent: a head subset with its slopes is that slice of the whole (sequence parallel).
    part = lightning_core(q[:, 1:3], k[:, 1:3], v[:, 1:3], slope[1:3], layer.block_size, starts)
    assert torch.equal(part, packed[:, 1:3])


def test_installed_forward_equals_the_stock_module_bit_for_bit():
    model, _ = tiny_minimax()
    stock = copy.deepcopy(model)
    assert install_lightning(model) == 2 == install_lightning(model)  # idempotent
    assert all(is_installed(m) for m in lightning_layers(model))
    assert not any(is_installed(m) for m in lightning_layers(stock))
    ids = torch.randint(4, 20, (2, 150), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 100:] = 0  # right padding: the padding mask must reach the lightning layers as in stock
    for kwargs in ({}, {"attention_mask": mask}):
        ours = model.model(input_ids=ids, use_cache=False, **kwargs).last_hidden_state
        theirs = stock.model(input_ids=ids, use_cache=False, **kwargs).last_hidden_state
        assert torch.equal(ours, theirs)
    # Generation (a cache) is the stock forward.
    ours = model.generate(ids[:1, :20], max_new_tokens=5, do_sample=False)
    assert torch.equal(ours, stock.generate(ids[:1, :20], max_new_tokens=5, do_sample=False))


def test_minimax_packing_matches_each_row_alone():
    model, _ = tiny_minimax()
    batch = long_batch()
    alone = per_row_logprobs(copy.deepcopy(model), batch)  # the stock model, one row at a time
    check_packing(model)
    packed, _ = packed_sequence_logprobs(model, batch)
    # A boundary leak would be O(0.1) (below); what is left is fp32 rounding of other matmul shapes.
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=0)
    # Why the reset is needed: the stock model on the packed stream lets the rows read earlier rows' state.
    stock, _ = tiny_minimax()
    rows = pack_rows(batch)
    hidden = stock.model(input_ids=rows.input_ids, position_ids=rows.position_ids).last_hidden_state[0]
    start, n = LONG_ROWS[0], LONG_ROWS[1]
    row_alone = stock.model(input_ids=batch.input_ids[1:2, :n]).last_hidden_state[0]
    assert (hidden[start : start + n] - row_alone).abs().max().item() > 1e-2


def _grads(model: nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_minimax_packed_gradients_equal_unpacked(checkpointing):
    model, _ = tiny_minimax()
    batch = long_batch()
    weights = torch.rand(batch.input_ids.shape, generator=torch.Generator().manual_seed(1))
    reference = copy.deepcopy(model)
    expected = _grads(reference, (per_row_logprobs(reference, batch) * weights).sum())
    if checkpointing:  # the recompute runs in backward, after the layout block: it must keep the layout
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    packed, _ = packed_sequence_logprobs(model, batch)
    got = _grads(model, (packed * weights).sum())
    assert got.keys() == expected.keys() and any(".qkv_proj." in name for name in got)
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_checkpoint_recompute_without_the_layout_raises():
    model, _ = tiny_minimax()
    install_lightning(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    rows = pack_rows(long_batch())
    with sequence_layout(cu_seqlens=rows.cu_seqlens):  # contextvar only, backward outside the block
        hidden = model.model(input_ids=rows.input_ids, position_ids=rows.position_ids).last_hidden_state
    with pytest.raises(RuntimeError, match=LAYOUT_KWARG):
        hidden.sum().backward()


@pytest.mark.parametrize("kind", ["dense", "minimax"])
def test_learner_update_is_the_same_packed_or_padded(kind: str):
    _, tok = tiny_minimax()
    model = tiny_dense() if kind == "dense" else tiny_minimax()[0]
    batch = make_batch(tok, 6)
    states = []
    for packing in (False, True):
        cfg = LearnerConfig(lr=1e-2, warmup_steps=0, num_threads=1, packing=packing)
        m = copy.deepcopy(model)
        learner = build_learner("torch", model=m, cfg=cfg, algorithm=AlgorithmConfig())
        metrics = learner.train_step(batch).metrics
        states.append((m.state_dict(), metrics["loss"]))
    assert states[0][1] == pytest.approx(states[1][1], abs=1e-6)
    for key, value in states[0][0].items():
        torch.testing.assert_close(states[1][0][key], value, atol=2e-6, rtol=1e-4)


class ThreadExchange:
    """A HeadExchange between threads (one per simulated sequence-parallel rank), through a shared board."""

    def __init__(self, rank: int, size: int, board: dict, barrier: threading.Barrier) -> None:
        self.rank, self.size, self.board, self.barrier = rank, size, board, barrier

    def _swap(self, x: torch.Tensor) -> list[torch.Tensor]:
        self.board[self.rank] = x
        self.barrier.wait()
        everyone = [self.board[r] for r in range(self.size)]
        self.barrier.wait()
        return everyone

    def head_range(self, num_heads: int) -> tuple[int, int]:
        per = num_heads // self.size
        return self.rank * per, (self.rank + 1) * per

    def scatter_heads(self, x: torch.Tensor) -> torch.Tensor:
        h0, h1 = self.head_range(x.shape[1])
        return torch.cat([part[:, h0:h1] for part in self._swap(x)], dim=2)

    def gather_heads(self, x: torch.Tensor) -> torch.Tensor:
        local = x.shape[2] // self.size
        cols = slice(self.rank * local, (self.rank + 1) * local)
        return torch.cat([part[:, :, cols] for part in self._swap(x)], dim=1)


def test_head_exchange_sequence_parallel_layer_equals_one_process():
    model, _ = tiny_minimax()
    install_lightning(model)
    layer = lightning_layers(model)[1]
    hidden = torch.randn(1, 150, 32, generator=torch.Generator().manual_seed(0))
    starts = (0, 40, 100, 150)  # global; the boundary at 100 is inside rank 1's shard
    with torch.no_grad():
        expected, _ = layer(hidden, None, None, **{LAYOUT_KWARG: SequenceLayout(cu_seqlens=starts)})
    size, board, barrier, out = 2, {}, threading.Barrier(2), {}

    def rank(r: int) -> None:
        layout = SequenceLayout(cu_seqlens=starts, exchange=ThreadExchange(r, size, board, barrier))
        with torch.no_grad():
            out[r], _ = layer(hidden[:, r * 75 : (r + 1) * 75], None, None, **{LAYOUT_KWARG: layout})

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    torch.testing.assert_close(torch.cat([out[0], out[1]], dim=1), expected, atol=1e-6, rtol=0)


class MambaMixer(nn.Module):
    """Stands for a recurrent layer packing has no boundary reset for."""


def test_unknown_recurrent_layers_are_still_refused():
    dense = tiny_dense()
    dense.config.layer_types = ["full_attention", "mamba"]
    with pytest.raises(PackingNotSupported, match="mamba"):
        check_packing(dense)
    dense = tiny_dense()
    dense.model.layers[0].mixer = MambaMixer()
    with pytest.raises(PackingNotSupported, match="MambaMixer"):
        check_packing(dense)
    # linear_attention layers that are not all MiniMax lightning layers (another model's linear attention)
    model, _ = tiny_minimax()
    model.config.layer_types = ["linear_attention"] * 4
    with pytest.raises(PackingNotSupported, match="linear_attention"):
        packed_sequence_logprobs(model, long_batch())
    cfg = LearnerConfig()
    cfg.packing = True
    with pytest.raises(PackingNotSupported, match="token-budget micro-batches"):
        build_learner("torch", model=model, cfg=cfg, algorithm=AlgorithmConfig())
