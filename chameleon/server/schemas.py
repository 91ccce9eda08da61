"""Request and response bodies of the HTTP API (they are the OpenAPI schema at ``/openapi.json``).

The OpenAI-compatible requests ignore fields that change nothing in an answer (clients send
many). Those that would and that we do not implement (``tools``, ``response_format``,
penalties…) are taken only at the values that ask for nothing: any other is refused
(:meth:`OpenAIGeneration.refused_parameters`), never silently dropped. ``n`` is at most 8.
``logprobs`` (and on completions ``echo``, which scores the prompt) report the model's own
log-probabilities. Decoding is greedy unless a request sets ``temperature`` (then ``top_p`` and
``seed`` apply too): unlike OpenAI's default of 1, a request that says nothing gets the same
answer every time.
Chameleon's own fields (``rag``, ``k``, ``retrieval_interval``) ride along in the same bodies
(``extra_body`` in the ``openai`` client).
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from chameleon.engines.sampling import MAX_SEED, MAX_TEMPERATURE, MAX_TOP_LOGPROBS, Sampling

MAX_TEXT = 32_000
MAX_MESSAGES = 64
MAX_EMBEDDING_INPUTS = 2048  # as OpenAI's
MAX_CHOICES = 8
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's bound on /v1/completions


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _OpenAICompatible(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _StopStrings(BaseModel):
    stop: str | list[str] | None = Field(None, description="Up to 4 strings that end the answer (never sent).")

    @field_validator("stop")
    @classmethod
    def _at_most_four(cls, value):
        if len(cls._as_list(value)) > 4 or any(len(s) > 256 for s in cls._as_list(value)):
            raise ValueError("stop takes at most 4 strings of at most 256 characters")
        return value

    @staticmethod
    def _as_list(value) -> list[str]:
        return [] if value is None else [value] if isinstance(value, str) else value

    @property
    def stops(self) -> list[str]:
        return self._as_list(self.stop)


class _Sampled(BaseModel):
    temperature: float | None = Field(
        None,
        ge=0,
        le=MAX_TEMPERATURE,
        description="0 or left out: greedy. Otherwise each token is drawn from softmax(logits / temperature).",
    )
    top_p: float | None = Field(
        None,
        ge=0,
        le=1,
        description="With a temperature: draw from the most likely tokens whose probabilities reach top_p (default 1: all).",
    )
    seed: int | None = Field(
        None, ge=0, le=MAX_SEED, description="With a temperature: the same seed repeats the same answer on this server."
    )

    @property
    def reported_logprobs(self) -> int | None:
        """How many most likely tokens to report beside each chosen one (None: report nothing)."""
        return None

    def sampling(self, choice: int = 0) -> Sampling | None:
        """How the tokens of this request's ``choice`` are chosen (None: greedy, nothing reported).
        Choice 0 draws with ``seed``, as a request for one choice does; the others with seeds
        derived from it."""
        seed = self.seed
        if choice and seed is not None:
            seed = int.from_bytes(hashlib.blake2b(f"{seed}/{choice}".encode(), digest_size=8).digest(), "little") & MAX_SEED
        return Sampling.of(self.temperature, self.top_p, seed, self.reported_logprobs)


# -- Chameleon's own API -----------------------------------------------------------------------


class Source(BaseModel):
    doc_id: str
    title: str
    score: float
    snippet: str


class RagRequest(_StopStrings, _Sampled):
    model_config = ConfigDict(extra="forbid")

    question: str = Field(min_length=1, max_length=MAX_TEXT)
    k: int | None = Field(None, ge=1, le=64, description="Passages to retrieve (default: the server's).")
    retrieval_interval: int | None = Field(None, ge=1, description="Retrieve again every N new tokens.")
    mode: Literal["passage", "knnlm"] = "passage"
    max_tokens: int | None = Field(None, ge=1, description="New tokens at most (default and limit: the server's).")
    stream: bool = Field(False, description="Server-sent events: `token` events, then `done` with the whole response.")


class RagResponse(BaseModel):
    answer: str
    sources: list[Source]
    finish_reason: Literal["stop", "length"]
    model: str
    usage: dict[str, int]
    cache: dict[str, int] = Field(description="Prompt tokens whose KV was reused, and prompt tokens in all.")
    timings: dict[str, float | int | bool]


class SearchRequest(_Strict):
    query: str | None = Field(None, min_length=1, max_length=MAX_TEXT, description="Text to search for.")
    vector: list[float] | None = Field(None, min_length=1, max_length=65_536, description="Or an embedding to search with.")
    k: int = Field(10, ge=1, le=1000)
    nprobe: int | None = Field(None, ge=1, le=65_536)


class SearchHit(Source):
    passage_id: int


class SearchResponse(BaseModel):
    results: list[SearchHit]
    partial: bool
    timings: dict[str, float | int | bool]


# -- OpenAI-compatible API ---------------------------------------------------------------------


class TextPart(_OpenAICompatible):
    type: Literal["text"]
    text: str = Field(max_length=MAX_TEXT)


class ChatMessage(_OpenAICompatible):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] = Field(max_length=MAX_TEXT)

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class StreamOptions(_OpenAICompatible):
    include_usage: bool = False


# OpenAI parameters that change what an answer holds, which this server does not implement (echo:
# on chat; completions take it), and the values at which they ask for nothing (clients' defaults).
_NEUTRAL_VALUES = {
    "echo": lambda v: v is None or v is False,
    "best_of": lambda v: v in (None, 1),
    "suffix": lambda v: not v,
    "presence_penalty": lambda v: v in (None, 0),
    "frequency_penalty": lambda v: v in (None, 0),
    "logit_bias": lambda v: not v,
    "response_format": lambda v: v in (None, {"type": "text"}),
    "tools": lambda v: not v,
    "functions": lambda v: not v,
    "tool_choice": lambda v: v in (None, "none", "auto"),
    "function_call": lambda v: v in (None, "none", "auto"),
    "modalities": lambda v: v in (None, ["text"]),
    "audio": lambda v: v is None,
    "prediction": lambda v: v is None,
}


class OpenAIGeneration(_StopStrings, _Sampled):
    model_config = ConfigDict(extra="allow")  # kept, to refuse what asks for more than we do

    model: str | None = Field(None, max_length=256)
    max_tokens: int | None = Field(None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(
        1, ge=1, le=MAX_CHOICES, description="Choices to generate: several draw with their own seeds; greedy ones are all the same."
    )
    rag: bool = Field(True, description="Retrieve passages for the prompt (Chameleon extension).")
    k: int | None = Field(None, ge=1, le=64, description="Passages to retrieve (Chameleon extension).")

    @property
    def refused_parameters(self) -> list[str]:
        """The OpenAI parameters of this request that ask for something this server does not do:
        answering without it would pass off a different answer as the one asked for."""
        extra = self.model_extra or {}
        return [name for name, neutral in _NEUTRAL_VALUES.items() if name in extra and not neutral(extra[name])]


_LOGPROBS_MEANING = "the model's own distribution: log-softmax of the logits, before temperature and top_p"


class ChatCompletionRequest(OpenAIGeneration):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1)
    retrieval_interval: int | None = Field(None, ge=1, description="Retrieve again every N new tokens (Chameleon extension).")
    logprobs: bool = Field(False, description=f"Each token of the answer with its log-probability ({_LOGPROBS_MEANING}).")
    top_logprobs: int | None = Field(
        None, ge=0, le=MAX_TOP_LOGPROBS, description="With logprobs: the most likely tokens at each place too."
    )

    @model_validator(mode="after")
    def _top_needs_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @property
    def reported_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(OpenAIGeneration):
    prompt: str | list[str] = Field(description="One prompt (a list must hold exactly one).")
    max_tokens: int | None = Field(None, ge=0, description="New tokens at most; 0 (with echo) scores the prompt alone.")
    echo: bool = Field(False, description="Return the prompt before its continuation, and with logprobs its tokens' too.")
    logprobs: int | None = Field(
        None,
        ge=0,
        le=MAX_COMPLETION_LOGPROBS,
        strict=True,
        description=f"Each token of the answer with its log-probability and the N most likely tokens' ({_LOGPROBS_MEANING}).",
    )

    @field_validator("logprobs", mode="before")
    @classmethod
    def _false_is_none(cls, value):
        return None if value is False else value  # some clients send false for "none"

    @model_validator(mode="after")
    def _nothing_to_answer(self):
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens 0 asks for nothing unless echo is true")
        return self

    @property
    def reported_logprobs(self) -> int | None:
        return self.logprobs

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value):
        prompts = [value] if isinstance(value, str) else value
        if len(prompts) != 1:
            raise ValueError("exactly one prompt per request")
        if not prompts[0] or len(prompts[0]) > MAX_TEXT:
            raise ValueError(f"the prompt must hold 1 to {MAX_TEXT} characters")
        return prompts[0]


_EmbeddedText = Annotated[str, Field(min_length=1, max_length=MAX_TEXT)]


class EmbeddingRequest(_OpenAICompatible):
    input: _EmbeddedText | Annotated[list[_EmbeddedText], Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)] = Field(
        description="A text, or a list of up to 2048 texts, to embed with the server's embedder."
    )
    model: str | None = Field(None, max_length=256)
    encoding_format: Literal["float", "base64"] = Field("float", description="base64: each vector's float32 bytes, little-endian.")
    dimensions: int | None = Field(None, ge=1, description="Must be the embedder's dimension if given (vectors are not cut).")

    @property
    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else self.input
