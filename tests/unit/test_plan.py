"""cispo-plan: its arithmetic against numbers worked out by hand, the exit naming what does not fit, and
the 512-GPU preset fitting (cispo/driver/plan.py, cispo/driver/sizing.py, validate.check_placement)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from cispo.driver import sizing
from cispo.driver.plan import PlanOptions, main, make_plan, resolve_arch, split_options
from cispo.driver.sizing import GIB, Arch, LearnerSetup, RolloutSetup
from cispo.driver.validate import check_placement
from tests.unit.test_config import composed, to_train_config

# h=8, layers (lightning, softmax), H=2 heads of d=4 (q=8), 1 KV head (kv=4), f=16, E=4 experts top-2,
# V=10, untied, lightning block B=2.
TINY = Arch("t", 8, ("linear", "full"), 2, 1, 4, 16, 10, experts=4, top_k=2, block_size=2)


def test_parameters_by_hand():
    # softmax mixer 2*h*q + 2*h*kv = 2*8*8 + 2*8*4 = 192; lightning 5*h*q + q = 320 + 8 = 328
    assert sizing.mixer_params(TINY, "full") == 192 and sizing.mixer_params(TINY, "linear") == 328
    # per layer + 2h (16) + router h*E (32) + E*3*h*f (4*384 = 1536) = +1584: 1912 and 1776;
    # total 1912 + 1776 + final norm 8 + embedding and head 2*V*h = 160 -> 3856
    assert sizing.total_params(TINY) == 3856
    # active: top-2 experts 2*384 = 768, so +816 per layer: 1144 + 1008 + 8 = 2160; FLOPs add the head 80
    assert sizing.active_params(TINY) == 2160 and sizing.flop_params(TINY) == 2240


def test_parameter_formula_matches_transformers_minimax():
    from transformers import MiniMaxConfig, MiniMaxForCausalLM

    config = MiniMaxConfig(
        vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=4, num_local_experts=4, num_experts_per_tok=2, block_size=2,
        layer_types=["linear_attention", "full_attention"], tie_word_embeddings=False,
    )  # fmt: skip
    model = MiniMaxForCausalLM(config)
    assert sizing.arch_from_hf_config(config, "t") == TINY
    assert sum(p.numel() for p in model.parameters()) == sizing.total_params(TINY) == 3856


def test_minimax_table_reproduces_the_published_counts():
    arch = sizing.KNOWN_ARCHS["MiniMaxAI/MiniMax-Text-01"]
    assert abs(sizing.total_params(arch) / 456e9 - 1) < 0.001  # 456.09B
    assert abs(sizing.active_params(arch) / 45.9e9 - 1) < 0.002  # 45.94B
    assert (arch.count("linear"), arch.count("full")) == (70, 10)


def test_learner_memory_by_hand():
    # elements per token: lightning 4h + 8q + H*(d*d/B + 2B) + E + k*(2h + 4f) = 32 + 64 + 2*(8 + 4) + 4
    # + 2*(16 + 64) = 284; softmax 4h + 2q + 2kv + E + k*(2h + 4f) = 32 + 16 + 8 + 4 + 160 = 220
    assert sizing.layer_activation_elems(TINY, "linear") == 284
    assert sizing.layer_activation_elems(TINY, "full") == 220
    # T=100, bf16: without recompute 100*2*(284 + 220) = 100800; with it 100*2*(L*h = 16 + 284) = 60000
    assert sizing.activation_bytes(TINY, 100, 2, recompute=False) == 100800
    assert sizing.activation_bytes(TINY, 100, 2, recompute=True) == 60000
    # head: T*h*4 = 3200 + 3 * chunk 16 * V 10 * 4 = 1920 -> 5120
    assert sizing.head_bytes(TINY, 100, 16) == 5120
    # ZeRO-3, bf16, 4 ranks, P = 3856: params 2P/4 = 1928, grads 1928, Adam 12P/4 = 11568, buffers 2P
    setup = LearnerSetup("deepspeed", 4, 3, True, False, 100, True, 16)
    expected = {"parameters": 1928, "gradients": 1928, "optimizer states": 11568, "ZeRO buffers": 7712}
    assert sizing.learner_memory(TINY, setup) == {**expected, "activations": 60000, "log-prob head": 5120}
    # ZeRO-1: only the Adam states sharded; ZeRO-0 with offload: none on the GPU
    stage1 = sizing.learner_memory(TINY, LearnerSetup("deepspeed", 4, 1, True, False, 100, True, 16))
    assert (stage1["parameters"], stage1["gradients"], stage1["optimizer states"]) == (7712, 7712, 11568)
    assert (
        sizing.learner_memory(TINY, LearnerSetup("deepspeed", 4, 0, True, True, 100, True, 16))[
            "optimizer states"
        ]
        == 0
    )
    # torch, fp32: params 4P = 15424, grads 15424, two moments 8P = 30848; fp32 activations 100*4*300
    torch32 = sizing.learner_memory(TINY, LearnerSetup("torch", 1, 0, False, False, 100, True, 16))
    assert torch32 == {
        "parameters": 15424, "gradients": 15424, "optimizer states": 30848,
        "activations": 120000, "log-prob head": 5120,
    }  # fmt: skip
    # micro-batches of equal rows: as many rows as fit the token budget, at least one
    assert sizing.micro_batch_tokens(81920, 82944) == 82944
    assert sizing.micro_batch_tokens(131072, 41984) == 125952


def test_rollout_memory_and_flops_by_hand():
    # TP 2, bf16, 3 sequences of 50 tokens. weights 3856*2/2 = 3856; KV: 1 softmax layer * (K, V) * one
    # KV head (1 // 2 -> replicated, 1) * d 4 * 2 bytes = 16 B per token -> 16*50*3 = 2400; lightning
    # state: 1 layer * (2 // 2 = 1 head) * 4*4 * 2 bytes = 32 B per sequence -> 96
    mem = sizing.rollout_memory(
        TINY, RolloutSetup(tp=2, dtype_bytes=2, concurrent=3, tokens=50, usable_fraction=1)
    )
    assert mem == {"weights": 3856, "KV cache": 2400, "lightning state": 96}
    # training attention, S=10: softmax 2*q*S^2 = 1600, lightning q*(4d + 2B)*S = 8*20*10 = 1600; x3
    assert sizing.attention_train_flops(TINY, 10) == 9600
    # generation p=3, 4 new: 2*2240*7 = 31360; softmax 4*q*(p*n + n(n-1)/2) = 32*18 = 576; lightning
    # 4*q*d*n = 512 -> 32448
    assert sizing.generation_flops(TINY, 3, 4) == 32448
    # 2 H200s at 50%: 989.4e12 * 2 * 0.5 FLOP/s
    assert sizing.seconds(989.4e12, 2, sizing.GPUS["H200"], 0.5) == pytest.approx(1.0)


def test_over_names_the_term_that_does_not_fit():
    terms = {"optimizer states": 95 * GIB, "activations": 3 * GIB}
    assert sizing.over(terms, 80 * GIB) == "optimizer states 95.0 GiB > 80.0 GiB"
    assert sizing.over(terms, 97 * GIB) == "total 98.0 GiB > 97.0 GiB (largest: optimizer states 95.0 GiB)"
    assert sizing.over(terms, 98 * GIB) is None


def test_the_default_run_planned_by_hand():
    cfg = to_train_config(composed())
    arch, counted = resolve_arch(cfg)
    assert counted == sizing.total_params(arch) == 1864064  # formula == the tiny MiniMax actually built
    plan = make_plan(cfg, PlanOptions(gpu="H100", prompt_tokens=10), arch)
    (stage,) = plan.stages
    # 32 prompts x 8 samples = 256 sequences of 10 + 6 tokens; one CPU worker holds all 256 at once;
    # micro-batches of 16384 // 16 = 1024 rows = 16384 tokens
    assert (stage.sequences, stage.tokens, stage.concurrent, stage.waves) == (256, 4096, 256, 1)
    assert stage.micro_batch_tokens == 16384
    # the torch learner in fp32: params, grads 4P each, Adam moments 8P
    p = 1864064
    assert (stage.learner["parameters"], stage.learner["optimizer states"]) == (4 * p, 8 * p)
    assert plan.all_failures == []


def test_the_512_gpu_preset_fits_every_stage(capsys):
    main(["experiment=minimax_m1_512gpu"])
    out = capsys.readouterr().out
    assert "on H200" in out and "fits" in out.splitlines()[-1]
    assert "learner     256 GPUs = 32 nodes x 8: 256 deepspeed ranks, ZeRO-3" in out
    assert "rollout     256 GPUs = 32 nodes x 8: 32 vllm engines x 8 GPUs, tensor parallel 8" in out
    rows = [line.split() for line in out.splitlines() if line[:5].strip().isdigit()]
    assert [int(r[1]) for r in rows] == [40960, 49152, 57344, 65536, 73728, 81920]
    assert "MiniMax-Text-01: 456.09B parameters, 45.94B active" in out


def test_an_oversized_config_exits_naming_the_term(capsys):
    too_few_ranks = [
        "experiment=minimax_m1_512gpu", "learner.num_ranks=32", "cluster.learner_gpus=32",
        "learner.offload_optimizer=false",
    ]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main(too_few_ranks)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    # Adam states 12 B x 456.09B / 32 ranks = 159.3 GiB, over 0.95 x 140.4 GiB
    assert "stage 1 (budget 40960): learner memory per GPU: optimizer states 159.3 GiB > 133.4 GiB" in err
    with pytest.raises(SystemExit) as exit_info:
        main(["experiment=minimax_m1_512gpu", "--gpu", "H100"])
    # bf16 weights 2 B x 456.09B / TP 8 = 106.2 GiB, over vLLM's 0.85 x 79.6 GiB
    assert exit_info.value.code == 1
    assert "rollout memory per GPU: weights 106.2 GiB > 67.7 GiB" in capsys.readouterr().err


def test_plan_options_and_config_errors(capsys):
    options, rest = split_options(["--gpu", "b200", "plan.recompute=false", "algorithm=grpo"])
    assert (options.gpu, options.recompute, rest) == ("B200", False, ["algorithm=grpo"])
    with pytest.raises(ValueError, match=r"config error at plan\.gpu: one of \['B200', 'H100', 'H200'\]"):
        split_options(["--gpu=A100"])
    for bad, message in [
        (["plan.mfu=0.5"], "config error at plan.mfu: unknown plan option"),
        (["learner.zero_stage=7"], "config error at learner.zero_stage"),
        (
            ["experiment=minimax_m1_512gpu", "cluster.learner_gpus=128"],
            "config error at cluster.learner_gpus",
        ),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(bad)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_check_placement_on_a_gpu_cluster():
    cfg = to_train_config(composed("experiment=minimax_m1_512gpu"))
    check_placement(cfg)
    cfg.rollout.num_workers = 16
    with pytest.raises(ValueError, match=r"cluster\.rollout_gpus: 256 GPUs but .* = 16 x 8 = 128"):
        check_placement(cfg)
    # where the engine kwargs carry a tensor-parallel size, it must span the worker's GPUs
    rollout = SimpleNamespace(
        engine="vllm", num_workers=32, num_gpus_per_worker=8.0, engine_kwargs={"tensor_parallel_size": 1}
    )
    with pytest.raises(ValueError, match=r"rollout\.engine_kwargs\.tensor_parallel_size: 1 but"):
        check_placement(SimpleNamespace(cluster=cfg.cluster, learner=cfg.learner, rollout=rollout))
    cfg.cluster.gpus_per_node = 0  # a CPU cluster: nothing to account
    check_placement(cfg)
