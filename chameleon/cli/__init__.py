"""The ``chameleon`` command line: one module per group of commands (``index``, ``bench``,
``profile``, the tier's ``node``, ``cluster`` and ``keys``) or per command (``ask``, ``serve``,
``search``, ``plan``), assembled here; every error the project raises ends as one line and its kind's exit code."""

from __future__ import annotations

import sys

import typer

from chameleon.cli import ask, bench, index, plan, profile, search, serve, tier
from retriever.errors import ChameleonError, InvalidInput, NotFound, Unavailable, Unsupported

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, help="Chameleon: heterogeneous RAG serving.")
app.add_typer(index.app, name="index")
app.add_typer(bench.app, name="bench")
app.add_typer(tier.node_app, name="node")
app.add_typer(tier.cluster_app, name="cluster")
app.add_typer(tier.keys_app, name="keys")
app.add_typer(profile.app, name="profile")
app.command("ask")(ask.ask)
app.command("serve")(serve.serve)
app.command("search")(search.search)
app.command("plan")(plan.plan)

# Exit codes by kind of error (retriever.errors): 2 for what the user can fix in the command, its
# files or its installation; 3 for a tier or server that does not answer now (the same command may
# succeed later). Looked up along the error's classes, most specific first.
EXIT_CODES = {InvalidInput: 2, NotFound: 2, Unsupported: 2, Unavailable: 3, ChameleonError: 2, OSError: 2}


def exit_code(error: BaseException) -> int:
    return next(EXIT_CODES[kind] for kind in type(error).__mro__ if kind in EXIT_CODES)


def main() -> None:
    try:
        app()
    except (ChameleonError, OSError) as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(exit_code(e))
