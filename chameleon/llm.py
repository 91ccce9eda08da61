"""LLM engines behind one small interface (``generate``); the torch engine owns its KV caches.

``TorchEngine`` runs a transformers causal LM on CPU or CUDA with its own greedy loop: one
prefill over the prompt (optionally continuing from a cached prefix's KV), then one decode step
per token on the KV cache it holds. It reports time to first token and decode speed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from chameleon.models import resolve_model
from retriever.errors import RetrieverError


@dataclass
class KVPrefix:
    """The KV cache of a token prefix, reusable by later prompts that start with the same tokens."""

    tokens: list[int]
    cache: object

    def truncated(self, length: int) -> KVPrefix:
        """The KV of the first ``length`` tokens (this prefix stays usable)."""
        cache = shared_cache(self.cache)
        if length < len(self.tokens):
            cache.crop(length - len(self.tokens))  # a negative count drops that many tokens from the end
        return KVPrefix(self.tokens[:length], cache)

    def shared_with(self, tokens: list[int]) -> KVPrefix | None:
        """The longest part of this prefix that ``tokens`` start with, or None."""
        common = 0
        for ours, theirs in zip(self.tokens, tokens):
            if ours != theirs:
                break
            common += 1
        return self.truncated(common) if common else None


@dataclass
class Generation:
    tokens: list[int]
    text: str
    prompt_tokens: int
    cached_tokens: int
    ttft_s: float
    decode_tokens_per_s: float
    finish_reason: str  # "stop" (an end token, or ``on_token`` asked to stop) or "length"
    state: KVPrefix  # the KV of the prompt and every generated token but the last (not yet fed back)
    queue_s: float = 0.0  # waiting for a place in a batch (``chameleon.batching``)


class TorchEngine:
    name = "torch"

    def __init__(self, model: str | Path | None = None, device: str = "auto", dtype: str = "bfloat16"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = resolve_model(model)
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        if self.device == "cuda" and not torch.cuda.is_available():
            raise RetrieverError("device 'cuda' was asked for, but torch has no CUDA here")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if dtype not in ("bfloat16", "float32"):
            raise RetrieverError(f"dtype must be bfloat16 or float32, got {dtype!r}")
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval().to(self.device)
        self.context_window = int(getattr(self.model.config, "max_position_embeddings", 2048))
        self.eos_ids = _eos_ids(self.model, self.tokenizer)

    def chat_tokens(self, messages: list[dict]) -> list[int]:
        """The prompt of a conversation (``{"role", "content"}`` dicts) ready for the assistant's turn."""
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prefill(self, tokens: list[int], prefix: KVPrefix | None = None) -> tuple[KVPrefix, object]:
        """KV of ``tokens`` (continuing ``prefix``, whose tokens they must start with) and the last logits."""
        import torch
        from transformers import DynamicCache

        if prefix is not None and tokens[: len(prefix.tokens)] != prefix.tokens:
            raise RetrieverError("the prompt does not start with the cached prefix")
        cache = shared_cache(prefix.cache) if prefix is not None else DynamicCache()
        start = len(prefix.tokens) if prefix is not None else 0
        if start == len(tokens):  # everything cached: recompute the last token to get its logits
            cache.crop(-1)  # drop the last token
            start -= 1
        with torch.inference_mode():
            out = self.model(torch.tensor([tokens[start:]], device=self.device), past_key_values=cache, use_cache=True)
        return KVPrefix(list(tokens), out.past_key_values), out.logits[0, -1]

    def generate(
        self,
        tokens: list[int],
        max_new_tokens: int = 128,
        prefix: KVPrefix | None = None,
        on_token: Callable[[int], bool] | None = None,
    ) -> Generation:
        """Greedy decoding of ``tokens`` (a full prompt), up to ``max_new_tokens`` or an end token.

        ``on_token`` sees every new token as soon as it is chosen (streaming); returning True stops.
        """
        import torch

        if not tokens:
            raise RetrieverError("the prompt is empty")
        if len(tokens) + max_new_tokens > self.context_window:
            raise RetrieverError(
                f"{len(tokens)} prompt tokens + {max_new_tokens} new tokens exceed the context window of {self.context_window}"
            )
        started = time.perf_counter()
        state, logits = self.prefill(tokens, prefix)
        generated = [int(torch.argmax(logits))]
        ttft = time.perf_counter() - started
        cache = state.cache
        decode_started = time.perf_counter()
        stopped = on_token is not None and bool(on_token(generated[-1]))
        with torch.inference_mode():
            while len(generated) < max_new_tokens and generated[-1] not in self.eos_ids and not stopped:
                out = self.model(torch.tensor([[generated[-1]]], device=self.device), past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                generated.append(int(torch.argmax(out.logits[0, -1])))
                stopped = on_token is not None and bool(on_token(generated[-1]))
        decode_s = time.perf_counter() - decode_started
        state = KVPrefix(list(tokens) + generated[:-1], cache)
        return Generation(
            tokens=generated,
            text=answer_text(self.tokenizer, self.eos_ids, generated),
            prompt_tokens=len(tokens),
            cached_tokens=len(prefix.tokens) if prefix is not None else 0,
            ttft_s=ttft,
            decode_tokens_per_s=decode_speed(len(generated), decode_s),
            finish_reason="stop" if stopped or generated[-1] in self.eos_ids else "length",
            state=state,
        )


def shared_cache(cache):
    """A new cache over the same KV tensors. transformers' dynamic layers replace their tensors
    (cat, slice) and never write into them, so growing or cropping the new cache leaves the old
    one intact: a copy that costs nothing."""
    from transformers import DynamicCache

    return DynamicCache([(layer.keys, layer.values) for layer in cache.layers])


def answer_text(tokenizer, eos_ids: set[int], generated: list[int]) -> str:
    """The text of generated tokens, without the end token they may finish with."""
    ended = bool(generated) and generated[-1] in eos_ids
    return tokenizer.decode(generated[:-1] if ended else generated, skip_special_tokens=True).strip()


def decode_speed(tokens: int, seconds: float) -> float:
    """Tokens per second after the first one (which the prefill produced)."""
    return (tokens - 1) / seconds if tokens > 1 and seconds > 0 else 0.0


def _eos_ids(model, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
