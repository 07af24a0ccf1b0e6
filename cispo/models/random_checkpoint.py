"""A random MiniMax-Text-01 / M1 checkpoint in the published remote-code layout, at a chosen size: what the
dress rehearsal (`configs/experiment/minimax_m1_rehearsal.yaml`) reads in place of the real weights.

The shape follows the published config (a softmax layer after every 7 lightning layers, RoPE on half of
each head: `rotary_dim` = head_dim / 2, DeepNorm alphas (2 x layers)^(1/4), bf16 shards with an index),
every size scaled down. The
tokenizer is the project's character tokenizer with a chat template, so chat-formatted prompts work.
Built as transformers' native MiniMaxForCausalLM from random init, then written in the remote-code layout
by the converter (cispo/models/convert.py, whose round trips are bit-exact: tests/models).

    python -m cispo.models.random_checkpoint /tmp/cispo-rehearsal/minimax_m1_tiny
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from cispo.models.convert import convert

CHAR_TOKENIZER = Path(__file__).resolve().parents[1] / "assets" / "char_tokenizer"
DEFAULT_PATH = "/tmp/cispo-rehearsal/minimax_m1_tiny"  # configs/experiment/minimax_m1_rehearsal.yaml
# A plain role-tagged template: the character tokenizer has none, and the data config asks for one.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


@dataclass(frozen=True)
class Sizes:
    """MiniMax-Text-01's published sizes in the comments; the defaults are the rehearsal's."""

    groups: int = 1  # blocks of 7 lightning + 1 softmax layers (published: 10, i.e. 80 layers)
    hidden_size: int = 64  # 6144
    num_attention_heads: int = 4  # 64
    num_key_value_heads: int = 2  # 8
    head_dim: int = 16  # 128 (rotary_dim: half of it, 64)
    num_local_experts: int = 4  # 32
    num_experts_per_tok: int = 2  # 2
    intermediate_size: int = 96  # 9216
    block_size: int = 16  # 256
    max_position_embeddings: int = 2048  # 10240000


def write_random_checkpoint(path: Path | str, sizes: Sizes = Sizes(), seed: int = 0) -> Path:
    """Writes the checkpoint at `path` (which must not exist) and returns it."""
    from transformers import AutoTokenizer, MiniMaxConfig, MiniMaxForCausalLM

    from cispo.models.minimax_rope import honour_partial_rotary

    tokenizer = AutoTokenizer.from_pretrained(CHAR_TOKENIZER)
    tokenizer.chat_template = CHAT_TEMPLATE
    settings = asdict(sizes)
    groups = settings.pop("groups")
    alpha = (2 * 8 * groups) ** 0.25
    config = MiniMaxConfig(
        **settings,
        num_hidden_layers=8 * groups,
        layer_types=(["linear_attention"] * 7 + ["full_attention"]) * groups,
        vocab_size=len(tokenizer),
        rope_parameters={"rope_type": "default", "rope_theta": 10_000_000.0, "partial_rotary_factor": 0.5},
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        # DeepNorm's residual scale (2 N)^(1/4): the published 3.5566 is N = 80's; betas stay 1
        **dict.fromkeys(("full_attn_alpha_factor", "linear_attn_alpha_factor", "mlp_alpha_factor"), alpha),
    )
    torch.manual_seed(seed)
    model = honour_partial_rotary(MiniMaxForCausalLM(config))
    # nn.Embedding(padding_idx=pad) leaves the pad row at zero, which no trained checkpoint has, and a
    # random model samples <pad>. That position's hidden state is then zero in every lightning layer
    # (no biases), where each RMSNorm's backward scales the gradient by 1/sqrt(eps) = 316: inf by layer 0,
    # so DeepSpeed skipped each update with such a row (tests/models/test_random_checkpoint.py).
    with torch.no_grad():
        model.get_input_embeddings().weight[config.pad_token_id].normal_(0.0, config.initializer_range)
    model = model.to(torch.bfloat16)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        native = Path(scratch) / "native"
        model.save_pretrained(native, max_shard_size="500KB")  # several shards and an index, as published
        tokenizer.save_pretrained(native)
        convert(native, path, "remote")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cispo.models.random_checkpoint",
        description="Write a random MiniMax-Text-01 checkpoint in the published remote-code layout.",
    )
    parser.add_argument("path", nargs="?", default=DEFAULT_PATH)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="replace an existing directory")
    args = parser.parse_args(argv)
    if args.force:
        shutil.rmtree(args.path, ignore_errors=True)
    print(write_random_checkpoint(args.path, seed=args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
