"""What every LLM engine shares: the KV of a prefix, a generation's result, prompt building, the
checks made before generating, and the one thread that owns a model.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from retriever.errors import InvalidInput

if TYPE_CHECKING:
    from chameleon.engines.sampling import Sampler, TokenLogprob


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
    finish_reason: str  # "stop" (an end token, or ``on_token`` asked to stop), "length" or "cancelled" (no tokens)
    # the KV of the prompt and every generated token but the last (not yet fed back); None from
    # engines that keep the KV themselves (vLLM)
    state: KVPrefix | None
    queue_s: float = 0.0  # waiting for a place in a batch (``chameleon.engines.batching``)


@runtime_checkable
class LLMEngine(Protocol):
    """What the server, the RAG pipeline, kNN-LM and the document cache ask of an engine:
    ``TorchEngine``, ``BatchingEngine`` (over a ``TorchEngine``) and ``VllmEngine`` answer it.

    ``generate`` decodes ``tokens`` up to ``max_new_tokens`` or an end token, continuing from the KV
    of ``prefix`` when given (engines that keep the KV themselves take none), calling ``on_token``
    with each new token (a true return stops), stopping early when ``cancelled()`` says so, and
    choosing tokens with the request's ``sampling`` (its sampler; None: greedy). ``prompt_logprobs`` scores every token of
    ``tokens`` after the ones before it (None for the first), with the ``top`` most likely tokens'.
    """

    name: str
    tokenizer: object
    context_window: int

    def generate(
        self,
        tokens: list[int],
        max_new_tokens: int = 128,
        prefix: KVPrefix | None = None,
        on_token: Callable[[int], bool] | None = None,
        cancelled: Callable[[], bool] | None = None,
        sampling: Sampler | None = None,
    ) -> Generation: ...

    def prompt_logprobs(self, tokens: list[int], top: int = 0) -> list[TokenLogprob | None]: ...

    def chat_tokens(self, messages: list[dict]) -> list[int]: ...

    def count_tokens(self, text: str) -> int: ...


class EngineText:
    """Prompt building shared by the engines, from their Hugging Face ``tokenizer``."""

    tokenizer: object

    def chat_tokens(self, messages: list[dict]) -> list[int]:
        """The prompt of a conversation (``{"role", "content"}`` dicts) ready for the assistant's turn."""
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])


class ThreadedEngine(EngineText):
    """An engine whose one thread owns the model: callers on any thread ``submit`` a request (a
    future of its ``Generation``) or ``generate`` (submit and wait); ``close`` stops the thread."""

    def _start(self, loop: Callable[[], None], name: str) -> None:
        self._wake = threading.Condition()  # guards the queue and _closed; wakes the thread
        self._closed = False
        self._thread = threading.Thread(target=loop, name=name, daemon=True)
        self._thread.start()

    def generate(
        self, tokens: list[int], max_new_tokens: int = 128, prefix: KVPrefix | None = None, on_token=None, cancelled=None, sampling=None
    ) -> Generation:
        """Decoding of ``tokens`` up to ``max_new_tokens`` or an end token (see ``TorchEngine.generate``)."""
        return self.submit(tokens, max_new_tokens, prefix, on_token, cancelled, sampling).result()

    def close(self) -> None:
        """Stop the thread; what is still queued or running fails."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join()


def cancelled_generation(tokens: list[int], prefix: KVPrefix | None, state: KVPrefix | None, seconds: float) -> Generation:
    """A generation cancelled during its prefill: no tokens, ``finish_reason`` "cancelled", and as
    ``state`` the KV of the prompt tokens done by then (a later prompt that shares them reuses it)."""
    return Generation(
        tokens=[],
        text="",
        prompt_tokens=len(tokens),
        cached_tokens=len(prefix.tokens) if prefix is not None else 0,
        ttft_s=seconds,
        decode_tokens_per_s=0.0,
        finish_reason="cancelled",
        state=state,
    )


def worth_continuing(head: int, prompt: int) -> bool:
    """Whether prefilling a ``prompt``-token prompt from a cached KV of its first ``head`` tokens
    beats computing it all. Continuing from a head runs attention with an explicit mask, which costs
    more than the causal kernel of a prompt from scratch: on CPU (bf16 SmolLM2) a 782-token prompt
    took 599 ms from scratch, 634-670 ms after a 30-60-token head and 491 ms after 200
    (``benchmarks/RESULTS.md``). A head pays from about a quarter of the prompt."""
    return head >= prompt // 4


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


def check_request(tokens: list[int], max_new_tokens: int, window: int, prefix: KVPrefix | None = None) -> None:
    """The checks every engine makes before generating (clear errors, not a failure deep in the model)."""
    check_prefix(tokens, prefix)
    if not tokens:
        raise InvalidInput("the prompt is empty")
    if max_new_tokens < 1:
        raise InvalidInput(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if len(tokens) + max_new_tokens > window:
        raise InvalidInput(f"{len(tokens)} prompt tokens + {max_new_tokens} new tokens exceed the context window of {window}")


def check_prefix(tokens: list[int], prefix: KVPrefix | None) -> None:
    if prefix is not None and tokens[: len(prefix.tokens)] != prefix.tokens:
        raise InvalidInput("the prompt does not start with the cached prefix")


def check_dtype(dtype: str) -> None:
    if dtype not in ("bfloat16", "float32"):
        raise InvalidInput(f"dtype must be bfloat16 or float32, got {dtype!r}")


def context_window(config) -> int:
    return int(getattr(config, "max_position_embeddings", 2048))


def end_token_ids(generation_config, tokenizer) -> set[int]:
    """The tokens that end an answer: the model's generation config's and the tokenizer's."""
    ids = generation_config.eos_token_id if generation_config is not None else None
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
