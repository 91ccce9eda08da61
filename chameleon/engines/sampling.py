"""How a request's tokens are chosen and scored: its settings (:class:`Sampling`: greedy, or
temperature, top-p and seed; frozen when the request arrives), its draws (:class:`Sampler`: the
generator and the log-probabilities reported so far, the request's own state), and the
log-probabilities the OpenAI routes report (:class:`TokenLogprob`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from retriever.errors import InvalidInput

MAX_TEMPERATURE = 2.0  # OpenAI's bound
MAX_SEED = (1 << 63) - 1
NUCLEUS_FIRST_TRY = 64
MAX_TOP_LOGPROBS = 20  # OpenAI's bound


@dataclass(frozen=True)
class TokenLogprob:
    """A chosen token's log-probability under the model and the ``top`` most likely tokens'
    (token, log-probability), most likely first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Sampling:
    """How a request's tokens are chosen: its settings, fixed when it arrives.

    Greedy (the most likely token) when ``temperature`` is 0, the default, or ``top_p`` is 0.
    Otherwise the token is drawn from the softmax of the logits divided by ``temperature``. The
    draw is kept to the smallest set of most likely tokens whose probabilities reach ``top_p``
    (nucleus sampling; 1 keeps every token); ``seed`` seeds the request's own generator (None: a
    fresh random seed).

    With ``logprobs`` N (0 to :data:`MAX_TOP_LOGPROBS`), every chosen token's log-probability and
    the N most likely tokens' are reported. They are the model's own distribution (log-softmax of
    the logits, before ``temperature`` and ``top_p``), as vLLM reports by default, so they do not
    change with the sampling settings.

    The draws themselves are a :class:`Sampler`'s (``sampler()``), one per request.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    logprobs: int | None = None

    def __post_init__(self):
        if not (
            isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and 0 <= self.temperature <= MAX_TEMPERATURE
        ):
            raise InvalidInput(f"temperature must be a number between 0 and {MAX_TEMPERATURE:g}, got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and math.isfinite(self.top_p) and 0 <= self.top_p <= 1):
            raise InvalidInput(f"top_p must be a number between 0 and 1, got {self.top_p!r}")
        if self.seed is not None and not (isinstance(self.seed, int) and not isinstance(self.seed, bool) and 0 <= self.seed <= MAX_SEED):
            raise InvalidInput(f"seed must be an integer between 0 and 2**63 - 1, got {self.seed!r}")
        if self.logprobs is not None and not (isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_TOP_LOGPROBS):
            raise InvalidInput(f"logprobs must be an integer between 0 and {MAX_TOP_LOGPROBS}, got {self.logprobs!r}")

    @classmethod
    def of(
        cls, temperature: float | None, top_p: float | None = None, seed: int | None = None, logprobs: int | None = None
    ) -> Sampling | None:
        """A request's settings as the API and the CLI take them: no temperature (or 0) is greedy,
        whatever ``top_p`` and ``seed`` say, and None when nothing is to be reported either;
        ``top_p`` left out keeps every token."""
        if not temperature and logprobs is None:
            return None
        return cls(temperature or 0.0, 1.0 if top_p is None else top_p, seed, logprobs)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_p == 0

    def sampler(self) -> Sampler:
        """A request's draws under these settings."""
        return Sampler(self)


class Sampler:
    """One request's draws: the next token from each row of logits, as its :class:`Sampling` says,
    from its own generator. Its tokens therefore do not depend on the requests it is batched with,
    and the same seed repeats an answer. The generator's state carries over from one ``generate``
    call to the next, as a request with iterative retrieval makes several. With ``logprobs``, the
    chosen tokens' log-probabilities are appended to ``reported``, in the order they are chosen.
    """

    def __init__(self, settings: Sampling):
        self.settings = settings
        self.reported: list[TokenLogprob] = []
        self._generator = None
        self._calls = 0

    @property
    def greedy(self) -> bool:
        return self.settings.greedy

    def pick(self, logits, greedy_token: int | None = None) -> int:
        """The next token from one row of ``logits`` (a 1-D torch tensor over the vocabulary);
        ``greedy_token``: their argmax, when the caller has it already."""
        token = self._choose(logits, greedy_token)
        if self.settings.logprobs is not None:
            self.reported += token_logprobs(logits.unsqueeze(0), [token], self.settings.logprobs)
        return token

    def _choose(self, logits, greedy_token: int | None) -> int:
        import torch

        if self.greedy:
            return int(torch.argmax(logits)) if greedy_token is None else greedy_token
        temperature, top_p = self.settings.temperature, self.settings.top_p
        logits = logits.float()
        probabilities = torch.softmax((logits - logits.max()) / temperature, dim=-1)  # no overflow at tiny temperatures
        if top_p == 1:
            return self._draw(probabilities)
        # The nucleus of a trained model's distribution is mostly small: the most likely 64 tokens
        # first, not a sort of the vocabulary (~3 ms against a ~30 ms CPU decode step;
        # benchmarks/sampling_cost.py).
        for candidates in (min(NUCLEUS_FIRST_TRY, probabilities.shape[0]), probabilities.shape[0]):
            top, order = torch.topk(probabilities, candidates)
            if top.sum() >= top_p:
                break
        # a token stays if the more likely ones before it do not reach top_p yet; the first always does
        return int(order[self._draw(top * ((top.cumsum(0) - top) < top_p))])

    def _draw(self, weights) -> int:
        """An index drawn with probability proportional to ``weights``: inverse transform of one
        uniform draw (``torch.multinomial`` takes ~1 ms over a vocabulary on a CPU, this a tenth)."""
        import torch

        cumulative = weights.cumsum(0)
        if self._generator is None:
            self._generator = torch.Generator(device=weights.device)
            if self.settings.seed is None:
                self._generator.seed()
            else:
                self._generator.manual_seed(self.settings.seed)
        point = torch.rand((), generator=self._generator, device=weights.device) * cumulative[-1]
        return min(int(torch.searchsorted(cumulative, point, right=True)), weights.shape[0] - 1)

    def next_seed(self) -> int | None:
        """A seed for one more ``generate`` call of this request, for engines that take a seed per
        call (vLLM): ``seed`` for the first call, then ``seed + 1``, … (None without a seed)."""
        self._calls += 1
        seed = self.settings.seed
        return None if seed is None else (seed + self._calls - 1) % (MAX_SEED + 1)


# Greedy decoding keeps no state (no generator, nothing reported): one sampler serves every greedy request.
GREEDY = Sampling().sampler()


def token_logprobs(logits, tokens: list[int], top: int) -> list[TokenLogprob]:
    """For each row of ``logits`` (rows x vocabulary), the log-probability of the token of
    ``tokens`` at that row and the ``top`` most likely tokens' (log-softmax in float32)."""
    import torch

    logprobs = torch.log_softmax(logits.float(), dim=-1)
    rows = torch.arange(len(tokens), device=logprobs.device)
    chosen = logprobs[rows, torch.tensor(tokens, device=logprobs.device)].tolist()
    if not top:
        return [TokenLogprob(token, logprob) for token, logprob in zip(tokens, chosen)]
    best = torch.topk(logprobs, top, dim=-1)
    return [
        TokenLogprob(token, logprob, tuple(zip(ids, values)))
        for token, logprob, ids, values in zip(tokens, chosen, best.indices.tolist(), best.values.tolist())
    ]


def check_scored(tokens: list[int], top: int, window: int) -> None:
    """A clear error for a prompt to score (``prompt_logprobs``) that no engine can."""
    if not 1 <= len(tokens) <= window:
        raise InvalidInput(f"the text to score has {len(tokens)} tokens; the model reads 1 to {window}")
    if not (isinstance(top, int) and 0 <= top <= MAX_TOP_LOGPROBS):
        raise InvalidInput(f"top must be an integer between 0 and {MAX_TOP_LOGPROBS}, got {top!r}")
