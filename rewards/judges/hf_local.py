"""The ``hf`` judge backend: a local Hugging Face model directory, decoded greedily by the project's own
engine (``rollout.hf_engine.HFEngine``) in this process.

The prompt goes through the tokenizer's chat template when it has one (an instruct judge expects it) and is
fed as plain text otherwise. Greedy is top-k 1, so the reply is a function of the request and is cached.
The model loads on the first batch, not at construction: a reward worker process that only holds the
reward never pays for it.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from typing import Any

from rewards.judges import JudgeError
from rewards.judges.cache import JudgeCache, request_key

Messages = list[dict[str, str]]


class HFChat:
    """Chat completions from a local model directory through the hf engine (loaded on first use); also
    what ``cispo-serve`` serves."""

    def __init__(
        self,
        model_path: str,
        *,
        tokenizer_path: str | None = None,
        dtype: str = "float32",
        device: str = "cpu",
        max_batch_size: int = 8,
        num_threads: int | None = None,
        chat_template: bool = True,
    ) -> None:
        if not os.path.isdir(model_path):
            raise ValueError(f"hf judge: model_path {model_path!r} is not a directory")
        self.model_path = os.path.abspath(model_path)
        self.tokenizer_path = os.path.abspath(tokenizer_path or model_path)
        self.chat_template = chat_template
        self.engine_kwargs = {
            "dtype": dtype,
            "device": device,
            "max_batch_size": max_batch_size,
            "num_threads": num_threads,
        }
        self._engine: Any = None
        self.tokenizer: Any = None
        self._lock = threading.Lock()  # one batch at a time through the engine

    def load(self) -> None:
        from transformers import AutoTokenizer

        from rollout.engine import build_engine

        with self._lock:
            if self._engine is None:
                self.tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path)
                self._engine = build_engine("hf", model_path=self.model_path, **self.engine_kwargs)

    def encode(self, messages: Messages) -> list[int]:
        """The chat template's prompt when the tokenizer has one; else the contents joined as plain text."""
        tok = self.tokenizer
        if self.chat_template and getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        return list(tok("\n\n".join(m["content"] for m in messages), add_special_tokens=True)["input_ids"])

    def complete(
        self, conversations: list[Messages], max_new_tokens: int, temperature: float = 0.0
    ) -> list[tuple[str, str, int, int]]:
        """(reply, finish reason, prompt tokens, reply tokens) per conversation; temperature 0 is greedy."""
        from cispo.core.types import SamplingParams

        self.load()
        tok = self.tokenizer
        eos = tok.eos_token_id
        params = SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=temperature if temperature > 0 else 1.0,
            top_k=0 if temperature > 0 else 1,  # top-k 1: the argmax token at every step
            eos_token_ids=() if eos is None else (int(eos),),
            pad_token_id=int(tok.pad_token_id if tok.pad_token_id is not None else eos or 0),
        )
        prompts = [self.encode(m) for m in conversations]
        with self._lock:
            generations = self._engine.generate(prompts, params)
        return [
            (
                tok.decode(g.response_ids, skip_special_tokens=True),
                g.finish_reason,
                len(p),
                len(g.response_ids),
            )
            for p, g in zip(prompts, generations)
        ]


class HFJudge:
    """The ``hf`` backend: :class:`HFChat` decoding greedily, with the reply cache."""

    def __init__(
        self,
        model_path: str,
        *,
        tokenizer_path: str | None = None,
        max_new_tokens: int = 256,
        dtype: str = "float32",
        device: str = "cpu",
        max_batch_size: int = 8,
        num_threads: int | None = None,
        chat_template: bool = True,
        system_prompt: str | None = None,
        cache_dir: str | None = None,
    ) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"hf judge: max_new_tokens must be >= 1, got {max_new_tokens}")
        self.chat = HFChat(
            model_path,
            tokenizer_path=tokenizer_path,
            dtype=dtype,
            device=device,
            max_batch_size=max_batch_size,
            num_threads=num_threads,
            chat_template=chat_template,
        )
        self.max_new_tokens, self.system_prompt = max_new_tokens, system_prompt
        self.cache = JudgeCache(cache_dir)
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def stats(self) -> dict[str, int]:
        return {k: self._counts[k] for k in ("requests", "cache_hits", "retries", "timeouts", "errors")}

    def messages(self, prompt: str) -> Messages:
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return [*system, {"role": "user", "content": prompt}]

    def generate(self, prompts: list[str]) -> list[str | Exception]:
        c = self.chat
        keys = [
            request_key(
                {
                    "backend": "hf",
                    "model": c.model_path,
                    "tokenizer": c.tokenizer_path,
                    "chat_template": c.chat_template,
                    "max_new_tokens": self.max_new_tokens,
                    "messages": self.messages(p),
                }
            )
            for p in prompts
        ]
        with self._lock:
            found: dict[str, str | Exception] = {}
            for key in keys:
                if key not in found and (reply := self.cache.get(key)) is not None:
                    found[key] = reply
            todo = {k: p for k, p in zip(keys, prompts) if k not in found}  # identical prompts decode once
            self._counts["cache_hits"] += len(keys) - len(todo)
            if todo:
                for key, reply in zip(todo, self._decode(list(todo.values()))):
                    found[key] = reply
                    if isinstance(reply, str):
                        self.cache.put(key, reply)
        return [found[k] for k in keys]

    def _decode(self, prompts: list[str]) -> list[str | Exception]:
        self._counts["requests"] += len(prompts)
        try:
            done = self.chat.complete([self.messages(p) for p in prompts], self.max_new_tokens)
        except Exception as e:  # noqa: BLE001 - the batch's failure becomes each sample's error
            self._counts["errors"] += len(prompts)
            return [JudgeError(f"hf judge: generation failed: {e!r}") for _ in prompts]
        return [text for text, *_ in done]
