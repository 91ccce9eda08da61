"""Continuous batching: concurrent ``generate`` calls decoded together, one token per step each.

``BatchingEngine`` wraps a ``TorchEngine`` behind the same interface and is thread-safe. One
scheduler thread owns the model: it admits waiting sequences (prefilled one at a time, reusing a
cached prefix's KV as the engine does), then runs one decode step for every running sequence in
a single forward pass. Sequences of different lengths share one KV cache, left-padded, with an
attention mask over the padding and each row's own positions; a finished sequence leaves the
batch at once (its KV is handed back as ``Generation.state``) and a waiting one takes its place.

A sequence admitted while another with the same prompt head (a quarter of the prompt at least) is
being decoded starts from that sequence's KV of the head and prefills only the rest
(``share_running_prompts``): a request's several sampled choices, or the same question asked
twice at once, cost one prefill. The KV of the same tokens at the same positions is the same,
whichever sequence computed it.

Outputs: a sequence alone in the batch runs exactly the engine's own decode (identical tokens).
A sampled sequence draws from its own generator, so batching changes its draws no more than its
logits.
In a batch the masked padding adds nothing, so in float32 the tokens are the sequential ones
(tested); in bf16 the batched matrix products round differently and a near-tie between two
tokens can go the other way (as in vLLM and every batched server).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from chameleon.engines.base import (
    Generation,
    KVPrefix,
    ThreadedEngine,
    answer_text,
    cancelled_generation,
    check_request,
    decode_speed,
    worth_continuing,
)
from chameleon.engines.decode_batch import DecodeBatch
from chameleon.engines.sampling import GREEDY, Sampler, check_scored
from chameleon.engines.torch_engine import TorchEngine
from coordinator.kv_cache import CacheAwareQueue
from retriever.errors import InvalidInput, Unavailable


@dataclass
class _Sequence:
    tokens: list[int]
    max_new_tokens: int
    prefix: KVPrefix | None
    on_token: Callable[[int], bool] | None
    eos_ids: frozenset[int]
    future: Future
    submitted: float
    cancelled: Callable[[], bool] | None = None
    sampling: Sampler = GREEDY
    generated: list[int] = field(default_factory=list)
    started: float = 0.0
    first_token_at: float = 0.0
    stopped: bool = False
    error: Exception | None = None

    @property
    def reuse_ratio(self) -> float:
        """Cached / computed prompt tokens: cache-aware admission serves the highest first."""
        cached = len(self.prefix.tokens) if self.prefix is not None else 0
        return cached / max(len(self.tokens) - cached, 1)

    @property
    def kv_length(self) -> int:
        """Tokens whose KV is cached: the prompt and every generated token but the last."""
        return len(self.tokens) + len(self.generated) - 1

    def take(self, token: int) -> bool:
        """Record ``token``; True when the sequence is finished (a failing ``on_token`` finishes it
        with that error, and only it)."""
        self.generated.append(token)
        try:
            self.stopped = self.on_token is not None and bool(self.on_token(token))
        except Exception as e:  # noqa: BLE001 - handed to this sequence's caller
            self.error = e
        return self.stopped or self.error is not None or token in self.eos_ids or len(self.generated) >= self.max_new_tokens


class BatchingEngine(ThreadedEngine):
    """A thread-safe engine that decodes up to ``max_batch`` sequences together.

    Sequences waiting for a place are admitted in arrival order, or with ``reorder_window`` W by
    cached / computed prompt length (RAGCache's cache-aware reordering: short work on a long cached
    prefix first), a sequence passed over W times going next.
    """

    name = "torch-batched"

    def __init__(self, engine: TorchEngine, max_batch: int = 8, reorder_window: int | None = None, share_running_prompts: bool = True):
        if not 1 <= max_batch <= 256:
            raise InvalidInput(f"max_batch must be between 1 and 256, got {max_batch}")
        self.engine = engine
        self.max_batch = max_batch
        self.tokenizer, self.eos_ids, self.context_window = engine.tokenizer, engine.eos_ids, engine.context_window
        self.model, self.device, self.decoder = engine.model, engine.device, engine.decoder
        self.largest_batch = 0
        self.share_running_prompts = share_running_prompts  # off only to measure what it saves
        if reorder_window is None:
            self._waiting = CacheAwareQueue(lambda sequence: 0.0)
        else:
            self._waiting = CacheAwareQueue(lambda sequence: sequence.reuse_ratio, reorder_window)
        self._running: list[_Sequence] = []
        self._batch = DecodeBatch(engine)  # the running sequences' KV, row for row
        self._scoring: list[tuple[Future, list[int], int]] = []  # prompt_logprobs calls for the thread
        self._start(self._loop, "chameleon-engine")

    @property
    def waiting(self) -> int:
        """Sequences submitted and not yet admitted to the batch."""
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def alive(self) -> bool:
        """True while the scheduler thread runs (readiness)."""
        return self._thread.is_alive()

    def submit(
        self, tokens: list[int], max_new_tokens: int = 128, prefix: KVPrefix | None = None, on_token=None, cancelled=None, sampling=None
    ) -> Future:
        """Queue a generation (as ``TorchEngine.generate``, ``cancelled`` included: a sequence
        cancelled while it waits ends as soon as it is admitted); the future gives its ``Generation``."""
        check_request(tokens, max_new_tokens, self.context_window, prefix)
        sequence = _Sequence(
            list(tokens),
            max_new_tokens,
            prefix,
            on_token,
            frozenset(self.eos_ids),
            Future(),
            time.perf_counter(),
            cancelled,
            sampling or GREEDY,
        )
        with self._wake:
            if self._closed:
                raise Unavailable("the engine is closed")
            self._waiting.push(sequence)
            self._wake.notify()
        return sequence.future

    def prompt_logprobs(self, tokens: list[int], top: int = 0) -> list:
        """``TorchEngine.prompt_logprobs``, run on the engine's thread between two decode steps."""
        check_scored(tokens, top, self.context_window)
        future: Future = Future()
        with self._wake:
            if self._closed:
                raise Unavailable("the engine is closed")
            self._scoring.append((future, list(tokens), top))
            self._wake.notify()
        return future.result()

    # -- the scheduler thread -----------------------------------------------------------------

    def _loop(self) -> None:
        import torch

        with torch.inference_mode():
            while True:
                with self._wake:
                    while not self._closed and not self._waiting and not self._running and not self._scoring:
                        self._wake.wait()
                    if self._closed:
                        break
                    scoring, self._scoring = self._scoring, []
                for future, tokens, top in scoring:
                    try:
                        future.set_result(self.engine.prompt_logprobs(tokens, top))
                    except Exception as e:  # noqa: BLE001 - that caller's error only
                        future.set_exception(e)
                try:
                    self._admit()
                    if self._running:
                        self._step()
                except Exception as e:  # noqa: BLE001 - a failed step fails its sequences, never the engine
                    for sequence in self._running:
                        if not sequence.future.done():
                            sequence.future.set_exception(e)
                    self._running = []
                    self._batch.keep([])
        for future in [*(s.future for s in [*self._running, *self._waiting.drain()]), *(job[0] for job in self._scoring)]:
            future.set_exception(Unavailable("the engine was closed"))

    def _admit(self) -> None:
        while self._waiting and len(self._running) < self.max_batch:
            with self._wake:
                sequence = self._waiting.pop()
            sequence.started = time.perf_counter()
            if self.share_running_prompts:
                self._take_running_prefix(sequence)
            try:
                state, logits = self.engine.prefill(sequence.tokens, sequence.prefix, sequence.cancelled)
                if logits is None:
                    sequence.future.set_result(
                        cancelled_generation(sequence.tokens, sequence.prefix, state, time.perf_counter() - sequence.started)
                    )
                    continue
                sequence.first_token_at = time.perf_counter()
                if sequence.take(sequence.sampling.pick(logits)):
                    self._finish(sequence, state.cache)
                    continue
            except Exception as e:  # noqa: BLE001 - a prompt the model refuses fails that request only
                sequence.future.set_exception(e)
                continue
            self._batch.join(state.cache)
            self._running.append(sequence)
        self.largest_batch = max(self.largest_batch, len(self._running))

    def _take_running_prefix(self, sequence: _Sequence) -> None:
        """Give ``sequence`` the KV of the longest head its prompt shares with a running sequence's
        prompt, when that is longer than the prefix it came with and long enough to pay
        (:func:`chameleon.engines.base.worth_continuing`)."""
        best = len(sequence.prefix.tokens) if sequence.prefix is not None else 0
        best_row = None
        for row, running in enumerate(self._running):
            shared = len(os.path.commonprefix([sequence.tokens, running.tokens]))
            if shared > best:
                best, best_row = shared, row
        if best_row is not None and worth_continuing(best, len(sequence.tokens)):
            cache = self._batch.row_head(best_row, self._running[best_row].kv_length, best)
            sequence.prefix = KVPrefix(sequence.tokens[:best], cache)

    def _step(self) -> None:
        """One decode step for every running sequence; finished ones leave the batch."""
        out = self._batch.step([s.generated[-1] for s in self._running], [s.kv_length for s in self._running])
        logits = out.logits[:, -1]
        keep = []
        for row, (sequence, greedy_token) in enumerate(zip(self._running, logits.argmax(dim=-1).tolist())):
            if sequence.take(sequence.sampling.pick(logits[row], greedy_token)):
                self._finish(sequence, self._batch.own_cache(row, sequence.kv_length))
            else:
                keep.append(row)
        if len(keep) < len(self._running):
            self._running = [self._running[row] for row in keep]
            self._batch.keep(keep)

    def _finish(self, sequence: _Sequence, cache) -> None:
        if sequence.error is not None:
            sequence.future.set_exception(sequence.error)
            return
        now = time.perf_counter()
        decoding = now - sequence.first_token_at
        generated = sequence.generated
        ended = sequence.stopped or generated[-1] in self.eos_ids
        sequence.future.set_result(
            Generation(
                tokens=list(generated),
                text=answer_text(self.tokenizer, self.eos_ids, generated),
                prompt_tokens=len(sequence.tokens),
                cached_tokens=len(sequence.prefix.tokens) if sequence.prefix is not None else 0,
                ttft_s=sequence.first_token_at - sequence.started,
                decode_tokens_per_s=decode_speed(len(generated), decoding),
                finish_reason="stop" if ended else "length",
                state=KVPrefix(sequence.tokens + generated[:-1], cache),
                queue_s=sequence.started - sequence.submitted,
            )
        )
