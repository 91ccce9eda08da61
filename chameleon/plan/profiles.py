"""What each tier's work costs, measured on a host (:mod:`chameleon.plan.measure`): the numbers the
planner sizes tiers with. Saved as JSON, one file per tier, so that the retrieval host and the
inference host can each be measured where they run.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields

from retriever.errors import InvalidInput, NotFound
from retriever.files import write_json_atomic

FORMAT = "chameleon-tier-profile"


@dataclass
class RetrievalProfile:
    """CPU seconds per single-query search of each process of the retrieval tier.

    A node's share of a search costs ``node_s + node_per_code_s * codes`` for the PQ codes it scans;
    a query scans about ``nprobe * ntotal / nlist * list_skew`` codes in all (IVF lists are uneven
    and queries probe the big ones more often), split evenly over the shards. The coordinator costs
    ``coordinator_s + coordinator_per_shard_s * shards`` a search; the caller (the server, which
    also does the coarse search) ``front_s``.

    ``busy_ceiling``: the share of its CPU-bound capacity the busiest process (or the host's cores,
    when they bind) reached in the calibration runs. Processes that hand each search on to each
    other never keep a core quite busy (here, 0.82-0.87 in every run); the planner's retrieval
    capacities are this share of the CPU-bound ones.
    """

    front_s: float
    coordinator_s: float
    coordinator_per_shard_s: float
    node_s: float
    node_per_code_s: float
    code_size: int  # bytes per PQ code of the index measured: scan cost per code grows with it
    list_skew: float
    busy_ceiling: float = 1.0
    host: str = ""
    index: str = ""
    runs: list[dict] = field(default_factory=list)  # the calibration runs the costs were fitted on

    def __post_init__(self):
        _check_costs(self, ["front_s", "coordinator_s", "coordinator_per_shard_s", "node_s", "node_per_code_s"])
        if self.code_size < 1 or not self.list_skew > 0 or not 0 < self.busy_ceiling <= 1:
            raise InvalidInput("a retrieval profile needs code_size >= 1, list_skew > 0 and busy_ceiling in (0, 1]")


@dataclass
class InferenceProfile:
    """Wall seconds of one inference replica's work (the server process: embedder and LLM).

    Prefill of P tokens takes ``prefill_s + prefill_per_token_s * P + prefill_per_token_squared_s *
    P**2`` (attention grows with the square); a decode step of a batch of B sequences (after about
    ``context`` tokens) ``step_s + step_per_row_s * B``; embedding a question ``embed_s``.
    """

    embed_s: float
    prefill_s: float
    prefill_per_token_s: float
    step_s: float
    step_per_row_s: float
    threads: int  # cores the replica's engine uses
    prefill_per_token_squared_s: float = 0.0
    context: int = 0
    device: str = ""
    model: str = ""
    host: str = ""

    def __post_init__(self):
        _check_costs(self, ["embed_s", "prefill_s", "prefill_per_token_s", "prefill_per_token_squared_s", "step_s", "step_per_row_s"])
        if self.threads < 1:
            raise InvalidInput("an inference profile needs threads >= 1")

    def prefill_seconds(self, tokens: int) -> float:
        return self.prefill_s + self.prefill_per_token_s * tokens + self.prefill_per_token_squared_s * tokens**2

    def step_seconds(self, batch: int) -> float:
        return self.step_s + self.step_per_row_s * batch


def _check_costs(profile, names: list[str]) -> None:
    for name in names:
        value = getattr(profile, name)
        if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise InvalidInput(f"{type(profile).__name__}.{name} must be a finite number >= 0, got {value!r}")


def save_profile(profile: RetrievalProfile | InferenceProfile, path: str | os.PathLike) -> None:
    write_json_atomic(path, {"format": FORMAT, "version": 1, "tier": _tier(type(profile)), **asdict(profile)})


def load_profile(path: str | os.PathLike) -> RetrievalProfile | InferenceProfile:
    """A profile that ``save_profile`` wrote, of either tier; anything else is refused."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise NotFound(f"no profile at {path}") from None
    except (OSError, ValueError) as e:
        raise InvalidInput(f"{path} is not a readable profile: {e}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != 1:
        raise InvalidInput(f"{path} is not a {FORMAT} file (`chameleon profile retrieval` or `chameleon profile inference` writes one)")
    kinds = {_tier(kind): kind for kind in (RetrievalProfile, InferenceProfile)}
    kind = kinds.get(data.get("tier"))
    if kind is None:
        raise InvalidInput(f"{path}: unknown tier {data.get('tier')!r} (expected one of {sorted(kinds)})")
    names = {f.name for f in fields(kind)}
    try:
        return kind(**{key: value for key, value in data.items() if key in names})
    except TypeError as e:
        raise InvalidInput(f"{path}: {e}") from None


def _tier(kind: type) -> str:
    return {RetrievalProfile: "retrieval", InferenceProfile: "inference"}[kind]
