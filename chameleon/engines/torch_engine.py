"""The torch engine: a transformers causal LM on CPU or CUDA with its own decoding loop.

One prefill over the prompt (optionally continuing from a cached prefix's KV), then one decode step
per token on the KV cache it holds (:class:`~chameleon.engines.decode_batch.DecodeBatch` of one
row). Llama-family models decode through :class:`~chameleon.engines.llama_decode.LlamaDecoder`
(``fast_decode``), others through transformers. It reports time to first token and decode speed.
Decoding is greedy unless a request's :class:`~chameleon.engines.sampling.Sampler` says otherwise.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from chameleon.engines.base import (
    EngineText,
    Generation,
    KVPrefix,
    answer_text,
    cancelled_generation,
    check_dtype,
    check_prefix,
    check_request,
    context_window,
    decode_speed,
    end_token_ids,
    shared_cache,
)
from chameleon.engines.decode_batch import DecodeBatch
from chameleon.engines.llama_decode import LlamaDecoder, unsupported
from chameleon.engines.sampling import GREEDY, Sampler, TokenLogprob, check_scored, token_logprobs
from chameleon.models import resolve_model
from retriever.errors import Unsupported

# A cancellable prefill (a speculative one) runs in chunks this long: a cancel lands within one
# chunk's time, and chunks this long cost about what one pass costs (benchmarks/prefill_chunks.py).
PREFILL_CHUNK = 512


class TorchEngine(EngineText):
    name = "torch"

    def __init__(
        self,
        model: str | Path | None = None,
        device: str = "auto",
        dtype: str = "bfloat16",
        fast_decode: bool = True,
        decode_weights: str = "auto",
    ):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = resolve_model(model)
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        if self.device == "cuda" and not torch.cuda.is_available():
            raise Unsupported("device 'cuda' was asked for, but torch has no CUDA here")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        check_dtype(dtype)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval().to(self.device)
        self.context_window = context_window(self.model.config)
        self.eos_ids = end_token_ids(self.model.generation_config, self.tokenizer)
        # off only to measure transformers' decode against it; a model it cannot run gets the reason
        self.decode_path = unsupported(self.model) if fast_decode else "fast_decode is off"
        if decode_weights not in ("auto", "model") and (self.decode_path is not None or self.device != "cpu"):
            reason = self.decode_path or f"its quantized kernels run on CPU, and this engine runs on {self.device}"
            raise Unsupported(f"decode weights {decode_weights!r} need the engine's own decode step on CPU: {reason}")
        if decode_weights == "auto" and self.device != "cpu":
            decode_weights = "model"
        self.decoder = LlamaDecoder(self.model, decode_weights) if self.decode_path is None else None

    def prefill(
        self, tokens: list[int], prefix: KVPrefix | None = None, cancelled: Callable[[], bool] | None = None
    ) -> tuple[KVPrefix, object]:
        """KV of ``tokens`` (continuing ``prefix``, whose tokens they must start with) and the last
        logits. With ``cancelled``, the prompt runs in chunks of :data:`PREFILL_CHUNK` tokens and
        stops before the first chunk that finds it True: then the KV covers the tokens done so far
        and the logits are None. One token after a cached prefix runs as a decode step."""
        import torch
        from transformers import DynamicCache

        check_prefix(tokens, prefix)
        cache = shared_cache(prefix.cache) if prefix is not None else DynamicCache()
        start = len(prefix.tokens) if prefix is not None else 0
        if start == len(tokens):  # everything cached: recompute the last token to get its logits
            cache.crop(-1)  # drop the last token
            start -= 1
        if start == len(tokens) - 1 and start > 0 and self.decoder is not None:
            # one token after a cached prefix: a decode step, as when the same tokens are decoded
            # (continuing a generation gives the tokens decoding it in one go would have)
            batch = DecodeBatch(self)
            batch.join(cache)
            with torch.inference_mode():
                out = batch.step([tokens[start]], [start])
            return KVPrefix(list(tokens), batch.own_cache(0, len(tokens))), out.logits[0, -1]
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
        sampling: Sampler | None = None,
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
        decode_started = time.perf_counter()
        stopped = on_token is not None and bool(on_token(generated[-1]))
        cache = state.cache
        if len(generated) < max_new_tokens and generated[-1] not in self.eos_ids and not stopped:
            batch = DecodeBatch(self)
            batch.join(cache)
            with torch.inference_mode():
                while len(generated) < max_new_tokens and generated[-1] not in self.eos_ids and not stopped:
                    out = batch.step([generated[-1]], [len(tokens) + len(generated) - 1])
                    generated.append(pick(out.logits[0, -1]))
                    stopped = on_token is not None and bool(on_token(generated[-1]))
            cache = batch.own_cache(0, len(tokens) + len(generated) - 1)
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
