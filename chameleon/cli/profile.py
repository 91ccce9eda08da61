"""``chameleon profile``: the costs the cache policy weighs."""

from __future__ import annotations

from pathlib import Path

import typer

from chameleon.cli.common import number_list
from retriever.errors import InvalidInput

app = typer.Typer(no_args_is_help=True, help="Measure the costs the cache policy works with.")


@app.command("prefill")
def profile_prefill(
    out: Path = typer.Option(..., "--out", help="Where to write the profile (JSON)."),
    model: str | None = typer.Option(None, "--model", help="Local Hugging Face model directory (default: built-in)."),
    cached: str = typer.Option("0,128,512,1024", "--cached", help="Cached prefix lengths (tokens), from 0."),
    new: str = typer.Option("16,64,256,512", "--new", help="New-token counts."),
    repeats: int = typer.Option(3, "--repeats", help="Timings per cell; the best is kept."),
):
    """Time prefill of N new tokens after C cached ones: the T(C, N) the KV cache policy costs requests with."""
    from chameleon.engines.prefill_timing import measure
    from chameleon.engines.torch_engine import TorchEngine

    grid_cached, grid_new = number_list(cached, "--cached"), number_list(new, "--new")
    if not 1 <= repeats <= 100:
        raise InvalidInput(f"--repeats must be between 1 and 100, got {repeats}")
    profile = measure(TorchEngine(model), grid_cached, grid_new, repeats, progress=True)
    profile.save(out)
    typer.echo(f"wrote {out}: {len(grid_cached)} x {len(grid_new)} prefill times on {profile.device}")
    for c, row in zip(profile.cached, profile.table):
        typer.echo(f"  cached {c:>6}: " + "  ".join(f"{n} new {t * 1e3:8.1f} ms" for n, t in zip(profile.new, row)))
