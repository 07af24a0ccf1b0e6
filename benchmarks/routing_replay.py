"""Train/infer log-prob agreement on the tiny MiniMax MoE, with and without routing replay.

Engine: a bf16 copy of the policy (head included) samples responses with a KV cache and records, per fed
token, the experts every MoE layer chose (cispo.core.moe.RoutingRecorder) and the behaviour log-probs.
Learner: the fp32 policy recomputes the log-probs of the same tokens (TorchLearner.compute_logprobs),
once with its own routing and once replaying the engine's. Reported: Pearson correlation of token
probabilities, max and mean |log-prob difference|, and the share of (token, layer) routing decisions
that differ.

    python benchmarks/routing_replay.py [--prompts 32] [--new-tokens 32] [--out PATH]
"""

from __future__ import annotations

import argparse
import copy

import torch
from report import write_report

from cispo.core.config import AlgorithmConfig, LearnerConfig, ModelConfig
from cispo.core.moe import NO_CHOICE, RoutingRecorder
from cispo.core.types import TrainBatch
from cispo.driver.policy import build_policy, load_tokenizer
from cispo.learner.torch_learner import TorchLearner


def rollout(engine: torch.nn.Module, tok, prompts: int, new_tokens: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    texts = [f"{a}+{b}=" for a, b in torch.randint(10, 100, (prompts, 2), generator=gen).tolist()]
    ids = torch.tensor([tok(t)["input_ids"] for t in texts])  # equal lengths: no padding in cached decode
    torch.manual_seed(seed)
    with RoutingRecorder(engine) as recorder, torch.no_grad():
        out = engine.generate(
            ids,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=True,
            top_k=0,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=tok.pad_token_id,
        )
    sequences = out.sequences
    logits = torch.stack(out.logits, dim=1).float()  # [B, new, V], the bf16 engine's logits
    response = sequences[:, ids.shape[1] :]
    behaviour = torch.log_softmax(logits, -1).gather(-1, response[..., None]).squeeze(-1)
    routed = recorder.routed_experts(batch_size=prompts)
    full = torch.full((*sequences.shape, *routed.shape[2:]), NO_CHOICE, dtype=torch.long)
    full[:, : routed.shape[1]] = routed
    return sequences, ids.shape[1], behaviour, full


def build_batch(sequences, prompt_len, behaviour, routed) -> TrainBatch:
    rows, length = sequences.shape
    response = torch.zeros(rows, length)
    response[:, prompt_len:] = 1
    old = torch.zeros(rows, length)
    old[:, prompt_len:] = behaviour
    return TrainBatch(
        sequences,
        torch.ones_like(sequences),
        response,
        old,
        torch.zeros(rows),
        torch.arange(rows),
        routed_experts=routed,
    )


def learner_routing(model, batch: TrainBatch, replay: bool) -> torch.Tensor:
    from cispo.core.moe import replay_routing

    with replay_routing(model, batch.routed_experts if replay else None), RoutingRecorder(model) as rec:
        with torch.no_grad():
            model(input_ids=batch.input_ids)
    return rec.routed_experts(batch_size=len(batch))


def compare(batch: TrainBatch, learner_lp: torch.Tensor, routing: torch.Tensor) -> dict[str, float]:
    mask = batch.response_mask.bool()
    engine, learner = batch.old_logprobs[mask], learner_lp[mask]
    diff = (engine - learner).abs()
    corr = torch.corrcoef(torch.stack([engine.exp(), learner.exp()]))[0, 1]
    fed = batch.routed_experts[:, : routing.shape[1]]
    valid = fed[..., 0] >= 0
    differs = (fed.sort(-1).values != routing.sort(-1).values).any(-1)
    return {
        "prob_correlation": float(corr),
        "max_abs_logprob_diff": float(diff.max()),
        "mean_abs_logprob_diff": float(diff.mean()),
        "routing_mismatch": float(differs[valid].float().mean()),
    }


def run(args: argparse.Namespace) -> dict:
    tok = load_tokenizer("builtin:char")
    policy = build_policy(ModelConfig(), tok, seed=0)
    engine = copy.deepcopy(policy).to(torch.bfloat16)
    batch = build_batch(*rollout(engine, tok, args.prompts, args.new_tokens, args.seed))
    results = {}
    for replay in (False, True):
        cfg = LearnerConfig(routing_replay=replay, num_threads=torch.get_num_threads())
        lp = TorchLearner(policy, cfg, AlgorithmConfig()).compute_logprobs(batch)
        results["with_replay" if replay else "without_replay"] = compare(
            batch, lp, learner_routing(policy, batch, replay)
        )
    return {
        "prompts": args.prompts,
        "new_tokens": args.new_tokens,
        "engine": "bf16 (head included)",
        "learner": "fp32",
        "results": results,
    }


def table(result: dict) -> str:
    lines = [
        f"Tiny MiniMax MoE, {result['prompts']} prompts x {result['new_tokens']} sampled tokens; engine "
        f"{result['engine']} with KV cache, learner {result['learner']} full forward",
        "",
        "| learner routing | prob. correlation | max abs log-prob diff | mean abs diff | routing mismatch |",
        "|---|---|---|---|---|",
    ]
    for name, r in result["results"].items():
        lines.append(
            f"| {name.replace('_', ' ')} | {r['prob_correlation']:.6f} | {r['max_abs_logprob_diff']:.4f} | "
            f"{r['mean_abs_logprob_diff']:.5f} | {r['routing_mismatch']:.2%} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/routing_replay.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = run(args)
    text = table(result)
    write_report(args.out, result, text)


if __name__ == "__main__":
    main()
