"""What the commands share: messages on stderr, comma-separated number lists, metric names."""

from __future__ import annotations

from enum import Enum

import typer

from retriever.errors import InvalidInput


class Metric(str, Enum):
    l2 = "l2"
    ip = "ip"
    cos = "cos"


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
