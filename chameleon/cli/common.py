"""What the commands share: messages on stderr, comma-separated number lists, metric names, a passage index's vectors."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from retriever.errors import InvalidInput


class Metric(str, Enum):
    l2 = "l2"
    ip = "ip"
    cos = "cos"


def vector_index(index: Path) -> Path:
    """The vector index of ``index``: itself, or a passage index's (its ``index/``)."""
    return index / "index" if (index / "rag.json").is_file() else index


def say(message: str) -> None:
    typer.echo(message, err=True)


def number_list(text: str, what: str, kind=int) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        noun = "integers" if kind is int else "numbers"
        raise InvalidInput(f"{what} must be a comma-separated list of {noun}, got {text!r}") from None
    if not values:
        raise InvalidInput(f"{what} is empty")
    return values
