"""The prefill cost of an engine, measured: T(cached tokens, new tokens) as a
:class:`~coordinator.prefill_profile.PrefillProfile`, the cost model the KV cache policy weighs.

``measure`` times the engine's prefill of ``new`` tokens after ``cached`` tokens whose KV is
reused, over a grid.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from coordinator.prefill_profile import PrefillProfile
from retriever.errors import InvalidInput


def measure(engine, cached: list[int], new: list[int], repeats: int = 3, progress: bool = False) -> PrefillProfile:
    """Time ``engine.prefill`` over the grid: the best of ``repeats`` per cell (after one warm-up)."""
    from tqdm.auto import tqdm

    PrefillProfile(list(cached), list(new), [[0.0] * len(new) for _ in cached])  # check the grid first
    if cached[0] != 0 or new[0] < 1:
        raise InvalidInput("the cached grid must start at 0 and new-token counts at 1 or more")
    if cached[-1] + new[-1] > engine.context_window:
        raise InvalidInput(f"the grid goes past the context window of {engine.context_window} tokens")
    rng = np.random.default_rng(0)
    vocab = min(len(engine.tokenizer), 30_000)
    table = np.zeros((len(cached), len(new)))
    engine.prefill(rng.integers(100, vocab, 32).tolist())  # warm-up
    cells = [(i, j) for i in range(len(cached)) for j in range(len(new))]
    for i, j in tqdm(cells, desc="prefill profile", disable=not progress):
        tokens = rng.integers(100, vocab, cached[i] + new[j]).tolist()
        prefix = engine.prefill(tokens[: cached[i]])[0] if cached[i] else None
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            engine.prefill(tokens, prefix)
            best = min(best, time.perf_counter() - started)
        table[i, j] = best
    name = Path(getattr(engine.model.config, "_name_or_path", "") or "model").name
    return PrefillProfile(list(cached), list(new), table.tolist(), engine.device, name)


def measure_quick(engine) -> PrefillProfile:
    """A 3 x 3 profile up to 512 cached + 512 new tokens (within the context window), the best of
    three timings per cell (one is at the mercy of whatever else runs then): some seconds, enough
    to rank cache entries when no measured profile is given."""
    top = min(512, engine.context_window // 2)
    return measure(engine, [0, top // 2, top], [16, top // 4, top], repeats=3)
