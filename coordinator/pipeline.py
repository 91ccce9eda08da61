"""Iterative retrieval pipelined with decoding: Chameleon's "tik-tok" micro-batches.

When every step (or every N steps) of decoding retrieves with a query the step itself produces
(kNN-LM's hidden state, RETRO's chunk), a sequence's next token waits for its retrieval and its
next forward pass waits for that token: alone, the model idles while the retrieval tier works and
the tier idles while the model runs. Splitting the batch into micro-batches that take turns hides
one behind the other:

    forward A, send A's search | forward B, send B's search | wait A, choose A's tokens,
    forward A, send A's search | wait B, choose B's tokens, forward B, send B's search | ...

Each search leaves as soon as its query is known and is waited for only when its tokens are
needed, after the other micro-batch's forward pass. With one micro-batch the same loop is the
sequential schedule (forward, search, wait, choose). Rows never influence each other, so the
tokens are the same under both schedules (up to the rounding of different batch sizes).

The loop is engine-agnostic: a micro-batch (``MicroBatch``) runs the model, a ``Retrieval``
searches and turns scores and neighbours into tokens: greedy ones, or drawn by each sequence's own
sampler (so that its tokens, too, are the same under both schedules).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from retriever.errors import InvalidInput

SCHEDULES = {"sequential": 1, "pipelined": 2}  # micro-batches


@dataclass
class StepOutput:
    scores: Any  # (rows, vocab) the model's next-token scores (logits)
    queries: Any  # (rows, dim) the retrieval queries this step produced


class MicroBatch(Protocol):
    def prefill(self) -> StepOutput: ...

    def step(self, tokens: list[int]) -> StepOutput: ...

    def keep(self, rows: list[int]) -> None: ...


class Retrieval(Protocol):
    def submit(self, queries) -> Callable[[], Any]:
        """Start a search; the function returned waits for its neighbours."""

    def next_tokens(self, scores, neighbours, sampling: Sequence[Any] | None = None) -> list[int]:
        """Tokens from the scores, mixed with the neighbours unless they are None: greedy, or
        drawn by ``sampling[row]`` where that is given."""


@dataclass
class _Lane:
    batch: MicroBatch
    sequences: list[int]  # prompt index of each row
    scores: Any = None
    pending: Callable[[], Any] | None = None
    steps: int = 0


def generate(
    prompts: Sequence[list[int]],
    open_batch: Callable[[list[list[int]]], MicroBatch],
    retrieval: Retrieval,
    max_new_tokens: int,
    eos_ids,
    interval: int | None = 1,
    micro_batches: int = 2,
    on_token: Callable[[int, int], bool] | None = None,
    sampling: Sequence[Any] | None = None,
) -> list[list[int]]:
    """Decoding of ``prompts`` retrieving at steps 0, interval, 2 interval... (never when
    ``interval`` is None), in ``micro_batches`` micro-batches that take turns.

    ``on_token(sequence, token)`` sees each token as it is chosen; returning True ends that
    sequence. ``sampling``: each prompt's sampler for ``Retrieval.next_tokens`` (None: greedy).
    Returns the generated tokens of each prompt, an end token included.
    """
    if not prompts or any(not prompt for prompt in prompts):
        raise InvalidInput("every prompt needs at least one token")
    if interval is not None and interval < 1:
        raise InvalidInput(f"the retrieval interval must be at least 1, got {interval}")
    if max_new_tokens < 1 or micro_batches < 1:
        raise InvalidInput("max_new_tokens and micro_batches must be at least 1")
    if sampling is not None and len(sampling) != len(prompts):
        raise InvalidInput(f"{len(prompts)} prompts but {len(sampling)} samplers")
    groups = _split(len(prompts), min(micro_batches, len(prompts)))
    lanes = []
    for group in groups:
        lane = _Lane(open_batch([prompts[i] for i in group]), group)
        _advance(lane, lane.batch.prefill(), retrieval, interval)
        lanes.append(lane)
    generated: list[list[int]] = [[] for _ in prompts]
    while lanes:
        for lane in list(lanes):
            neighbours = lane.pending() if lane.pending is not None else None
            keep = []
            samplers = None if sampling is None else [sampling[s] for s in lane.sequences]
            for row, token in enumerate(retrieval.next_tokens(lane.scores, neighbours, samplers)):
                sequence = lane.sequences[row]
                generated[sequence].append(token)
                stop = on_token is not None and bool(on_token(sequence, token))
                if not stop and token not in eos_ids and len(generated[sequence]) < max_new_tokens:
                    keep.append(row)
            if not keep:
                lanes.remove(lane)
                continue
            if len(keep) < len(lane.sequences):
                lane.batch.keep(keep)
                lane.sequences = [lane.sequences[row] for row in keep]
            lane.steps += 1
            _advance(lane, lane.batch.step([generated[s][-1] for s in lane.sequences]), retrieval, interval)
    return generated


def _advance(lane: _Lane, out: StepOutput, retrieval: Retrieval, interval: int | None) -> None:
    """Take a forward pass's output and send its search at once if this step retrieves."""
    lane.scores = out.scores
    due = interval is not None and lane.steps % interval == 0
    lane.pending = retrieval.submit(out.queries) if due else None


def _split(count: int, parts: int) -> list[list[int]]:
    """``range(count)`` in ``parts`` contiguous groups whose sizes differ by at most one."""
    size, extra = divmod(count, parts)
    bounds = [part * size + min(part, extra) for part in range(parts + 1)]
    return [list(range(bounds[part], bounds[part + 1])) for part in range(parts)]
