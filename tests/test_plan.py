"""The planner: tier profiles (measured on real processes, saved, refused when bad), the capacity
model, its queueing estimate against a simulation, and the cheapest plan's guarantees."""

import heapq
import json
import math

import numpy as np
import psutil
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chameleon.plan.measure import measure_inference, measure_retrieval, sample_queries
from chameleon.plan.model import Deployment, Target, Workload, cheapest_plan, node_memory_gib, node_seconds, predict, wait_p99_s
from chameleon.plan.profiles import InferenceProfile, RetrievalProfile, load_profile, save_profile
from retriever.build import train_quantizers
from retriever.errors import InvalidInput, NotFound
from retriever.index import read_manifest, save_index
from tests.helpers import chameleon

# About what this machine measures (runs/profiles after benchmarks/plan_check.py), rounded.
RETRIEVAL = RetrievalProfile(
    front_s=2e-4, coordinator_s=1e-4, coordinator_per_shard_s=1.5e-4, node_s=2e-4, node_per_code_s=1.2e-8, code_size=25, list_skew=1.17
)
INFERENCE = InferenceProfile(embed_s=0.011, prefill_s=0.023, prefill_per_token_s=0.0012, step_s=0.043, step_per_row_s=0.012, threads=2)
BILLION = Workload(ntotal=10**9, nlist=65536, code_size=16, nprobe=32)


def test_profiles_round_trip_and_bad_files_are_refused(tmp_path):
    for profile in (RETRIEVAL, INFERENCE):
        save_profile(profile, tmp_path / "p.json")
        assert load_profile(tmp_path / "p.json") == profile
    text = (tmp_path / "p.json").read_text()
    (tmp_path / "truncated.json").write_text(text[: len(text) // 2])
    (tmp_path / "other.json").write_text(json.dumps({"format": "chameleon-prefill-profile", "version": 1}))
    (tmp_path / "tier.json").write_text(text.replace('"inference"', '"gpu"'))
    (tmp_path / "missing.json").write_text(text.replace('"embed_s"', '"embed"'))
    (tmp_path / "nan.json").write_text(text.replace(f'"step_s": {INFERENCE.step_s}', '"step_s": NaN'))
    (tmp_path / "negative.json").write_text(text.replace(f'"step_s": {INFERENCE.step_s}', '"step_s": -1'))
    for name, said in {
        "truncated": "not a readable profile",
        "other": "not a chameleon-tier-profile",
        "tier": "unknown tier",
        "missing": "embed_s",
        "nan": "finite number",
        "negative": "finite number",
    }.items():
        with pytest.raises(InvalidInput, match=said):
            load_profile(tmp_path / f"{name}.json")
    with pytest.raises(NotFound):
        load_profile(tmp_path / "absent.json")


def test_absurd_workloads_and_targets_are_refused():
    with pytest.raises(InvalidInput, match="nprobe"):
        Workload(1000, 16, 8, nprobe=32)
    with pytest.raises(InvalidInput, match="ntotal"):
        Workload(0, 16, 8, nprobe=4)
    with pytest.raises(InvalidInput, match="retrieval_interval"):
        Workload(1000, 16, 8, 4, retrieval_interval=-1)
    with pytest.raises(InvalidInput, match="positive rate"):
        Target(0)
    with pytest.raises(InvalidInput, match="utilisation"):
        Target(1, utilisation=1.5)
    with pytest.raises(InvalidInput, match="at least 1"):
        Deployment(0, 1, 1)


def test_iterative_retrieval_multiplies_searches_and_prompt():
    once = Workload(10**6, 1024, 16, 16, passages=4, passage_tokens=100, question_tokens=50, output_tokens=64)
    every_16 = Workload(10**6, 1024, 16, 16, passages=4, passage_tokens=100, question_tokens=50, output_tokens=64, retrieval_interval=16)
    assert (once.retrievals, every_16.retrievals) == (1, 4)
    assert (once.prompt_tokens, every_16.prompt_tokens) == (450, 1650)
    one, four = (predict(w, Deployment(1, 1, 1), RETRIEVAL, INFERENCE) for w in (once, every_16))
    assert four.capacity["retrieval nodes"] == pytest.approx(one.capacity["retrieval nodes"] / 4)
    assert four.capacity["inference"] < one.capacity["inference"]


@given(shards=st.integers(1, 64), replicas=st.integers(1, 16), servers=st.integers(1, 16), cores=st.floats(1, 512))
def test_prediction_is_the_tightest_limit(shards, replicas, servers, cores):
    deployment = Deployment(shards, replicas, servers, host_cores=cores)
    prediction = predict(BILLION, deployment, RETRIEVAL, INFERENCE)
    assert prediction.requests_per_s == min(prediction.capacity.values())
    assert prediction.bottleneck.split(" (")[0] == min(prediction.capacity, key=prediction.capacity.get)
    more = predict(BILLION, Deployment(shards, replicas + 1, servers), RETRIEVAL, INFERENCE)
    assert more.capacity["retrieval nodes"] == pytest.approx(prediction.capacity["retrieval nodes"] * (replicas + 1) / replicas)
    wider = predict(BILLION, Deployment(shards + 1, replicas, servers), RETRIEVAL, INFERENCE)
    assert node_seconds(BILLION, RETRIEVAL, shards + 1) < node_seconds(BILLION, RETRIEVAL, shards)  # each node scans less
    assert wider.capacity["coordinator"] < prediction.capacity["coordinator"]  # and the coordinator fans out further
    assert wider.node_memory_gib < prediction.node_memory_gib


def simulated_wait_p99(arrivals_per_s, service_per_s, servers, n=200_000, seed=0):
    """First come, first served M/M/c, simulated: the 99th percentile of the waits."""
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1 / arrivals_per_s, n))
    services = rng.exponential(1 / service_per_s, n)
    free = [0.0] * servers
    waits = np.empty(n)
    for i in range(n):
        earliest = heapq.heappop(free)
        start = max(earliest, arrivals[i])
        waits[i] = start - arrivals[i]
        heapq.heappush(free, start + services[i])
    return float(np.percentile(waits[n // 10 :], 99))


@pytest.mark.parametrize("servers,load", [(1, 0.5), (1, 0.8), (4, 0.7), (16, 0.85)])
def test_queueing_estimate_agrees_with_a_simulated_queue(servers, load):
    service = 10.0
    arrivals = load * servers * service
    assert wait_p99_s(arrivals, service, servers) == pytest.approx(simulated_wait_p99(arrivals, service, servers), rel=0.15)
    if servers == 1:  # M/M/1's closed form: P(wait > t) = rho e^{-mu (1 - rho) t}
        assert wait_p99_s(arrivals, service, 1) == pytest.approx(math.log(100 * load) / (service * (1 - load)))
    assert wait_p99_s(0.001, service, servers) == 0.0


@settings(deadline=None, max_examples=40)
@given(
    qps=st.floats(0.5, 2000),
    slo=st.one_of(st.none(), st.floats(0.5, 5)),
    memory=st.floats(4, 256),
    output_tokens=st.integers(1, 256),
    min_replicas=st.integers(1, 3),
)
def test_the_plan_meets_its_target_and_nothing_smaller_does(qps, slo, memory, output_tokens, min_replicas):
    workload = Workload(10**9, 65536, 16, 32, output_tokens=output_tokens)
    target = Target(qps, slo, node_memory_gib=memory, min_replicas=min_replicas)
    found = cheapest_plan(workload, target, RETRIEVAL, INFERENCE)
    if found.deployment is None:
        assert "stood in the way" in found.reason
        return
    d, prediction = found.deployment, found.prediction
    needed = qps / target.utilisation
    assert all(capacity >= needed * (1 - 1e-9) for capacity in prediction.capacity.values())
    assert prediction.node_memory_gib <= memory and d.replicas >= min_replicas
    assert slo is None or found.ttft_p99_s <= slo
    # one replica fewer, of either tier, misses the target
    if d.replicas > min_replicas:
        fewer = predict(workload, Deployment(d.shards, d.replicas - 1, d.inference_replicas), RETRIEVAL, INFERENCE)
        assert fewer.capacity["retrieval nodes"] < needed
    if d.inference_replicas > 1:
        fewer_servers = Deployment(d.shards, d.replicas, d.inference_replicas - 1)
        fewer = predict(workload, fewer_servers, RETRIEVAL, INFERENCE)
        assert fewer.capacity["inference"] < needed or fewer.capacity["front"] < needed or fewer.ttft_p99_s(qps, fewer_servers) > slo


def test_a_plan_names_what_stands_in_its_way():
    assert node_memory_gib(BILLION, 1) > 20
    tight = cheapest_plan(BILLION, Target(10, node_memory_gib=1.0, max_shards=8), RETRIEVAL, INFERENCE)
    assert tight.deployment is None and "node memory" in tight.reason
    unloaded = predict(BILLION, Deployment(1, 1, 1), RETRIEVAL, INFERENCE).ttft_s
    hopeless = cheapest_plan(BILLION, Target(10, ttft_p99_s=unloaded / 4), RETRIEVAL, INFERENCE)
    assert hopeless.deployment is None and "TTFT" in hopeless.reason
    roomy = cheapest_plan(BILLION, Target(10, node_memory_gib=8.0), RETRIEVAL, INFERENCE)
    assert roomy.deployment.shards >= 3 and roomy.prediction.node_memory_gib <= 8.0


def test_retrieval_profile_is_measured_on_real_processes(tmp_path, l2_index):
    save_index(l2_index, tmp_path / "index")
    queries = sample_queries(l2_index, 50)
    assert queries.shape == (50, l2_index.params.dim) and np.isfinite(queries).all()
    lines = []
    profile = measure_retrieval(tmp_path / "index", seconds=0.5, in_flight=4, nprobes=(2, 32), progress=lines.append)
    assert [(r["shards"], r["nprobe"]) for r in profile.runs] == [(1, 2), (1, 32), (2, 2)] and len(lines) == 3
    assert all(r["searches"] > 0 and r["node_s"] > 0 and r["coordinator_s"] > 0 for r in profile.runs)
    assert profile.runs[1]["codes"] > 8 * profile.runs[0]["codes"]  # 16x the lists, whatever their sizes
    assert profile.code_size == l2_index.params.code_size and profile.list_skew > 0 and 0 < profile.busy_ceiling <= 1
    assert not [p for p in psutil.Process().children(recursive=True) if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    save_profile(profile, tmp_path / "retrieval.json")
    assert load_profile(tmp_path / "retrieval.json") == profile
    with pytest.raises(InvalidInput, match="low nprobe < high nprobe"):
        measure_retrieval(tmp_path / "index", nprobes=(8, 8))
    save_index(train_quantizers(np.asarray(sample_queries(l2_index, 5000)), l2_index.params, train_size=5000), tmp_path / "trained")
    with pytest.raises(InvalidInput, match="holds no vectors"):
        measure_retrieval(tmp_path / "trained")


def test_inference_profile_is_measured_on_the_engine(tiny_model):
    profile = measure_inference(str(tiny_model), context=64, batches=(1, 2, 4), repeats=2)
    assert profile.threads >= 1 and profile.device == "cpu"
    assert profile.prefill_seconds(256) > 0 and profile.step_seconds(4) > 0 and profile.embed_s > 0
    with pytest.raises(InvalidInput, match="context"):
        measure_inference(str(tiny_model), context=10)


def test_plan_command_sizes_predicts_and_refuses(tmp_path, l2_index, facts_index):
    save_index(l2_index, tmp_path / "index")
    save_profile(RETRIEVAL, tmp_path / "retrieval.json")
    save_profile(INFERENCE, tmp_path / "inference.json")
    profiles = ["--retrieval-profile", tmp_path / "retrieval.json", "--inference-profile", tmp_path / "inference.json"]
    sized = chameleon("plan", *profiles, "--qps", 3, "--index", tmp_path / "index", "--nprobe", 8, "--json", tmp_path / "plan.json")
    report = json.loads((tmp_path / "plan.json").read_text())
    assert report["workload"]["ntotal"] == l2_index.ntotal and report["deployment"]["replicas"] == 2  # --min-replicas
    assert "bottleneck: inference" in sized.stdout and "cluster scale --compose" in sized.stdout
    given = ["--shards", 2, "--host-cores", 2, "--values", tmp_path / "given.yaml"]
    predicted = chameleon("plan", *profiles, "--qps", 3, "--index", tmp_path / "index", *given)
    assert "host cores" in predicted.stdout and "index:\n  shards: 2" in (tmp_path / "given.yaml").read_text()
    overloaded = chameleon("plan", *profiles, "--qps", 1000, "--index", tmp_path / "index", "--shards", 1)
    assert "past capacity" in overloaded.stdout
    swapped = [profiles[0], profiles[3], profiles[2], profiles[1]]
    swapped = chameleon("plan", *swapped, "--qps", 3, "--index", tmp_path / "index", expect=2)
    assert "takes a retrieval profile" in swapped.stderr
    passages = chameleon("plan", *profiles, "--qps", 3, "--index", facts_index, "--nprobe", 2, "--json", tmp_path / "passages.json")
    assert "bottleneck" in passages.stdout
    assert json.loads((tmp_path / "passages.json").read_text())["workload"]["ntotal"] == read_manifest(facts_index / "index")["ntotal"]
    nothing = chameleon("plan", *profiles, "--qps", 3, expect=2)
    assert "--ntotal" in nothing.stderr
    too_big = chameleon(
        "plan", *profiles, "--qps", 3, "--ntotal", 1e12, "--nlist", 65536, "--code-size", 64, "--node-memory-gib", 1, expect=2
    )
    assert "node memory" in too_big.stderr


def test_the_retrieval_tier_alone_is_sized_with_as_many_coordinators_as_it_needs():
    found = cheapest_plan(BILLION, Target(3000, node_memory_gib=16), RETRIEVAL, None)
    d = found.deployment
    assert d.coordinators > 1 and found.prediction.node_memory_gib <= 16
    assert found.prediction.capacity["coordinator"] >= 3000 / 0.75 and found.prediction.capacity["retrieval nodes"] >= 3000 / 0.75
    assert math.isinf(found.prediction.capacity["inference"])
    fewer = predict(BILLION, Deployment(d.shards, d.replicas, 1, coordinators=d.coordinators - 1), RETRIEVAL, None)
    assert fewer.capacity["coordinator"] < 3000 / 0.75


def test_profiles_measured_by_the_command_line_plan_a_deployment(tmp_path, facts_index, tiny_model):
    measured = chameleon("profile", "retrieval", "--index", facts_index, "--out", tmp_path / "retrieval.json", "--seconds", 0.5)
    assert "searches/s" in measured.stdout and isinstance(load_profile(tmp_path / "retrieval.json"), RetrievalProfile)
    chameleon("profile", "inference", "--model", tiny_model, "--context", 64, "--out", tmp_path / "inference.json")
    assert isinstance(load_profile(tmp_path / "inference.json"), InferenceProfile)
    profiles = ["--retrieval-profile", tmp_path / "retrieval.json", "--inference-profile", tmp_path / "inference.json"]
    planned = chameleon("plan", *profiles, "--qps", 5, "--index", facts_index, "--nprobe", 2, "--passage-tokens", 20)
    assert "bottleneck:" in planned.stdout
    refused = chameleon("profile", "retrieval", "--index", facts_index, "--out", tmp_path / "x.json", "--nprobe", "1,2,3", expect=2)
    assert "two values" in refused.stderr
