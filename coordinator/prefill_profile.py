"""Prefill time T(cached tokens, new tokens), the cost model of the KV cache policy.

A profile is measured on an engine (:mod:`chameleon.engines.prefill_timing`, which knows the
model); here it is only numbers. ``PrefillProfile.seconds`` interpolates bilinearly inside the
grid and linearly beyond it (prefill time grows about linearly in new tokens at a fixed cached
length). Saved as JSON (``chameleon profile prefill``) so a cache policy can load it without the model.
"""

from __future__ import annotations

import json
import os
from bisect import bisect_right
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from retriever.errors import InvalidInput
from retriever.files import write_json_atomic

FORMAT = "chameleon-prefill-profile"


@dataclass
class PrefillProfile:
    cached: list[int]  # grid of cached lengths, ascending, starting at 0
    new: list[int]  # grid of new-token counts, ascending, at least two
    table: list[list[float]]  # seconds[i][j] for cached[i], new[j]
    device: str = ""
    model: str = ""

    def __post_init__(self):
        shape = (len(self.cached), len(self.new))
        if np.shape(self.table) != shape or len(self.new) < 2 or not self.cached:
            raise InvalidInput(f"a prefill profile needs a {shape} table and at least two new-token columns")
        if sorted(set(self.cached)) != list(self.cached) or sorted(set(self.new)) != list(self.new):
            raise InvalidInput("the profile's grids must be strictly increasing")
        if not np.all(np.isfinite(self.table)) or np.min(self.table) < 0:
            raise InvalidInput("the profile's times must be finite and non-negative")

    def seconds(self, cached: int, new: int) -> float:
        """Estimated prefill time of ``new`` tokens after ``cached`` reused ones."""
        if new <= 0:
            return 0.0
        row, row_weight = _bracket(self.cached, cached)
        row_weight = min(max(row_weight, 0.0), 1.0)  # beyond the measured cached lengths: the nearest row
        column, column_weight = _bracket(self.new, new)
        table = np.asarray(self.table)

        def at(i: int) -> float:  # interpolated along new tokens, extrapolated linearly past the grid
            return float(table[i, column] + column_weight * (table[i, column + 1] - table[i, column]))

        value = at(row) if row_weight == 0 else (1 - row_weight) * at(row) + row_weight * at(row + 1)
        return max(value, 0.0)

    def save(self, path: str | os.PathLike) -> None:
        write_json_atomic(path, {"format": FORMAT, "version": 1, **asdict(self)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> PrefillProfile:
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise InvalidInput(f"no prefill profile at {path} (`chameleon profile prefill --out {path}`)") from None
        except json.JSONDecodeError as e:
            raise InvalidInput(f"{path} is not a prefill profile: {e}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise InvalidInput(f"{path} is not a prefill profile")
        try:
            return cls(data["cached"], data["new"], data["table"], data.get("device", ""), data.get("model", ""))
        except (KeyError, TypeError) as e:
            raise InvalidInput(f"{path} is not a prefill profile: {e}") from None


def _bracket(grid: list[int], value: float) -> tuple[int, float]:
    """(i, w) with ``value`` = grid[i] + w (grid[i+1] - grid[i]); past the grid's ends w leaves [0, 1]."""
    if len(grid) == 1:
        return 0, 0.0
    i = min(max(bisect_right(grid, value) - 1, 0), len(grid) - 2)
    return i, (value - grid[i]) / (grid[i + 1] - grid[i])
