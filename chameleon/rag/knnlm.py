"""kNN-LM: the LM's next-token distribution interpolated with one from nearest neighbours.

The datastore maps the LM's final hidden state at every position of a corpus to the token that
followed, stored as an IVF-PQ index (L2) of the states plus the next tokens. At a generation step
the current hidden state is the query; the k neighbours' distances d_i and next tokens v_i give

    p_knn(w) = sum_i softmax(-d / T)_i [v_i = w]        p(w) = lambda p_knn(w) + (1 - lambda) p_lm(w)

On disk a datastore is a directory: ``knnlm.json`` (model, hidden size, counts), ``values.npy``
(next token per key) and ``index/`` (the retriever index of the keys).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from chameleon.engines.sampling import Sampler
from chameleon.rag.corpus import Document, default_nlist
from coordinator import pipeline
from coordinator.pipeline import SCHEDULES, StepOutput
from retriever.build import build_index
from retriever.errors import InvalidInput
from retriever.files import atomic_directory
from retriever.index import IVFPQParams, load_index, save_index
from retriever.search import Retrieval, Searcher, SearchResult

WINDOW = 256


def model_fingerprint(engine) -> str:
    """The model a datastore's keys come from (its directory name and shape), not where it is cached."""
    config = engine.model.config
    return f"{Path(getattr(config, '_name_or_path', '') or 'model').name}:{config.hidden_size}:{config.vocab_size}"


def hidden_states(engine, tokens: list[int]):
    """(len(tokens), hidden) final hidden states and (len(tokens), vocab) log-probabilities, float32."""
    import torch

    with torch.inference_mode():
        out = engine.model(torch.tensor([tokens], device=engine.device), output_hidden_states=True)
        states = out.hidden_states[-1][0].float()
        log_probs = torch.log_softmax(out.logits[0].float(), dim=-1)
    return states, log_probs


def keys_and_values(engine, documents: list[Document], window: int = WINDOW, progress: bool = False):
    """Hidden state at each position of each document (in windows) and the token that follows it."""
    keys, values = [], []
    for document in tqdm(documents, desc="datastore", unit="doc", disable=not progress):
        ids = engine.tokenizer(document.text, add_special_tokens=False)["input_ids"]
        for start in range(0, max(0, len(ids) - 1), window):
            chunk = ids[start : start + window + 1]
            if len(chunk) < 2:
                continue
            states, _ = hidden_states(engine, chunk[:-1])
            keys.append(states.cpu().numpy())
            values.append(np.asarray(chunk[1:], dtype=np.int64))
    if not keys:
        raise InvalidInput("the corpus holds no text to build a datastore from")
    return np.concatenate(keys), np.concatenate(values)


def training_documents(documents: list[Document], engine, max_tokens: int) -> list[Document]:
    """The documents a benchmark's datastore is built from: all but every tenth (n % 10 == 9, the
    test text) and ninth (n % 10 == 8, validation), cut after ``max_tokens`` tokens in all."""
    train, budget = [], max_tokens
    for n, document in enumerate(documents):
        if n % 10 in (8, 9) or budget <= 0:
            continue
        ids = engine.tokenizer(document.text, add_special_tokens=False)["input_ids"][:budget]
        budget -= len(ids)
        train.append(Document(document.id, document.title, engine.tokenizer.decode(ids), document.source))
    return train


def build_datastore(
    documents: list[Document],
    engine,
    out: str | os.PathLike,
    nlist: int | None = None,
    m: int | None = None,
    nbits: int = 8,
    force: bool = False,
    progress: bool = False,
) -> dict:
    keys, values = keys_and_values(engine, documents, progress=progress)
    if len(keys) < 256:
        raise InvalidInput(f"the corpus gives {len(keys)} positions; IVF-PQ training needs at least 256")
    dim = keys.shape[1]
    params = IVFPQParams("l2", dim, nlist or default_nlist(len(keys)), m or dim // 8, nbits)
    index = build_index(keys, params, progress=progress)
    meta = {"format": "chameleon.knnlm", "version": 1, "model": model_fingerprint(engine), "keys": len(keys), "window": WINDOW}
    with atomic_directory(out, replace=force) as tmp:
        save_index(index, tmp / "index")
        np.save(tmp / "values.npy", values)
        (tmp / "knnlm.json").write_text(json.dumps(meta, indent=1))
    return meta


@dataclass
class KnnLm:
    """A datastore opened for queries, with the interpolation parameters.

    ``searcher`` searches the keys: in this process (``retriever.search.Searcher``) or through
    the retrieval tier (``chameleon.cluster.ClusterSearcher``, ``open(..., cluster=STATE_DIR)``).
    """

    searcher: Retrieval
    values: np.ndarray
    k: int = 16
    temperature: float = 1.0
    lam: float = 0.25
    nprobe: int = 8

    def __post_init__(self):
        if not 0 <= self.lam <= 1 or self.temperature <= 0 or self.k < 1:
            raise InvalidInput("kNN-LM needs 0 <= lambda <= 1, temperature > 0 and k >= 1")

    @classmethod
    def open(cls, path: str | os.PathLike, engine, cluster: str | os.PathLike | None = None, **parameters) -> KnnLm:
        """Open the datastore at ``path``; with ``cluster``, search it through the cluster whose
        state directory that is (it must serve the datastore's index)."""
        path = Path(path)
        meta_path = path / "knnlm.json"
        if not meta_path.is_file():
            raise InvalidInput(f"{path} is not a kNN-LM datastore (knnlm.json is missing)")
        meta = json.loads(meta_path.read_text())
        if meta["model"] != model_fingerprint(engine):
            raise InvalidInput(f"{path} was built with the model {meta['model']}, not {model_fingerprint(engine)}")
        cls(None, None, **parameters)  # check the parameters before loading anything
        if cluster is None:
            return cls(Searcher(load_index(path / "index"), device="cpu"), np.load(path / "values.npy"), **parameters)
        from chameleon.cluster import ClusterSearcher

        searcher = ClusterSearcher.open(cluster)
        if not searcher.serves(path / "index"):
            searcher.close()
            raise InvalidInput(f"the cluster in {cluster} does not serve the datastore {path}")
        return cls(searcher, np.load(path / "values.npy"), **parameters)

    def submit(self, states):
        """Start the search for hidden ``states`` (n, hidden); the function returned waits for it."""
        states = states.cpu().float().numpy() if hasattr(states, "cpu") else states
        return self.searcher.submit(np.asarray(states, dtype=np.float32), min(self.k, len(self.values)), self.nprobe)

    def interpolate(self, lm_log_probs, neighbours):
        """Interpolated log-probabilities from the LM's (n, vocab) and the neighbours found (a ``SearchResult``)."""
        import torch

        weights, tokens = self._neighbour_weights(neighbours, lm_log_probs.device)
        p_knn = torch.zeros_like(lm_log_probs)
        p_knn.scatter_add_(1, tokens, weights)
        mixed = self.lam * p_knn + (1 - self.lam) * lm_log_probs.exp()
        return torch.log(mixed.clamp(min=1e-30))

    def _neighbour_weights(self, neighbours, device):
        """(n, k) softmax(-distance / T) weights (0 for empty slots) and the neighbours' next tokens."""
        import torch

        distances, ids = neighbours.distances, neighbours.ids
        weights = torch.softmax(torch.from_numpy(-distances / self.temperature), dim=-1)
        weights = torch.where(torch.from_numpy(ids >= 0), weights, torch.zeros_like(weights))
        return weights.to(device), torch.from_numpy(self.values[np.maximum(ids, 0)]).to(device)

    def log_probs(self, states, lm_log_probs):
        """Interpolated log-probabilities for each row of ``states`` (n, hidden) given the LM's (n, vocab)."""
        return self.interpolate(lm_log_probs, self.submit(states)())

    def next_tokens(self, logits, neighbours, sampling: Sequence[Sampler | None] | None = None) -> list[int]:
        """Tokens from the LM's (n, vocab) ``logits``, interpolated with the neighbours unless they
        are None: greedy, or drawn by row ``r``'s ``sampling[r]`` from the interpolated distribution.

        The interpolated distribution's argmax is the LM's argmax or one of the neighbours' next
        tokens (elsewhere it is the LM's own times 1 - lambda), so for greedy rows only those k + 1
        candidates are scored: two passes over the vocabulary instead of a full interpolation.
        """
        tokens = self._greedy_tokens(logits, neighbours)
        for row, chooser in enumerate(sampling or ()):
            if chooser is not None and not chooser.greedy:
                if neighbours is None:
                    tokens[row] = chooser.pick(logits[row])
                else:
                    mine = SearchResult(neighbours.distances[row : row + 1], neighbours.ids[row : row + 1])
                    lm_log_probs = logits[row : row + 1].float().log_softmax(dim=-1)
                    tokens[row] = chooser.pick(self.interpolate(lm_log_probs, mine)[0])
        return tokens

    def _greedy_tokens(self, logits, neighbours) -> list[int]:
        import torch

        best = logits.argmax(dim=-1)
        if neighbours is None:
            return best.tolist()
        weights, neighbour_tokens = self._neighbour_weights(neighbours, logits.device)
        candidates = torch.cat([neighbour_tokens, best[:, None]], dim=1)  # (n, k + 1)
        p_knn = ((neighbour_tokens[:, :, None] == candidates[:, None, :]) * weights[:, :, None]).sum(dim=1)
        p_lm = (logits.gather(1, candidates) - torch.logsumexp(logits, dim=-1, keepdim=True)).exp()
        mixed = self.lam * p_knn + (1 - self.lam) * p_lm
        top = mixed.max(dim=1, keepdim=True).values
        # ties go to the smallest token id, as argmax over the whole vocabulary does
        return torch.where(mixed == top, candidates, torch.iinfo(candidates.dtype).max).min(dim=1).values.tolist()


def perplexity(engine, text: str, knnlm: KnnLm | None = None, window: int = WINDOW) -> float:
    """Perplexity of ``text`` under the LM, or under its kNN-LM interpolation."""
    ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < 2:
        raise InvalidInput("perplexity needs at least two tokens of text")
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start : start + window + 1]
        if len(chunk) < 2:
            continue
        states, log_probs = hidden_states(engine, chunk[:-1])
        if knnlm is not None:
            log_probs = knnlm.log_probs(states, log_probs)
        targets = np.asarray(chunk[1:])
        total -= float(log_probs[np.arange(len(targets)), targets].sum())
        count += len(targets)
    return math.exp(total / count)


class HiddenStateBatch:
    """A micro-batch of sequences on the torch engine whose every step also gives the final hidden
    state of each row: the kNN-LM's queries (``coordinator.pipeline.MicroBatch``)."""

    def __init__(self, engine, prompts: list[list[int]]):
        from chameleon.engines.decode_batch import DecodeBatch

        self.engine, self.prompts = engine, prompts
        self.batch = DecodeBatch(engine)
        self.kv_lengths: list[int] = []

    def prefill(self) -> StepOutput:
        import torch

        with torch.inference_mode():
            out = self.batch.prefill(self.prompts, hidden_states=True)
        self.kv_lengths = [len(prompt) for prompt in self.prompts]
        return _step_output(out.logits[:, -1], out.hidden_states[-1][:, -1])

    def step(self, tokens: list[int]) -> StepOutput:
        import torch

        with torch.inference_mode():
            out = self.batch.step(tokens, self.kv_lengths, hidden_states=True)
        self.kv_lengths = [length + 1 for length in self.kv_lengths]
        return _step_output(out.logits[:, -1], out.hidden_states[-1][:, -1])

    def keep(self, rows: list[int]) -> None:
        self.batch.keep(rows)
        self.kv_lengths = [self.kv_lengths[row] for row in rows]


def _step_output(logits, states) -> StepOutput:
    return StepOutput(logits.float(), states.float().cpu().numpy())


def generate_batch(
    engine,
    knnlm: KnnLm,
    prompts: list[list[int]],
    max_new_tokens: int = 64,
    every: int | None = 1,
    schedule: str = "pipelined",
    on_token=None,
    sampling: Sequence[Sampler | None] | None = None,
) -> list[list[int]]:
    """kNN-LM decoding of several prompts, querying the datastore every ``every`` steps (the first
    included; the LM alone decides the others; never with None), in the ``schedule`` of
    :mod:`coordinator.pipeline`: ``sequential`` or ``pipelined`` (two micro-batches in turn).

    ``on_token(sequence, token)`` sees each token as it is chosen; returning True stops that
    sequence. ``sampling``: each prompt's (None: greedy, as for all without it). Returns each
    prompt's new tokens.
    """
    if schedule not in SCHEDULES:
        raise InvalidInput(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    longest = max((len(prompt) for prompt in prompts), default=0)
    if longest + max_new_tokens > engine.context_window:
        raise InvalidInput(f"{longest} + {max_new_tokens} tokens exceed the context window of {engine.context_window}")
    return pipeline.generate(
        prompts,
        lambda group: HiddenStateBatch(engine, group),
        knnlm,
        max_new_tokens,
        engine.eos_ids,
        every,
        SCHEDULES[schedule],
        on_token,
        sampling,
    )


def generate(
    engine, knnlm: KnnLm, tokens: list[int], max_new_tokens: int = 64, on_token=None, every: int = 1, sampling: Sampler | None = None
) -> list[int]:
    """``generate_batch`` for one prompt; ``on_token(token)`` returning True stops."""
    report = None if on_token is None else (lambda _sequence, token: on_token(token))
    return generate_batch(engine, knnlm, [tokens], max_new_tokens, every, "sequential", report, [sampling])[0]
