"""``chameleon plan``: the processes each tier needs for a target, from measured profiles."""

from __future__ import annotations

import json
import math
from pathlib import Path

import typer

from chameleon.cli.common import vector_index
from retriever.errors import InvalidInput


def plan(
    retrieval_profile: Path = typer.Option(..., "--retrieval-profile", help="`chameleon profile retrieval` output."),
    inference_profile: Path | None = typer.Option(
        None, "--inference-profile", help="`chameleon profile inference` output; without it, the retrieval tier alone is sized."
    ),
    qps: float = typer.Option(..., "--qps", help="Target requests per second (searches per second for the retrieval tier alone)."),
    ttft_p99: float | None = typer.Option(None, "--ttft-p99", help="Time-to-first-token SLO, seconds (99th percentile)."),
    index: Path | None = typer.Option(
        None, "--index", help="The index to serve, vectors or passages (gives --ntotal, --nlist, --code-size)."
    ),
    ntotal: float | None = typer.Option(None, "--ntotal", help="Vectors in the database (e.g. 1e9)."),
    nlist: int | None = typer.Option(None, "--nlist", help="Its inverted lists."),
    code_size: int | None = typer.Option(None, "--code-size", help="Bytes per PQ code."),
    nprobe: int = typer.Option(16, "--nprobe", help="Lists probed per search."),
    passages: int = typer.Option(4, "--passages", help="Passages per retrieval (k)."),
    passage_tokens: int = typer.Option(120, "--passage-tokens", help="Tokens per passage."),
    question_tokens: int = typer.Option(60, "--question-tokens", help="Tokens of the question and the prompt's template."),
    output_tokens: int = typer.Option(64, "--output-tokens", help="Tokens generated per request."),
    retrieval_interval: int = typer.Option(0, "--retrieval-interval", help="Retrieve again every N generated tokens (0: once)."),
    node_memory_gib: float = typer.Option(64.0, "--node-memory-gib", help="Memory of a retrieval node for its codes."),
    utilisation: float = typer.Option(0.75, "--utilisation", help="The most of any tier's capacity a plan uses."),
    min_replicas: int = typer.Option(2, "--min-replicas", help="Nodes per shard at least (2: one can fail or drain)."),
    inference_replica_cost: float = typer.Option(8.0, "--inference-replica-cost", help="An inference replica's cost, in cores."),
    gib_cost: float = typer.Option(0.125, "--gib-cost", help="A GiB of retrieval-node memory's cost, in cores."),
    max_batch: int = typer.Option(8, "--max-batch", help="Sequences an inference replica decodes together."),
    shards: int | None = typer.Option(
        None, "--shards", help="Predict this deployment instead of sizing one (with --replicas, --coordinators, --inference-replicas)."
    ),
    replicas: int = typer.Option(1, "--replicas", help="With --shards: nodes per shard."),
    coordinators: int = typer.Option(1, "--coordinators", help="With --shards: coordinator replicas."),
    inference_replicas: int = typer.Option(1, "--inference-replicas", help="With --shards: inference replicas."),
    host_cores: float | None = typer.Option(None, "--host-cores", help="With --shards: every process on one host of this many cores."),
    values: Path | None = typer.Option(None, "--values", help="Write the deployment as Helm values for deploy/helm/chameleon."),
    json_out: Path | None = typer.Option(None, "--json", help="Write the plan and its prediction as JSON."),
):
    """Size each tier for a target rate and TTFT SLO (the cheapest plan, its bottleneck named), or
    with --shards predict what a given deployment serves."""
    from chameleon.plan.model import Deployment, Target, Workload, cheapest_plan, predict
    from chameleon.plan.profiles import InferenceProfile, RetrievalProfile, load_profile
    from retriever.files import write_json_atomic
    from retriever.index import manifest_params, read_manifest

    retrieval = load_profile(retrieval_profile)
    inference = load_profile(inference_profile) if inference_profile is not None else None
    if not isinstance(retrieval, RetrievalProfile) or not isinstance(inference, InferenceProfile | None):
        raise InvalidInput("--retrieval-profile takes a retrieval profile and --inference-profile an inference profile")
    if index is not None:
        manifest = read_manifest(vector_index(index))
        params = manifest_params(manifest)
        ntotal, nlist, code_size = ntotal or manifest["ntotal"], nlist or params.nlist, code_size or params.code_size
    if ntotal is None or nlist is None or code_size is None or not math.isfinite(ntotal):
        raise InvalidInput("give the database: --index, or --ntotal, --nlist and --code-size")
    workload = Workload(int(ntotal), nlist, code_size, nprobe, passages, passage_tokens, question_tokens, output_tokens, retrieval_interval)
    if shards is not None:
        deployment = Deployment(shards, replicas, inference_replicas, max_batch, host_cores, coordinators)
        prediction = predict(workload, deployment, retrieval, inference)
        p99 = prediction.ttft_p99_s(qps, deployment)
        _show(deployment, prediction, qps, p99)
        result = {"deployment": deployment.__dict__, "prediction": prediction.as_dict(), "ttft_p99_s": p99}
    else:
        target = Target(
            qps,
            ttft_p99,
            utilisation,
            node_memory_gib,
            inference_replica_cost=inference_replica_cost,
            max_batch=max_batch,
            min_replicas=min_replicas,
            gib_cost=gib_cost,
        )
        found = cheapest_plan(workload, target, retrieval, inference)
        if found.deployment is None:
            raise InvalidInput(found.reason)
        deployment = found.deployment
        _show(deployment, found.prediction, qps, found.ttft_p99_s)
        typer.echo(f"bottleneck: {found.reason}")
        typer.echo(
            f"compose:    chameleon cluster scale --compose deploy/compose.yaml "
            f"--shards {found.deployment.shards} --replicas {found.deployment.replicas}  (the retrieval tier; Compose runs one server)"
        )
        result = {
            "deployment": found.deployment.__dict__,
            "prediction": found.prediction.as_dict(),
            "ttft_p99_s": found.ttft_p99_s,
            "reason": found.reason,
        }
    if values is not None:
        _write_values(values, deployment, inference is not None)
        typer.echo(f"wrote {values} (helm install ... -f {values})")
    result["workload"] = workload.__dict__
    if json_out is not None:
        write_json_atomic(json_out, json.loads(json.dumps(result, default=str)))


def _show(deployment, prediction, qps: float, p99: float) -> None:
    d = deployment
    typer.echo(
        f"retrieval:  {d.shards} shard(s) x {d.replicas} replica(s), a node holds {prediction.node_memory_gib:.2f} GiB of codes; "
        f"{d.coordinators} coordinator(s)"
    )
    if math.isfinite(prediction.capacity["inference"]):
        typer.echo(f"inference:  {d.inference_replicas} replica(s), batches of {d.max_batch}")
    typer.echo(f"serves:     {prediction.requests_per_s:,.2f} requests/s at most ({prediction.bottleneck} first)")
    for name, capacity in prediction.capacity.items():
        if math.isfinite(capacity):
            typer.echo(f"  {name:<16} {capacity:>12,.2f} requests/s   {min(qps / capacity, 9.99):>5.0%} busy at {qps:g}/s")
    what = "TTFT" if math.isfinite(prediction.capacity["inference"]) else "search"
    loaded = f"p99 ~{p99 * 1e3:,.1f} ms at {qps:g}/s (M/M/c estimate)" if math.isfinite(p99) else f"unbounded at {qps:g}/s (past capacity)"
    typer.echo(f"{what + ':':<11} {prediction.ttft_s * 1e3:,.1f} ms unloaded, {loaded}")


def _write_values(path: Path, deployment, with_inference: bool) -> None:
    import yaml

    from retriever.files import write_text_atomic

    values = {
        "index": {"shards": deployment.shards},
        "retrieval": {"replicas": deployment.replicas, "threads": 1},
        "coordinator": {"replicas": deployment.coordinators},
    }
    if with_inference:
        values["server"] = {"replicas": deployment.inference_replicas}
    write_text_atomic(path, "# written by `chameleon plan`\n" + yaml.safe_dump(values, sort_keys=False))
