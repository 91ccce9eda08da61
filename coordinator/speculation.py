"""Dynamic speculative pipelining: prefill on the retrieval tier's early top-k while it finishes.

RAGCache (Jin et al., 2024) overlaps the vector search with the LLM: the search reports candidate
documents before it ends (our SEARCH with ``early``: the top-k of every query's nearest lists),
prefill starts on them, and when the final documents differ the speculative prefill is cut short
(the engines take a ``cancelled`` check: the torch engine stops at its next chunk of the prompt,
vLLM aborts the request) and prefill runs again. A restart is not all loss: the final prompt
reuses the KV of what it shares with what the speculative one computed (the template and the
leading documents that stayed).

"Dynamic": speculation runs only while the engine has room for it: at most ``limit`` speculative
prefills at once, and none while requests wait for the engine, where a wasted prefill would delay
real work. This module is the policy and its counts; engine-agnostic, it says when to speculate
and whether a speculative prefill stands (the caller runs both prefills, ``chameleon.rag``).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence

from retriever.errors import InvalidInput


class SpeculativePrefill:
    """``early_fraction`` of the probed lists are scanned before the early answer; ``busy()``
    (optional) says the engine has waiting requests."""

    def __init__(self, limit: int = 1, early_fraction: float = 0.5, busy: Callable[[], bool] | None = None):
        if limit < 1 or not 0 < early_fraction < 1:
            raise InvalidInput(f"need limit >= 1 and 0 < early_fraction < 1, got {limit} and {early_fraction}")
        self.limit, self.early_fraction, self.busy = limit, early_fraction, busy
        self.stats = {"started": 0, "declined": 0, "confirmed": 0, "restarted": 0}
        self._running = 0
        self._lock = threading.Lock()

    def early_lists(self, nprobe: int) -> int | None:
        """How many of ``nprobe`` lists come before the early answer (None: one list, no stages)."""
        return min(max(1, math.ceil(nprobe * self.early_fraction)), nprobe - 1) if nprobe > 1 else None

    def begin(self) -> bool:
        """Take a place for a speculative prefill; False (declined) when none is free or the engine is busy."""
        with self._lock:
            if self._running >= self.limit or (self.busy is not None and self.busy()):
                self.stats["declined"] += 1
                return False
            self._running += 1
            self.stats["started"] += 1
            return True

    def end(self, speculated: Sequence[int], final: Sequence[int]) -> bool:
        """Give the place back: True (confirmed) when the final prompt is the speculated one,
        False when prefill must run again on the final prompt."""
        confirmed = list(speculated) == list(final)
        with self._lock:
            self._running -= 1
            self.stats["confirmed" if confirmed else "restarted"] += 1
        return confirmed
