"""Builds the character-level Hugging Face tokenizer shipped in cispo/assets/char_tokenizer.

Run once (python -m cispo.assets.build_tokenizer); the saved files are part of the package so that a
fresh machine never downloads a tokenizer. One token per printable ASCII character plus newline keeps
the embedded default's vocabulary tiny (100 entries) while staying a real PreTrainedTokenizerFast.
"""

from __future__ import annotations

import string
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
OUT_DIR = Path(__file__).parent / "char_tokenizer"


def build(out_dir: Path = OUT_DIR) -> PreTrainedTokenizerFast:
    chars = [c for c in string.printable if c not in "\t\r\x0b\x0c"]
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )
    tokenizer.save_pretrained(out_dir)
    return tokenizer


if __name__ == "__main__":
    tok = build()
    print(f"saved {len(tok)} tokens to {OUT_DIR}")
