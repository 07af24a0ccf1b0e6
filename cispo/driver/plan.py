"""`cispo-plan`: will this config fit, where does it run, and how long is a step? Before renting the GPUs.

cispo-plan                                           # the default run, as if on H200s
cispo-plan experiment=minimax_m1_512gpu              # the 512-GPU preset, every curriculum stage
cispo-plan experiment=minimax_m1_512gpu --gpu B200   # or plan.gpu=B200
cispo-plan learner.zero_stage=2 plan.recompute=false plan.prompt_tokens=2048 plan.mfu_train=0.4
cispo-plan experiment=minimax_m1_512gpu --gpu H100 learner.sequence_parallel_size=2   # Ulysses SP

It takes the same Hydra config as cispo-train (composed and validated the same way: unknown keys, bad
values and unresolvable names fail with the key's name, exit 2) plus plan options (`--gpu`, `plan.KEY=V`,
see PlanOptions). It prints the placement (nodes x GPUs for the learner and for rollout), per-GPU learner
memory (parameters, gradients, Adam states for the ZeRO stage, activations, the FP32 log-prob head; with
learner.sequence_parallel_size S each rank holds 1/S of a micro-batch's tokens), the smallest S that fits
each stage, per-GPU rollout memory (weights / tensor-parallel size, the softmax layers' KV cache and the
lightning layers' fixed state for the concurrent sequences at each stage's budget), tokens per step and a
step-time estimate: FLOPs (6 x active x tokens to train, 2 x active x tokens to generate, plus attention)
at an assumed MFU, for decoding the HBM-bandwidth floor as well, and the sequence-parallel all-to-alls at
NVLink bandwidth. The formulas are in cispo/driver/sizing.py. What does not fit: its term, per stage; exit 1.

Model facts: the tiny in-repo MiniMax is built from model.arch and counted; a local directory's
config.json is read; hub ids that may not load offline come from sizing.KNOWN_ARCHS (MiniMax-Text-01 / M1).
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cispo.core.config import TrainConfig
from cispo.core.launch import add_launch_dir
from cispo.driver import sizing
from cispo.driver.sizing import GIB, GPUS, Arch, Gpu, LearnerSetup, RolloutSetup

LEARNER_USABLE = 0.95  # of a learner GPU: the rest for the CUDA context, NCCL and fragmentation


@dataclass
class PlanOptions:
    gpu: str = "H200"
    mfu_train: float = 0.35  # model FLOP utilisation assumed for the learner's forward + backward
    mfu_generate: float = 0.10  # ... and for generation (decoding is bandwidth-bound; see the HBM floor)
    prompt_tokens: int = 1024  # prompt length assumed per sequence
    recompute: bool | None = None  # per-layer activation checkpointing (None: learner.gradient_checkpointing)
    sp_bandwidth_gb_s: float = 0.0  # all-to-all bandwidth per GPU and direction (0: the GPU's NVLink)

    def __post_init__(self) -> None:
        if self.gpu not in GPUS:
            raise ValueError(f"config error at plan.gpu: one of {sorted(GPUS)}, got {self.gpu!r}")
        for key in ("mfu_train", "mfu_generate"):
            if not 0 < getattr(self, key) <= 1:
                raise ValueError(f"config error at plan.{key}: must be in (0, 1]")
        if self.prompt_tokens < 0:
            raise ValueError("config error at plan.prompt_tokens: must be >= 0")
        if self.sp_bandwidth_gb_s < 0:
            raise ValueError("config error at plan.sp_bandwidth_gb_s: must be >= 0 (0: the GPU's NVLink)")


@dataclass
class StagePlan:
    budget: int
    sequences: int
    tokens: int  # prompt + response tokens per step (responses at the full budget: an upper bound)
    concurrent: int  # sequences one engine holds at once
    waves: int  # rounds of `concurrent` sequences an engine decodes per step
    micro_batch_tokens: int
    rollout: dict[str, float]
    learner: dict[str, float]
    activations_other: float  # the activation term with recompute flipped, for comparison
    sp: int  # learner.sequence_parallel_size, as configured
    sp_fit: int | None  # the smallest sequence-parallel size whose learner memory fits; None: none does
    learner_at_fit: dict[str, float]  # learner memory at sp_fit (at the largest candidate when None)
    train_s: float  # compute at the assumed MFU plus the all-to-alls
    all_to_all_s: float  # the sequence-parallel all-to-alls, part of train_s
    generate_s: float  # FLOPs at the assumed MFU
    decode_floor_s: float  # HBM bandwidth floor
    step_s: float
    failures: list[str] = field(default_factory=list)


@dataclass
class Plan:
    arch: Arch
    gpu: Gpu
    options: PlanOptions
    placement: list[str]
    assumptions: list[str]
    stages: list[StagePlan]
    counted_params: int | None = None
    failures: list[str] = field(default_factory=list)

    @property
    def all_failures(self) -> list[str]:
        return self.failures + [f for s in self.stages for f in s.failures]


# ---------------------------------------------------------------- model facts


def resolve_arch(cfg: TrainConfig) -> tuple[Arch, int | None]:
    """The architecture, and the parameter count of a model actually built (tiny_minimax) or None."""
    name = cfg.model.name
    if name == "tiny_minimax":
        from cispo.driver.policy import count_parameters, load_tokenizer, tiny_minimax

        tokenizer = load_tokenizer(cfg.model.tokenizer_spec())
        model = tiny_minimax(len(tokenizer), tokenizer, **dict(cfg.model.arch))
        return sizing.arch_from_hf_config(model.config, "tiny_minimax"), count_parameters(model)
    if name in sizing.KNOWN_ARCHS:
        return sizing.KNOWN_ARCHS[name], None
    try:
        from transformers import AutoConfig

        config = _native_minimax_config(Path(name).expanduser()) or AutoConfig.from_pretrained(
            str(Path(name).expanduser()), local_files_only=True
        )
    except Exception as err:  # noqa: BLE001 - any failure to load means: not describable offline
        raise ValueError(
            f"config error at model.name: cispo-plan cannot load a config for {name!r} offline ({err}); "
            f"use a local directory with config.json or one of {sorted(sizing.KNOWN_ARCHS)}"
        ) from None
    return sizing.arch_from_hf_config(config, name), None


def _native_minimax_config(path: Path) -> Any:
    """A MiniMax checkpoint in the published remote-code layout, described by the native config the
    learner converts it to (read without its remote code); None for anything else."""
    from cispo.models.convert import read_config
    from cispo.models.minimax_layout import config_to_native, layout_of

    if not (path / "config.json").is_file() or layout_of(raw := read_config(path)) != "remote":
        return None
    from transformers import MiniMaxConfig

    return MiniMaxConfig.from_dict(config_to_native(raw))


# ---------------------------------------------------------------- engine and placement


def engine_settings(cfg: TrainConfig) -> tuple[dict[str, Any], list[str]]:
    """What the engines are given (the driver's engine kwargs, plus rollout.engine_kwargs where the schema
    has it) with tensor_parallel_size and gpu_memory_utilization filled in; notes on what was assumed."""
    from cispo.driver.build import engine_kwargs

    kwargs = {**engine_kwargs(cfg, None, 1), **dict(getattr(cfg.rollout, "engine_kwargs", None) or {})}
    notes: list[str] = []
    gpus = cfg.rollout.num_gpus_per_worker
    if "tensor_parallel_size" not in kwargs:
        kwargs["tensor_parallel_size"] = max(1, int(gpus)) if cfg.rollout.engine == "vllm" else 1
        if cfg.rollout.engine == "vllm" and gpus > 1:
            notes.append(
                f"tensor parallel {kwargs['tensor_parallel_size']} assumed from rollout.num_gpus_per_worker: "
                "the engine kwargs carry no tensor_parallel_size (VLLMEngine alone would use 1)"
            )
    if "gpu_memory_utilization" not in kwargs:
        default = 0.95
        if cfg.rollout.engine == "vllm":
            from rollout.vllm_engine import VLLMEngine

            default = inspect.signature(VLLMEngine).parameters["gpu_memory_utilization"].default
        kwargs["gpu_memory_utilization"] = default
    return kwargs, notes


def _nodes(gpus: int, per_node: int) -> str:
    if per_node <= 0:
        return f"{gpus} GPUs"
    return f"{gpus} GPUs = {sizing.ceil_div(gpus, per_node)} nodes x {per_node}"


def placement(cfg: TrainConfig, tp: int, arch: Arch) -> tuple[list[str], list[str]]:
    cluster, rollout, learner = cfg.cluster, cfg.rollout, cfg.learner
    per_node, nodes = cluster.gpus_per_node, cluster.num_nodes
    ranks = learner.num_ranks if learner.backend == "deepspeed" else 1
    learner_gpus = cluster.learner_gpus or (ranks if per_node else 0)
    rollout_gpus = cluster.rollout_gpus or round(rollout.num_workers * rollout.num_gpus_per_worker)
    how = f"ZeRO-{learner.zero_stage}" if learner.backend == "deepspeed" else "one process"
    sp = sequence_parallel_size(cfg)
    if sp > 1:
        how += f" over all ranks; {ranks // sp} data parallel x sequence parallel {sp} (Ulysses)"
    offload = (
        ", optimizer states on the CPU"
        if learner.backend == "deepspeed" and learner.offload_optimizer
        else ""
    )
    lines, failures = [], []
    engines = f"{rollout.num_workers} {rollout.engine} engines"
    if per_node > 0:
        lines += [
            f"allocation  {nodes} nodes x {per_node} GPUs = {nodes * per_node} GPUs, "
            f"placement {cluster.placement_strategy}",
            f"learner     {_nodes(learner_gpus, per_node)}: {ranks} {learner.backend} ranks, {how}{offload}",
            f"rollout     {_nodes(rollout_gpus, per_node)}: {engines} x "
            f"{rollout.num_gpus_per_worker:g} GPUs, tensor parallel {tp}",
        ]
    else:
        lines += [
            "allocation  CPU only (cluster.gpus_per_node=0): per-GPU figures are per process",
            f"learner     {ranks} {learner.backend} process(es), {how}",
            f"rollout     {engines}, tensor parallel {tp}",
        ]
    if per_node > 0 and learner_gpus + rollout_gpus > nodes * per_node:
        failures.append(
            f"placement: learner {learner_gpus} + rollout {rollout_gpus} GPUs > {nodes} nodes x {per_node}"
        )
    if arch.heads % tp:
        failures.append(f"rollout tensor parallel: {arch.heads} attention heads not divisible by {tp}")
    if sp not in (candidates := sizing.sp_candidates(ranks, per_node, arch)):
        failures.append(
            f"learner.sequence_parallel_size {sp}: a power of 2 dividing the {ranks} ranks, "
            f"{'the ' + str(per_node) + ' GPUs per node ' if per_node else ''}and the {arch.heads} "
            f"attention heads: one of {candidates}"
        )
    return lines, failures


# ---------------------------------------------------------------- the plan


def budgets(cfg: TrainConfig) -> list[int]:
    if cfg.curriculum.enabled:
        return [stage.budget for stage in cfg.curriculum.stages]
    return [cfg.rollout.max_new_tokens]


def sequence_parallel_size(cfg: TrainConfig) -> int:
    """learner.sequence_parallel_size (read with getattr: 1 on a schema without it; torch: one process)."""
    if cfg.learner.backend != "deepspeed":
        return 1
    return int(getattr(cfg.learner, "sequence_parallel_size", 1))


def learner_setup(cfg: TrainConfig, opts: PlanOptions, mbt: int, sp: int) -> LearnerSetup:
    learner = cfg.learner
    ranks = learner.num_ranks if learner.backend == "deepspeed" else 1
    return LearnerSetup(
        learner.backend, ranks, learner.zero_stage, cfg.model.dtype == "bfloat16", learner.offload_optimizer,
        mbt, bool(opts.recompute), learner.logprob_chunk_size, sp,
    )  # fmt: skip


def plan_stage(
    cfg: TrainConfig, arch: Arch, gpu: Gpu, opts: PlanOptions, engine: dict[str, Any], budget: int
):
    rollout = cfg.rollout
    tp, util = int(engine["tensor_parallel_size"]), float(engine["gpu_memory_utilization"])
    sequences = cfg.data.prompts_per_step * cfg.algorithm.group_size
    row = opts.prompt_tokens + budget
    per_worker = sizing.ceil_div(sequences, rollout.num_workers)
    concurrent = min(rollout.max_batch_size, per_worker)
    rollout_bytes = 2 if rollout.dtype == "bfloat16" else 4
    r_setup = RolloutSetup(tp, rollout_bytes, concurrent, row, util)
    r_mem = sizing.rollout_memory(arch, r_setup)
    mbt = sizing.micro_batch_tokens(cfg.learner.micro_batch_tokens, row)
    if opts.recompute is None:
        opts.recompute = cfg.learner.gradient_checkpointing
    sp = sequence_parallel_size(cfg)
    setup = learner_setup(cfg, opts, mbt, sp)
    l_mem = sizing.learner_memory(arch, setup)
    act_bytes = 2 if setup.bf16 else 4
    other = sizing.activation_bytes(arch, sizing.ceil_div(mbt, sp), act_bytes, not opts.recompute)
    memory = gpu.memory_gib * GIB
    sp_fit, at_fit = sizing.smallest_sp(arch, setup, cfg.cluster.gpus_per_node, LEARNER_USABLE * memory)
    train_flops = 6 * sizing.flop_params(arch) * sequences * row
    train_flops += sequences * sizing.attention_train_flops(arch, row)
    sent = sizing.ulysses_bytes(arch, sequences * row / setup.ranks, sp, act_bytes, setup.recompute)
    a2a_s = sent / ((opts.sp_bandwidth_gb_s or gpu.nvlink_gb_s) * 1e9)
    train_s = sizing.seconds(train_flops, setup.ranks, gpu, opts.mfu_train) + a2a_s
    gen_flops = sequences * sizing.generation_flops(arch, opts.prompt_tokens, budget)
    generate_s = sizing.seconds(gen_flops, rollout.num_workers * tp, gpu, opts.mfu_generate)
    waves = sizing.ceil_div(per_worker, concurrent)
    read = sizing.decode_read_bytes(arch, r_setup, opts.prompt_tokens + budget / 2)  # mean live length
    floor_s = sizing.decode_bound_seconds(waves, budget, read, gpu)
    gen_time = max(generate_s, floor_s)
    step_s = max(gen_time, train_s) if cfg.algorithm.max_staleness else gen_time + train_s
    stage = StagePlan(
        budget, sequences, sequences * row, concurrent, waves, mbt, r_mem, l_mem, other, sp, sp_fit, at_fit,
        train_s, a2a_s, generate_s, floor_s, step_s,
    )  # fmt: skip
    if (why := sizing.over(r_mem, util * memory)) is not None:
        stage.failures.append(
            f"rollout memory per GPU: {why} (gpu_memory_utilization {util:g} of {gpu.name})"
        )
    if (why := sizing.over(l_mem, LEARNER_USABLE * memory)) is not None:
        hint = (
            f"; learner.sequence_parallel_size={sp_fit} fits" if sp_fit and sp_fit > sp
            else "; no sequence-parallel size fits" if sp_fit is None else ""
        )  # fmt: skip
        stage.failures.append(f"learner memory per GPU: {why} ({LEARNER_USABLE:g} of {gpu.name}){hint}")
    return stage


def make_plan(cfg: TrainConfig, opts: PlanOptions, arch: Arch | None = None) -> Plan:
    counted = None
    if arch is None:
        arch, counted = resolve_arch(cfg)
    gpu = GPUS[opts.gpu]
    engine, notes = engine_settings(cfg)
    lines, failures = placement(cfg, int(engine["tensor_parallel_size"]), arch)
    stages = [plan_stage(cfg, arch, gpu, opts, engine, b) for b in budgets(cfg)]
    for index, stage in enumerate(stages):
        prefix = f"stage {index + 1} (budget {stage.budget})" if len(stages) > 1 else f"budget {stage.budget}"
        stage.failures = [f"{prefix}: {f}" for f in stage.failures]
    assumptions = [
        f"prompts of {opts.prompt_tokens} tokens (plan.prompt_tokens) and every response at the full budget, "
        "so tokens and time are upper bounds",
        f"MFU {opts.mfu_train:.0%} training, {opts.mfu_generate:.0%} generation (plan.mfu_train, "
        "plan.mfu_generate); decoding takes at least the HBM floor (each step reads weights and cache)",
        f"learner activation recompute {'on' if opts.recompute else 'off'} (learner.gradient_checkpointing, "
        "or plan.recompute to ask what if): per-layer checkpointing",
        f"learner GPUs keep {1 - LEARNER_USABLE:.0%} free; engines use gpu_memory_utilization "
        f"{engine['gpu_memory_utilization']:g}",
        f"sequence parallel (Ulysses) all-to-alls at {opts.sp_bandwidth_gb_s or gpu.nvlink_gb_s:g} GB/s per "
        "GPU and direction (plan.sp_bandwidth_gb_s; default the GPU's peak NVLink: an SP group stays in a "
        "node), not overlapped with compute",
        *notes,
    ]
    return Plan(arch, gpu, opts, lines, assumptions, stages, counted, failures)


# ---------------------------------------------------------------- output


def _gib(value: float) -> str:
    if value == 0:
        return "0 (on the CPU)"
    return f"{value / GIB:.1f} GiB" if value >= 0.05 * GIB else f"{value / 2**20:.2f} MiB"


def _count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def _duration(s: float) -> str:
    return f"{s:.3g} s" if s < 120 else f"{s / 60:.1f} min" if s < 3600 else f"{s / 3600:.2f} h"


def _terms(terms: dict[str, float]) -> str:
    return ", ".join(f"{k} {_gib(v)}" for k, v in terms.items()) + f" = {_gib(sum(terms.values()))}"


def render(p: Plan, title: str = "") -> str:
    a, g = p.arch, p.gpu
    out = [
        f"cispo-plan{': ' + title if title else ''} on {g.name} ({g.memory_gib:g} GiB, {g.bf16_tflops:g} "
        f"TFLOP/s dense BF16, {g.hbm_tb_s:g} TB/s)",
        f"model       {a.name}: {_count(sizing.total_params(a))} parameters"
        + (f" (counted {p.counted_params:,})" if p.counted_params else "")
        + f", {_count(sizing.active_params(a))} active + {_count(a.vocab * a.hidden)} head per token; "
        f"{len(a.layer_types)} layers ({a.count('linear')} lightning, {a.count('full')} softmax), "
        f"{a.experts} experts top-{a.top_k}" + (f" [published: {a.published}]" if a.published else ""),
        *p.placement,
        *(f"assume      {line}" for line in p.assumptions),
    ]
    last = p.stages[-1]
    held = f", {sizing.ceil_div(last.micro_batch_tokens, last.sp)} per rank at sequence parallel {last.sp}"
    out.append(f"learner per GPU at budget {last.budget} (micro-batch {last.micro_batch_tokens} tokens"
               f"{held if last.sp > 1 else ''}): {_terms(last.learner)}; activations without"
               f"{' ' if p.options.recompute else 'with '}recompute would be "
               f"{_gib(last.activations_other)}")  # fmt: skip
    out.append(
        f"rollout per GPU at budget {last.budget} ({last.concurrent} sequences per engine): "
        + _terms(last.rollout)
    )
    header = (
        "stage  budget  seqs/step  tokens/step  conc. waves  rollout GiB  learner GiB (SP)  smallest SP"
        "  generate (FLOP | HBM)    train (all-to-all)  step"
    )
    out += ["", header]
    for i, s in enumerate(p.stages):
        smallest = f"{s.sp_fit}: {sum(s.learner_at_fit.values()) / GIB:.1f}" if s.sp_fit else "none"
        out.append(
            f"{i + 1:>5}  {s.budget:>6}  {s.sequences:>9}  {_count(s.tokens):>11}  "
            f"{s.concurrent:>5} {s.waves:>5}  "
            f"{sum(s.rollout.values()) / GIB:>11.1f}  {sum(s.learner.values()) / GIB:>11.1f} ({s.sp:>2})  "
            f"{smallest:>11}  {_duration(s.generate_s):>9} | {_duration(s.decode_floor_s):<9}  "
            f"{_duration(s.train_s):>8} ({_duration(s.all_to_all_s) if s.sp > 1 else '-'})  "
            f"{_duration(s.step_s)}"
        )
    out += sequence_parallel_notes(p.stages)
    failures = p.all_failures
    out.append("")
    out.append("fits" if not failures else f"does not fit ({len(failures)}):")
    out += [f"  {f}" for f in failures]
    return "\n".join(out)


def sequence_parallel_notes(stages: list[StagePlan]) -> list[str]:
    """Does the configured sequence-parallel size fit each stage; which stages need none; which none fits."""
    sp, which = stages[0].sp, lambda keep: ", ".join(str(i + 1) for i, s in enumerate(stages) if keep(s))
    short = which(lambda s: s.sp_fit is None or s.sp_fit > sp)
    notes = [
        f"sequence parallel: learner.sequence_parallel_size={sp} "
        + (f"does not fit stage(s) {short}" if short else "fits every stage")
        + "; the smallest that fits per stage: "
        + ", ".join(str(s.sp_fit or "none") for s in stages)
        + " (learner GiB with it under 'smallest SP')"
    ]
    if plain := which(lambda s: s.sp_fit == 1):
        notes.append(f"sequence parallel: stage(s) {plain} fit with none (size 1)")
    if never := which(lambda s: s.sp_fit is None):
        notes.append(f"sequence parallel: no size fits stage(s) {never}")
    return notes


# ---------------------------------------------------------------- command line


def split_options(args: list[str]) -> tuple[PlanOptions, list[str]]:
    """Plan options (--gpu X, --gpu=X, plan.KEY=VALUE) apart from the Hydra overrides."""
    fields = {f.name: f for f in dataclasses.fields(PlanOptions)}
    values: dict[str, Any] = {}
    rest: list[str] = []
    it = iter(args)
    for arg in it:
        if arg == "--gpu":
            values["gpu"] = next(it, "")
        elif arg.startswith("--gpu="):
            values["gpu"] = arg.split("=", 1)[1]
        elif arg.startswith("plan."):
            key, _, value = arg[len("plan.") :].partition("=")
            if key not in fields:
                raise ValueError(
                    f"config error at plan.{key}: unknown plan option; plan has {sorted(fields)}"
                )
            values[key] = _parse(value, PlanOptions.__dataclass_fields__[key].type, key)
        else:
            rest.append(arg)
    if "gpu" in values:
        values["gpu"] = str(values["gpu"]).upper()
    return PlanOptions(**values), rest


def _parse(value: str, kind: Any, key: str) -> Any:
    kind = str(kind)
    try:
        if kind.startswith("bool"):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                raise ValueError(value)
            return value.lower() in ("true", "1", "yes", "on")
        return int(value) if kind == "int" else float(value) if kind == "float" else value
    except ValueError:
        raise ValueError(f"config error at plan.{key}: expected {kind}, got {value!r}") from None


def compose_config(overrides: list[str]) -> TrainConfig:
    """The composed, validated TrainConfig: cispo-train's config dir, schema and start-up checks."""
    from hydra import compose, initialize_config_dir

    from cispo.core.config import register_configs
    from cispo.driver.cli import CONFIG_DIR, to_train_config

    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    return to_train_config(cfg)


def main(argv: list[str] | None = None) -> None:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    args = list(sys.argv[1:] if argv is None else argv)
    if "-h" in args or "--help" in args:
        print(__doc__)
        return
    add_launch_dir()  # plugins named as modules next to the launch directory resolve, as in cispo-train
    try:
        options, overrides = split_options(args)
        cfg = compose_config(overrides)
        result = make_plan(cfg, options)
    except (ValueError, TypeError, HydraException, OmegaConfBaseException) as err:
        print(f"cispo-plan: {err}", file=sys.stderr)
        sys.exit(2)
    print(render(result, cfg.experiment.name))
    if result.all_failures:
        for failure in result.all_failures:
            print(f"cispo-plan: does not fit: {failure}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
