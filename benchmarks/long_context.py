"""Per-rank peak memory and time of one CISPO update on one long sequence: SP = 1 vs Ulysses SP = 2.

Model: the hybrid MiniMax (transformers MiniMaxForCausalLM built by cispo.driver.policy.tiny_minimax),
lightning and softmax attention layers alternating, MoE MLPs, fp32; the shape is printed with the table.
One row of T tokens (prompt 256, response T - 256), one update = forward of the trunk, the FP32 chunked
head (cispo.algo.logprobs), the CISPO loss (get_policy_loss("cispo"), token normalizer), backward, an
all-reduce (sum) of the gradients over the SP group (what ZeRO's reduction does; SP 2 only) and AdamW.

SP = 1 runs in one process the path of the torch learner (sequence_logprobs: the stock transformers
layers, SDPA causal attention). SP = 2 runs two gloo processes (torch.multiprocessing), each the path of a
DeepSpeed rank with learner.sequence_parallel_size 2 (enable_sequence_parallel, shard_part,
sequence_layout, shard_logprobs): each rank holds the full parameters, gradients and AdamW state (no ZeRO
here), and its half of the columns. Every process has 1 thread, so SP = 2 uses 2 cores against 1: the
times are per update and per rank, not a speed-up claim.

Memory, per rank: "held" is the process's RSS just before the forward, when parameters, gradients
(allocated, zero) and AdamW state (allocated by one step on zero gradients) already exist; the RSS
high-water mark (VmHWM) is then reset (/proc/self/clear_refs, 5) and read after the update: "peak". The
activation memory is peak - held: everything the update allocates on top (activations saved for backward,
the all-to-all buffers, the head's chunks, transient temporaries, allocator slack). Beside it, "saved for
backward" counts the distinct storages autograd saves during the forward (a saved_tensors_hooks pack
hook; parameters excluded): the activations proper. Each case runs in fresh processes.

    python benchmarks/long_context.py                       # T = 8K, 16K, 32K; SP = 1, 2
    python benchmarks/long_context.py --tokens 256 --out /tmp/lc.json   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PROMPT = 256
CHUNK = 1024  # learner.logprob_chunk_size's default


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    # Resets VmHWM to the current RSS (Linux >= 4.0), so the peak is that of the update alone.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _arch(args: argparse.Namespace) -> dict[str, Any]:
    kinds = ("linear_attention", "full_attention")
    return {
        "hidden_size": args.hidden,
        "intermediate_size": args.hidden * 2,
        "num_hidden_layers": args.layers,
        "layer_types": [kinds[i % 2] for i in range(args.layers)],
        "num_attention_heads": args.hidden // 64,
        "num_key_value_heads": args.kv_heads,
        "head_dim": 64,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "max_position_embeddings": max(args.tokens_list) + 1,
        "block_size": 256,
    }


def _setup(args: argparse.Namespace, tokens: int) -> tuple[Any, Any, Any]:
    """The model (same seed on every rank), one T-token row and its token weights."""
    import torch

    from cispo.algo.losses import normalization_weights
    from cispo.core.types import Sample
    from cispo.driver.batch import build_train_batch
    from cispo.driver.policy import load_tokenizer, tiny_minimax

    tok = load_tokenizer("builtin:char")
    torch.manual_seed(0)
    model = tiny_minimax(len(tok), tok, **_arch(args))
    gen = torch.Generator().manual_seed(1)
    prompt, response = min(PROMPT, tokens // 2), tokens - min(PROMPT, tokens // 2)
    sample = Sample(
        group_index=0,
        prompt_ids=torch.randint(4, len(tok), (prompt,), generator=gen).tolist(),
        response_ids=torch.randint(4, len(tok), (response,), generator=gen).tolist(),
        behaviour_logprobs=(-0.5 - torch.rand(response, generator=gen) * 3).tolist(),
        finish_reason="eos",
        policy_version=0,
    )
    batch = build_train_batch([sample], torch.ones(1), pad_token_id=tok.pad_token_id)
    return model, batch, normalization_weights(batch.response_mask, "token")


def _loss(model: Any, batch: Any, weights: Any, exchange: Any) -> Any:
    """This rank's CISPO loss: the whole row (SP 1) or its shard (SP 2; the ranks' losses sum to SP 1's)."""
    from cispo.algo.logprobs import sequence_logprobs
    from cispo.algo.losses import get_policy_loss
    from cispo.learner import sequence_parallel as sp

    cispo = get_policy_loss("cispo")
    if exchange is None:
        logprobs, _ = sequence_logprobs(
            model, batch.input_ids, batch.attention_mask, batch.response_mask, chunk_size=CHUNK
        )
        return cispo(
            logprobs, batch.old_logprobs, batch.advantages, batch.response_mask, token_weights=weights
        )[0]
    shard, local_weights = sp.shard_part(batch, weights, exchange.rank, exchange.size)
    b = shard.batch
    inputs = (b.input_ids, b.attention_mask, b.response_mask, shard.targets, shard.position_ids())
    logprobs, _ = sp.shard_logprobs(model, inputs, chunk_size=CHUNK, temperature=1.0, with_entropy=False)
    return cispo(logprobs, b.old_logprobs, b.advantages, b.response_mask, token_weights=local_weights)[0]


def _worker(rank: int, size: int, port: int, args: argparse.Namespace, tokens: int, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    from cispo.learner import sequence_parallel as sp

    torch.set_num_threads(1)
    exchange = None
    if size > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=size)
    try:
        model, batch, weights = _setup(args, tokens)
        if size > 1:
            exchange = sp.UlyssesExchange(sp.sequence_groups(rank, size, size), size, rank)
            sp.enable_sequence_parallel(model, size)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-5)
        for p in params:  # gradients and AdamW state exist before the measured update, as in training
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
        held = _status_mb("VmRSS")
        _reset_peak()
        start = time.perf_counter()
        layout = sp.sequence_layout(exchange) if exchange is not None else _null()
        saved: dict[int, int] = {}
        with layout:
            with torch.autograd.graph.saved_tensors_hooks(_saved_counter(params, saved), lambda t: t):
                loss = _loss(model, batch, weights, exchange)
            loss.backward()
        if size > 1:
            for p in params:
                dist.all_reduce(p.grad)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1e9)
        optimizer.step()
        seconds = time.perf_counter() - start
        total_loss = loss.detach().clone()
        if size > 1:
            dist.all_reduce(total_loss)
        result = {
            "tokens": tokens, "sp": size, "rank": rank, "seconds": seconds, "held_mb": held,
            "peak_mb": _status_mb("VmHWM"), "saved_mb": sum(saved.values()) / 2**20,
            "loss": float(total_loss), "grad_norm": float(grad_norm),
        }  # fmt: skip
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        if size > 1:
            dist.destroy_process_group()


def _saved_counter(params: list[Any], saved: dict[int, int]) -> Any:
    """A pack hook that records the storages autograd saves for backward (parameters excluded; views of
    one storage once): the activations proper, without allocator slack or backward's temporaries."""
    own = {p.untyped_storage().data_ptr() for p in params}

    def pack(t: Any) -> Any:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    return pack


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_case(args: argparse.Namespace, tokens: int, size: int) -> dict[str, Any]:
    """Fresh spawned process(es) for one (T, SP): per-rank results and the case's summary."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(size, _free_port(), args, tokens, out_dir), nprocs=size, join=True)
        ranks = [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(size)]
    for r in ranks:
        r["activation_mb"] = r["peak_mb"] - r["held_mb"]
    worst = max(ranks, key=lambda r: r["activation_mb"])
    seconds = max(r["seconds"] for r in ranks)
    return {
        "tokens": tokens, "sp": size, "processes": size, "threads_per_process": 1,
        "seconds": seconds, "tokens_per_s_per_rank": tokens / size / seconds,
        "held_mb": max(r["held_mb"] for r in ranks), "peak_mb": max(r["peak_mb"] for r in ranks),
        "activation_mb": worst["activation_mb"],
        "saved_mb": max(r["saved_mb"] for r in ranks), "loss": ranks[0]["loss"],
        "grad_norm": ranks[0]["grad_norm"], "ranks": ranks,
    }  # fmt: skip


def shape(args: argparse.Namespace) -> str:
    a = _arch(args)
    kinds = "/".join("L" if k == "linear_attention" else "S" for k in a["layer_types"])
    return (
        f"MiniMax h{a['hidden_size']}, {a['num_hidden_layers']} layers ({kinds}: L lightning, S softmax), "
        f"{a['num_attention_heads']} heads x {a['head_dim']} ({a['num_key_value_heads']} KV heads), "
        f"MoE {a['num_local_experts']} experts top-{a['num_experts_per_tok']} x {a['intermediate_size']}, "
        f"lightning block {a['block_size']}, fp32, no gradient checkpointing"
    )


def table(args: argparse.Namespace, rows: list[dict[str, Any]]) -> str:
    lines = [
        f"{shape(args)}. One row of T tokens (prompt {PROMPT}), one CISPO update (forward, FP32 chunked "
        "head, loss, backward, gradient all-reduce over the SP group, AdamW). 1 thread per process: SP 2 "
        "is 2 processes (2 cores) against 1. Memory per rank (the larger rank): held = RSS before the "
        "forward (parameters, gradients, AdamW state; replicated, no ZeRO); activation = peak RSS during "
        "the update - held; saved for backward = bytes of the distinct storages autograd saves in the "
        "forward (no parameters): the activations proper, without allocator slack or backward temporaries.",
        "",
        "| T | SP | s / update | tokens/s per rank | held (MB) | peak RSS (MB) | activation (MB) "
        "| activation vs SP 1 | saved for backward (MB) | saved vs SP 1 | loss (sum over ranks) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    by = {(r["tokens"], r["sp"]): r for r in rows}
    for r in sorted(rows, key=lambda r: (r["tokens"], r["sp"])):
        base = by.get((r["tokens"], 1))
        ratio = f"{r['activation_mb'] / base['activation_mb']:.2f}x" if base else "-"
        saved = f"{r['saved_mb'] / base['saved_mb']:.2f}x" if base and base.get("saved_mb") else "-"
        lines.append(
            f"| {r['tokens']} | {r['sp']} | {r['seconds']:.1f} | {r['tokens_per_s_per_rank']:.0f} "
            f"| {r['held_mb']:.0f} | {r['peak_mb']:.0f} | {r['activation_mb']:.0f} | {ratio} "
            f"| {r.get('saved_mb', float('nan')):.0f} | {saved} | {r['loss']:.6f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    from benchmarks.report import write_report

    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", default="8192,16384,32768", help="comma-separated T")
    parser.add_argument("--sp", default="1,2", help="comma-separated SP sizes")
    parser.add_argument("--hidden", type=int, default=512, help="heads = hidden / 64")
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "long_context.json"))
    parser.add_argument("--resume", action="store_true", help="keep the cases the JSON already holds")
    args = parser.parse_args()
    args.tokens_list = [int(t) for t in args.tokens.split(",")]
    sizes = [int(s) for s in args.sp.split(",")]
    out = Path(args.out)
    rows = json.loads(out.read_text())["rows"] if args.resume and out.exists() else []
    done = {(r["tokens"], r["sp"]) for r in rows}
    for tokens in args.tokens_list:
        for size in sizes:
            if (tokens, size) in done:
                continue
            rows.append(run_case(args, tokens, size))
            print(f"  measured T={tokens} SP={size}: {rows[-1]['seconds']:.1f} s", file=sys.stderr)
            result = {"model": _arch(args), "shape": shape(args), "rows": rows}
            write_report(out, result, table(args, rows))  # after every case: the long ones take minutes


if __name__ == "__main__":
    main()
