"""Incremental detokenization for the server: the text each generated token adds, cut at the
first stop string (the part of the text that could still become one is held back), and the tokens
with their log-probabilities as OpenAI's ``logprobs`` report them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from chameleon.engines.sampling import TokenLogprob


@dataclass(frozen=True)
class ReportedToken:
    """A token of an answer with its log-probabilities, as OpenAI's ``logprobs`` show it: its text,
    where that starts in the answer, and the most likely tokens' (text, log-probability)."""

    text: str
    offset: int
    logprob: float | None  # None for the first token of a prompt: nothing comes before it
    top: tuple[tuple[str, float], ...]


class TextStream:
    """Incremental detokenization: the new text each token adds, cut at the first stop string.

    Tokens pushed with their log-probabilities are ``released`` (as :class:`ReportedToken`) with
    the text they start: the tokens of the answer sent so far, and never one cut off with a stop
    string."""

    def __init__(self, tokenizer, eos_ids: set[int], stop: Sequence[str] = (), strip_leading: bool = True):
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.stop = [s for s in stop if s]
        self.strip_leading = strip_leading
        self.tokens: list[int] = []
        self.text = ""
        self.stopped = False
        self.released: list[ReportedToken] = []
        self._sent = 0
        self._whole_characters = 0  # of the text so far, a character still split across tokens left out
        self._unreleased: list[tuple[int, TokenLogprob]] = []  # (offset, log-probabilities) of tokens not yet sent

    def push(self, token: int, logprob: TokenLogprob | None = None) -> str:
        """Feed one generated token (and its log-probabilities); returns the text that is now safe to send."""
        if self.stopped or token in self.eos_ids:
            return ""
        if logprob is not None:
            self._unreleased.append((self._whole_characters, logprob))
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        text = text.lstrip() if self.strip_leading else text
        self._whole_characters = len(text.rstrip("\ufffd"))
        if text.endswith("\ufffd"):  # a character split across tokens: wait for the rest
            return ""
        self.text = text
        cuts = [i for i in (text.find(s, max(0, self._sent - len(s))) for s in self.stop) if i >= 0]
        if cuts:
            self.text, self.stopped = text[: min(cuts)], True
            return self._release(len(self.text))
        held = max((n for s in self.stop for n in range(len(s) - 1, 0, -1) if text.endswith(s[:n])), default=0)
        return self._release(len(text) - held)

    def finish(self) -> str:
        """The text held back for a stop string that never came."""
        return self._release(len(self.text))

    def _release(self, end: int) -> str:
        delta = self.text[self._sent : end] if end > self._sent else ""
        self._sent = max(self._sent, end)
        while self._unreleased and self._unreleased[0][0] < self._sent:
            offset, logprob = self._unreleased.pop(0)
            self.released.append(reported_token(self.tokenizer, logprob.token, offset, logprob))
        return delta


def reported_token(tokenizer, token: int, offset: int, logprob: TokenLogprob | None) -> ReportedToken:
    """``token`` at ``offset`` of a text with its log-probabilities (None: the first token of a
    prompt, which nothing predicts), the tokens as text."""

    def text(token: int) -> str:
        return tokenizer.decode([token])

    if logprob is None:
        return ReportedToken(text(token), offset, None, ())
    return ReportedToken(text(token), offset, logprob.logprob, tuple((text(t), lp) for t, lp in logprob.top))
