"""``chameleon profile``: what work costs on this host (prefill for the cache policy, each tier for ``chameleon plan``)."""

from __future__ import annotations

from pathlib import Path

import typer

from chameleon.cli.common import number_list, vector_index
from retriever.errors import InvalidInput

app = typer.Typer(
    no_args_is_help=True, help="Measure what work costs on this host: prefill for the cache policy, each tier for the planner."
)


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


@app.command("retrieval")
def profile_retrieval(
    index: Path = typer.Option(..., "--index", help="The index the tier serves (a vector or passage index)."),
    out: Path = typer.Option(..., "--out", help="Where to write the profile (JSON), for `chameleon plan`."),
    seconds: float = typer.Option(3.0, "--seconds", help="Length of each of the three calibration runs."),
    in_flight: int = typer.Option(8, "--in-flight", help="Searches in flight during a run."),
    nprobe: str | None = typer.Option(
        None, "--nprobe", help="Low and high nprobe of the runs, e.g. 4,128 (default: 4 and min(nlist, 128))."
    ),
):
    """Measure what a search costs each process of the retrieval tier on this host (real node and
    coordinator processes, CPU time per search), for `chameleon plan`."""
    from chameleon.plan.measure import measure_retrieval
    from chameleon.plan.profiles import save_profile

    nprobes = None
    if nprobe is not None:
        nprobes = tuple(number_list(nprobe, "--nprobe"))
        if len(nprobes) != 2:
            raise InvalidInput(f"--nprobe takes two values, low and high, got {nprobe!r}")
    profile = measure_retrieval(vector_index(index), seconds, in_flight, nprobes, progress=typer.echo)
    save_profile(profile, out)
    typer.echo(
        f"wrote {out}: node {profile.node_s * 1e6:.0f} us + {profile.node_per_code_s * 1e9:.2f} ns/code, "
        f"coordinator {profile.coordinator_s * 1e6:.0f} us + {profile.coordinator_per_shard_s * 1e6:.0f} us/shard, "
        f"caller {profile.front_s * 1e6:.0f} us per search"
    )


@app.command("inference")
def profile_inference(
    out: Path = typer.Option(..., "--out", help="Where to write the profile (JSON), for `chameleon plan`."),
    model: str | None = typer.Option(None, "--model", help="Local Hugging Face model directory (default: built-in)."),
    context: int = typer.Option(768, "--context", help="Tokens of a RAG prompt: decode is timed after them, prefill up to twice them."),
):
    """Measure an inference replica's work on this host: embedding a question, prefill, decode
    steps at batch sizes 1, 4 and 8, for `chameleon plan`."""
    from chameleon.plan.measure import measure_inference
    from chameleon.plan.profiles import save_profile

    profile = measure_inference(model, context)
    save_profile(profile, out)
    typer.echo(
        f"wrote {out} ({profile.device}, {profile.threads} threads): embed {profile.embed_s * 1e3:.1f} ms, "
        f"prefill of {profile.context} tokens {profile.prefill_seconds(profile.context) * 1e3:.1f} ms, "
        f"decode step {profile.step_s * 1e3:.1f} ms + {profile.step_per_row_s * 1e3:.2f} ms/row"
    )
