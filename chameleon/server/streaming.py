"""How a request's generations are run and answered: whole, or as server-sent events.

A request runs one generation per distinct choice (:class:`Run`); :func:`stream_runs` starts them
and turns their text into events as it comes. Each route renders its choices its own way
(:class:`Chunks`): ``/v1/rag`` as ``token`` and ``done`` events (:class:`RagChunks`), the OpenAI
routes as ``chat.completion`` / ``text_completion`` objects and chunks (:class:`OpenAIChunks`). An
error found before the first text is raised (an ordinary error response); one after it ends the
stream with an ``error`` event.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

from chameleon.server.middleware import error_body, note, request_id
from chameleon.server.service import Completion
from chameleon.server.text_stream import ReportedToken
from retriever.errors import ChameleonError

SERVER_LOG = logging.getLogger("chameleon.server")


@dataclass
class Run:
    """One generation of a request, ``call(on_text, cancelled)``, and the choices it answers."""

    call: Callable[..., Completion]
    choices: list[int]


async def stream_runs(runs: list[Run], blocking, chunks: Chunks) -> AsyncIterator[str]:
    """Start every run and wait for the first text of any (or a failure first, raised here);
    returns the events of the whole stream. Closing the stream early cancels the generations."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()  # (run number, (text, its tokens' logprobs)), then (run number, None) when it ends
    cancelled = threading.Event()
    tasks = []
    for number, run in enumerate(runs):

        def on_text(text, logprobs, n=number):
            loop.call_soon_threadsafe(queue.put_nowait, (n, (text, logprobs)))

        task = asyncio.ensure_future(blocking(run.call, on_text, cancelled))
        task.add_done_callback(lambda _, n=number: queue.put_nowait((n, None)))
        tasks.append(task)
    first = await queue.get()
    if first[1] is None and tasks[first[0]].exception() is not None:
        cancelled.set()
        tasks[first[0]].result()  # what went wrong before any text: an ordinary error response

    async def events() -> AsyncIterator[str]:
        try:
            for event in chunks.opening([index for run in runs for index in run.choices]):
                yield event
            done: dict[int, Completion] = {}
            number, piece = first
            while True:
                if piece is not None:
                    for index in runs[number].choices:
                        yield chunks.delta(*piece, index)
                else:
                    try:
                        done[number] = tasks[number].result()
                    except Exception as e:  # after the first token the status line is gone: report in the stream
                        if not isinstance(e, ChameleonError):
                            SERVER_LOG.error("request %s failed in its stream", request_id(), exc_info=e)
                        yield chunks.error(error_body(str(e) if isinstance(e, ChameleonError) else "internal error", "server_error"))
                        return
                    for index in runs[number].choices:
                        for event in chunks.finished(done[number], index):
                            yield event
                    if len(done) == len(runs):
                        break
                number, piece = await queue.get()
            choices = [(done[n], run.choices) for n, run in enumerate(runs)]
            note(usage=usage_of(choices))
            for event in chunks.closing(choices):
                yield event
        finally:
            cancelled.set()

    return events()


def _sse(data: dict | str, event: str | None = None) -> str:
    payload = data if isinstance(data, str) else json.dumps(data)
    return (f"event: {event}\n" if event else "") + f"data: {payload}\n\n"


Choices = list[tuple[Completion, list[int]]]  # each generation and the choices it answers


class Chunks(Protocol):
    """How one route renders its choices: whole, or as the events of a stream."""

    def whole(self, choices: Choices) -> dict: ...
    def opening(self, indices: list[int]) -> list[str]: ...
    def delta(self, text: str, logprobs: list[ReportedToken], index: int) -> str: ...
    def finished(self, completion: Completion, index: int) -> list[str]: ...
    def closing(self, choices: Choices) -> list[str]: ...
    def error(self, body: dict) -> str: ...


class RagChunks:
    """``/v1/rag`` (one choice): a ``token`` event per piece of text, then ``done`` with the whole response."""

    def __init__(self, model_id: str):
        self.model_id = model_id

    def whole(self, choices: Choices) -> dict:
        c = choices[0][0]
        return {
            "answer": c.text,
            "sources": c.sources,
            "finish_reason": c.finish_reason,
            "model": self.model_id,
            "usage": usage_of(choices),
            "cache": {"cached_tokens": c.cached_tokens, "prompt_tokens": c.prompt_tokens},
            "timings": c.timings.as_dict(),
        }

    def opening(self, indices: list[int]) -> list[str]:
        return []

    def delta(self, text: str, logprobs: list[ReportedToken], index: int) -> str:
        return _sse({"text": text}, "token")

    def finished(self, completion: Completion, index: int) -> list[str]:
        return []

    def closing(self, choices: Choices) -> list[str]:
        return [_sse(self.whole(choices), "done")]

    def error(self, body: dict) -> str:
        return _sse(body, "error")


class OpenAIChunks:
    """OpenAI's ``chat.completion`` / ``text_completion`` objects and their streamed chunks. With
    several choices, the ``chameleon`` field (sources, timings) is the first choice's. With
    ``logprobs``, each choice (each chunk) carries its tokens' log-probabilities in the route's shape."""

    def __init__(self, model_id: str, kind: str, include_usage: bool, logprobs: bool = False):
        self.model_id, self.kind, self.include_usage, self.logprobs = model_id, kind, include_usage, logprobs
        self.id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{request_id()}"
        self.created = int(time.time())

    def _object(self, chunk: bool) -> dict:
        name = ("chat.completion" if self.kind == "chat" else "text_completion") + (".chunk" if chunk and self.kind == "chat" else "")
        return {"id": self.id, "object": name, "created": self.created, "model": self.model_id}

    def _logprobs(self, tokens: list[ReportedToken] | None) -> dict | None:
        if not self.logprobs or tokens is None:
            return None
        if self.kind == "text":
            return {
                "tokens": [t.text for t in tokens],
                "token_logprobs": [t.logprob for t in tokens],  # None for a prompt's first token
                "top_logprobs": [None if t.logprob is None else dict(t.top) for t in tokens],
                "text_offset": [t.offset for t in tokens],
            }

        def entry(text: str, logprob: float) -> dict:
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return {
            "content": [{**entry(t.text, t.logprob), "top_logprobs": [entry(*other) for other in t.top]} for t in tokens],
            "refusal": None,
        }

    def _choice(self, index: int, text: str | None, finish_reason: str | None, first: bool = False, logprobs=None) -> dict:
        if self.kind == "text":
            return {"index": index, "text": text or "", "finish_reason": finish_reason, "logprobs": self._logprobs(logprobs)}
        delta = ({"role": "assistant"} if first else {}) | ({"content": text} if text is not None else {})
        return {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": self._logprobs(logprobs)}

    def whole(self, choices: Choices) -> dict:
        rendered = []
        for c, indices in choices:
            for index in indices:
                if self.kind == "chat":
                    message = {"role": "assistant", "content": c.text}
                    rendered.append(
                        {"index": index, "message": message, "finish_reason": c.finish_reason, "logprobs": self._logprobs(c.logprobs)}
                    )
                else:
                    rendered.append(
                        {"index": index, "text": c.text, "finish_reason": c.finish_reason, "logprobs": self._logprobs(c.logprobs)}
                    )
        rendered.sort(key=lambda choice: choice["index"])
        return {**self._object(False), "choices": rendered, "usage": usage_of(choices), "chameleon": _extension(choices[0][0])}

    def opening(self, indices: list[int]) -> list[str]:
        if self.kind != "chat":
            return []
        return [_sse({**self._object(True), "choices": [self._choice(index, "", None, first=True)]}) for index in sorted(indices)]

    def delta(self, text: str, logprobs: list[ReportedToken], index: int) -> str:
        return _sse({**self._object(True), "choices": [self._choice(index, text, None, logprobs=logprobs)]})

    def finished(self, completion: Completion, index: int) -> list[str]:
        return [
            _sse(
                {
                    **self._object(True),
                    "choices": [self._choice(index, None, completion.finish_reason)],
                    "chameleon": _extension(completion),
                }
            )
        ]

    def closing(self, choices: Choices) -> list[str]:
        usage = [_sse({**self._object(True), "choices": [], "usage": usage_of(choices)})] if self.include_usage else []
        return [*usage, _sse("[DONE]")]

    def error(self, body: dict) -> str:
        return _sse(body)


def usage_of(choices: Choices) -> dict:
    """The prompt once (every choice has the same), the new tokens of every choice."""
    first = choices[0][0]
    completion_tokens = sum(c.completion_tokens * len(indices) for c, indices in choices)
    return {
        "prompt_tokens": first.prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": first.prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": first.cached_tokens},
    }


def _extension(c: Completion) -> dict:
    return {"sources": c.sources, "timings": c.timings.as_dict()}
