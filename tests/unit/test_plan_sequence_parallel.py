"""cispo-plan with learner.sequence_parallel_size (Ulysses): memory per rank at T/SP tokens, the
all-to-all traffic, the smallest SP per stage, and the 512-GPU preset on H200 and on H100
(cispo/driver/sizing.py, cispo/driver/plan.py)."""

from __future__ import annotations

import dataclasses

import pytest

from cispo.driver import sizing
from cispo.driver.plan import PlanOptions, make_plan, render
from cispo.driver.sizing import GIB, Arch, LearnerSetup
from tests.unit.test_config import composed, to_train_config

# As test_plan.TINY (h=8, lightning + softmax, q=8, kv=4, f=16, E=4 top-2, V=10, B=2) but with 4 heads of
# d=2 and 2 KV heads, so SP 2 and 4 divide the heads: the same parameters (3856) and activation elements
# (lightning 284, softmax 220: H*(d*d/B + 2B) = 4*(2 + 4) = 24 as 2*(8 + 4) there).
TINY4 = Arch("t4", 8, ("linear", "full"), 4, 2, 2, 16, 10, experts=4, top_k=2, block_size=2)
MINIMAX = sizing.KNOWN_ARCHS["MiniMaxAI/MiniMax-Text-01"]


def test_sp_2_halves_the_activations_and_the_head_rows():
    assert sizing.total_params(TINY4) == 3856
    assert [sizing.layer_activation_elems(TINY4, k) for k in ("linear", "full")] == [284, 220]
    # ZeRO-3 over 8 ranks (DP 4 x SP 2 or DP 8 x SP 1 alike), bf16: params 2P/8 = 964, grads 964, Adam
    # 12P/8 = 5784, buffers 2P = 7712. T = 100 tokens per micro-batch, recompute, chunk 16.
    one = LearnerSetup("deepspeed", 8, 3, True, False, 100, True, 16)
    two = dataclasses.replace(one, sp=2)
    m1, m2 = sizing.learner_memory(TINY4, one), sizing.learner_memory(TINY4, two)
    fixed = {"parameters": 964, "gradients": 964, "optimizer states": 5784, "ZeRO buffers": 7712}
    # SP 1: activations 100*2*(L*h 16 + 284) = 60000; head 100*h*4 = 3200 + 3*16*V*4 = 1920
    assert m1 == {**fixed, "activations": 60000, "log-prob head": 5120}
    # SP 2: 50 tokens per rank: activations exactly half, the head's rows half (its one chunk stays),
    # and the all-to-all receive buffer of the widest layer: lightning 3q = 24 elements x 50 x 2 bytes
    assert m2 == {**fixed, "activations": 30000, "log-prob head": 1600 + 1920, "Ulysses buffers": 2400}
    assert m2["activations"] * 2 == m1["activations"]
    # the same at MiniMax-Text-01's 80K stage: a row of 82944 tokens, 41472 per rank at SP 2
    big = LearnerSetup("deepspeed", 256, 3, True, True, 82944, True, 1024)
    a1 = sizing.learner_memory(MINIMAX, big)["activations"]
    a2 = sizing.learner_memory(MINIMAX, dataclasses.replace(big, sp=2))["activations"]
    assert a2 * 2 == a1 and a1 / GIB == pytest.approx(110.7, abs=0.05)


def test_all_to_all_bytes_by_hand():
    # per token: softmax q, k, v in (q + 2kv = 16) and the output back (q = 8): 24; lightning 3q = 24 in
    # (no GQA) and 8 back: 32. Both layers: 56 elements.
    assert sizing.ulysses_in_out_elems(TINY4, "full", 2) == (16, 8)
    assert sizing.ulysses_in_out_elems(TINY4, "linear", 2) == (24, 8)
    # SP 2, a rank holding 100 tokens, bf16: it sends 1/2 of 100 x 56 x 2 bytes = 5600 per pass;
    # forward + backward 11200, and 16800 with recompute (the forward once more)
    assert sizing.ulysses_bytes(TINY4, 100, 2, 2, recompute=False) == 11200
    assert sizing.ulysses_bytes(TINY4, 100, 2, 2, recompute=True) == 16800
    # SP 4: 2 KV heads are replicated to 4 first (as cispo.learner.sequence_parallel does), so softmax
    # moves q + 2 x 4 x d = 24 in: 56 + 8 = 64 elements, of which it sends 3/4: 3/4 x 100 x 64 x 2 x 2
    assert sizing.exchanged_kv_heads(TINY4, 4) == 4 and sizing.ulysses_in_out_elems(TINY4, "full", 4) == (
        24,
        8,
    )
    assert sizing.ulysses_bytes(TINY4, 100, 4, 2, recompute=False) == 19200
    # SP 1 sends nothing
    assert sizing.ulysses_bytes(TINY4, 100, 1, 2, recompute=True) == 0


def test_sp_candidates_divide_ranks_node_and_heads():
    assert sizing.sp_candidates(8, 8, TINY4) == [1, 2, 4]  # 4 heads bound it (KV heads replicate)
    assert sizing.sp_candidates(8, 2, TINY4) == [1, 2]  # 2 GPUs per node
    assert sizing.sp_candidates(256, 8, MINIMAX) == [1, 2, 4, 8]  # 8 GPUs per node, 8 KV heads
    assert sizing.sp_candidates(2, 0, MINIMAX) == [1, 2]  # 2 ranks; a CPU cluster sets no node bound
    assert sizing.sp_candidates(12, 8, MINIMAX) == [1, 2, 4]


def test_smallest_sp_for_a_stage_by_hand():
    # totals from the first test: SP 1 15424 + 65120 = 80544, SP 2 15424 + 35920 = 51344; SP 4 (25
    # tokens a rank): activations 15000, head 25*8*4 + 1920 = 2720, buffer 25 x 24 (lightning 3q, softmax
    # q + 2 x 4 replicated KV heads x d) x 2 = 1200: 15424 + 18920 = 34344
    setup = LearnerSetup("deepspeed", 8, 3, True, False, 100, True, 16)
    assert sizing.smallest_sp(TINY4, setup, 8, 80544)[0] == 1
    sp, memory = sizing.smallest_sp(TINY4, setup, 8, 60000)
    assert sp == 2 and sum(memory.values()) == 51344
    sp, memory = sizing.smallest_sp(TINY4, setup, 8, 50000)
    assert sp == 4 and sum(memory.values()) == 34344
    sp, memory = sizing.smallest_sp(TINY4, setup, 8, 30000)  # SP 4 is the largest the heads allow
    assert sp is None and sum(memory.values()) == 34344
    assert sizing.smallest_sp(TINY4, setup, 2, 50000)[0] is None  # 2 GPUs per node: at most SP 2


def preset(sp: int | None = None, **rollout):
    """minimax_m1_512gpu as composed, with learner.sequence_parallel_size set on the object (so the test
    does not depend on the schema having the key yet) and rollout fields replaced."""
    cfg = to_train_config(composed("experiment=minimax_m1_512gpu"))
    if sp is not None:
        cfg.learner.sequence_parallel_size = sp
    for key, value in rollout.items():
        setattr(cfg.rollout, key, value)
    return cfg


def stage_figures(plan) -> list[tuple[int | None, float, float]]:
    return [
        (s.sp_fit, sum(s.learner.values()) / GIB, sum(s.learner_at_fit.values()) / GIB) for s in plan.stages
    ]


def test_the_preset_on_h200_needs_no_sequence_parallelism():
    cfg = preset()
    plan = make_plan(cfg, PlanOptions(gpu="H200"), MINIMAX)
    assert [s.sp_fit for s in plan.stages] == [1] * 6  # every stage up to 80K at SP 1
    assert getattr(cfg.learner, "sequence_parallel_size", 1) == 1 == plan.stages[-1].sp
    assert sum(plan.stages[-1].learner.values()) / GIB == pytest.approx(124.4, abs=0.05)  # of 133.4
    assert plan.all_failures == []
    assert "stage(s) 1, 2, 3, 4, 5, 6 fit with none (size 1)" in render(plan)


def test_the_preset_on_h100_fits_every_stage_with_the_sp_the_plan_names():
    at_sp1 = make_plan(preset(), PlanOptions(gpu="H100"), MINIMAX)
    # H100: 0.95 x 79.6 = 75.6 GiB for the learner. Stage 1 (68.7 GiB) fits at SP 1, 2-6 need SP 2: at 80K
    # 3.3 + 3.3 + 2.8 (ZeRO) + 110.7 / 2 (activations) + 3.2 (head: 41472 rows) + 1.9 (Ulysses buffer:
    # 41472 x 3q x 2 bytes) = 69.9 GiB
    figures = stage_figures(at_sp1)
    assert [f[0] for f in figures] == [1, 2, 2, 2, 2, 2]
    assert [round(f[2], 1) for f in figures] == [68.7, 46.9, 52.7, 58.4, 64.2, 69.9]
    learner_failures = [f for f in at_sp1.all_failures if "learner memory" in f]
    assert len(learner_failures) == 5 and all("sequence_parallel_size=2 fits" in f for f in learner_failures)
    # with SP 2 the learner fits every stage; the rollout's one-node engines do not (bf16 weights
    # 2 x 456.09B / TP 8 = 106.2 GiB per GPU): H100s need engines of 16 GPUs (tensor parallel 16)
    sp2 = make_plan(preset(sp=2), PlanOptions(gpu="H100"), MINIMAX)
    assert not [f for f in sp2.all_failures if "learner" in f]
    assert all("rollout memory per GPU: weights 106.2 GiB > 67.7 GiB" in f for f in sp2.all_failures)
    tp16 = dict(num_workers=16, num_gpus_per_worker=16, engine_kwargs={"tensor_parallel_size": 16})
    h100 = make_plan(preset(sp=2, **tp16), PlanOptions(gpu="H100"), MINIMAX)
    assert h100.all_failures == []
    assert [round(f[1], 1) for f in stage_figures(h100)] == [41.2, 46.9, 52.7, 58.4, 64.2, 69.9]
    assert "128 data parallel x sequence parallel 2 (Ulysses)" in h100.placement[1]


def test_all_to_all_time_of_the_80k_stage_by_hand():
    plan = make_plan(preset(sp=2), PlanOptions(gpu="H100"), MINIMAX)
    last = plan.stages[-1]
    # a rank holds 8192 x 82944 / 256 = 2654208 tokens a step; per token 10 softmax layers x (q + 2kv +
    # q = 18432) + 70 lightning x 4q (32768) = 2478080 elements; bf16, 3 passes (recompute), SP 2 sends
    # half: 2654208 x 2478080 x 2 x 3 / 2 bytes at 450 GB/s
    expected = 2654208 * 2478080 * 2 * 3 / 2 / 450e9
    assert last.all_to_all_s == pytest.approx(expected) and expected == pytest.approx(43.85, abs=0.01)
    at_sp1 = make_plan(preset(), PlanOptions(gpu="H100"), MINIMAX).stages[-1]
    assert last.train_s == pytest.approx(at_sp1.train_s + expected) and at_sp1.all_to_all_s == 0
    faster = make_plan(preset(sp=2), PlanOptions(gpu="H100", sp_bandwidth_gb_s=900), MINIMAX)
    assert faster.stages[-1].all_to_all_s == pytest.approx(expected / 2)


def test_a_sequence_parallel_size_the_heads_or_node_do_not_allow_fails():
    plan = make_plan(preset(sp=16), PlanOptions(gpu="H200"), MINIMAX)
    (failure,) = [f for f in plan.failures if "sequence_parallel_size" in f]
    assert "learner.sequence_parallel_size 16" in failure and "one of [1, 2, 4, 8]" in failure


def test_cispo_plan_on_h200_and_on_h100_as_the_preset_header_says(capsys):
    from cispo.driver.plan import main

    main(["experiment=minimax_m1_512gpu"])  # the preset as it is: H200, sequence_parallel_size 1
    out = capsys.readouterr().out
    assert "on H200" in out and out.rstrip().endswith("fits")
    assert "learner.sequence_parallel_size=1 fits every stage; the smallest that fits per stage: " in out
    h100 = ["experiment=minimax_m1_512gpu", "--gpu", "H100", "learner.sequence_parallel_size=2"]
    h100 += ["rollout.num_workers=16", "rollout.num_gpus_per_worker=16"]
    main([*h100, "rollout.engine_kwargs.tensor_parallel_size=16"])  # the header's H100 command
    out = capsys.readouterr().out
    assert "on H100" in out and out.rstrip().endswith("fits")
    assert "256 deepspeed ranks, ZeRO-3 over all ranks; 128 data parallel x sequence parallel 2" in out
    assert "the smallest that fits per stage: 1, 2, 2, 2, 2, 2" in out
    assert "stage(s) 1 fit with none (size 1)" in out
