"""The Helm chart (deploy/helm/chameleon) rendered offline with Helm's own engine
(``helm-python-sdk``), linted, every manifest validated against the Kubernetes API schemas
(``kubernetes-validate``), every command it runs parsed by our own command line, and the
autoscaling rules' PromQL parsed (``promql-parser``). No cluster
runs here: docs/deployment.md says what has run where."""

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import helm_python
import kubernetes_validate
import numpy as np
import promql_parser
import pytest
import yaml

from tests.helpers import assert_same_index, parse

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy" / "helm" / "chameleon"
GPU_FPGA = yaml.safe_load((ROOT / "deploy" / "helm" / "values-gpu-fpga.yaml").read_text())
KUBERNETES = "1.30"  # the oldest release the chart's objects are checked against...
NEWEST = "1.37"  # ... and the newest kubernetes-validate knows
ADAPTER = yaml.safe_load((ROOT / "deploy" / "helm" / "prometheus-adapter-values.yaml").read_text())
LAYOUTS = {
    "default": {},
    "gpu-fpga": GPU_FPGA,
    "three shards": {"index": {"shards": 3}, "retrieval": {"replicas": 1}},
    "autoscaling": {"autoscaling": {"enabled": True}},
    "re-shard": {"index": {"shards": 3, "previous": {"shards": 2}}},
    "new version": {
        "index": {
            "version": "v2",
            "update": {"from": "v1", "add": "/var/lib/chameleon/data/new.jsonl", "removeDocs": ["a", "b c"]},
            "previous": {"version": "v1"},
        }
    },
    "vectors in parts": {"index": {"vectors": {"file": "input/base.npy", "nlist": 16, "m": 4, "parts": 3}}},
    "new vector version": {
        "index": {
            "version": "v2",
            "vectors": {"file": "input/base.npy"},
            "update": {"from": "v1", "add": "input/more.npy", "removeIds": [1, 2]},
            "previous": {"version": "v1"},
        }
    },
}
DATA = "/var/lib/chameleon/data"


def render(values: dict) -> list[dict]:
    chart = helm_python.Chart.load(CHART)
    try:
        rendered = chart.render(values, name="rag", namespace="serving")
    finally:
        chart.close()
    return [doc for text in rendered.values() for doc in yaml.safe_load_all(text) if doc]


def named(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def container(deployment: dict) -> dict:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def test_the_chart_lints_without_warnings():
    for values in LAYOUTS.values():
        report = helm_python.lint(CHART, values, strict=True)
        assert report["errors"] == []
        assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("version", [KUBERNETES, NEWEST])
def test_every_manifest_validates_against_the_kubernetes_schemas(layout, version):
    docs = render(LAYOUTS[layout])
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # prometheus-operator's CRD, checked below
        kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_command_the_chart_runs_is_one_our_command_line_accepts(layout):
    docs = render(LAYOUTS[layout])
    for deployment in named(docs, "Deployment").values():
        parse(container(deployment)["args"])
        probe = container(deployment)["readinessProbe"].get("exec")
        if probe:
            assert probe["command"][0] == "chameleon"
            parse(probe["command"][1:])
    commands = [job_command(job) for job in named(docs, "Job").values()]
    commands = [command[command.index("chameleon") + 1 :] for script in commands for command in script if "chameleon" in command]
    assert ["index", "version"] in [command[:2] for command in commands]  # every Job ends by writing a version
    for command in commands:
        parse(command)


def job_command(job: dict) -> list[list[str]]:
    """What an index Job runs: the words of each step of its shell script, or its one command."""
    spec = container(job)
    if spec.get("command") == ["sh", "-c"]:
        return [shlex.split(step) for step in spec["args"][0].split(";")]
    return [["chameleon", *spec["args"]]]


def test_one_deployment_and_one_disruption_budget_per_shard_behind_one_headless_service():
    docs = render({"index": {"shards": 3}, "retrieval": {"replicas": 2}})
    deployments, budgets = named(docs, "Deployment"), named(docs, "PodDisruptionBudget")
    service = named(docs, "Service")["rag-chameleon-retrieval"]
    assert service["spec"]["clusterIP"] == "None"
    for shard in range(3):
        node = deployments[f"rag-chameleon-retrieval-v1-3-{shard}"]
        args = parse(container(node)["args"]).params
        assert (args["shard"], str(args["index"]), node["spec"]["replicas"]) == (shard, f"{DATA}/versions/v1/shards-3", 2)
        labels = node["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items()  # every node behind the coordinator's DNS name
        budget = budgets[f"rag-chameleon-retrieval-v1-3-{shard}"]["spec"]
        assert budget["minAvailable"] == 1 and budget["selector"]["matchLabels"].items() <= labels.items()
        assert {k: v for k, v in budget["selector"]["matchLabels"].items() if k == "chameleon.io/shard"} == {
            "chameleon.io/shard": str(shard)
        }
    coordinator = parse(container(deployments["rag-chameleon-coordinator"])["args"]).params
    assert coordinator["nodes"] == ["dns://rag-chameleon-retrieval:5555"]
    # the link to the current version: neither a re-shard nor a new version restarts a coordinator or a server
    assert str(coordinator["index"]) == f"{DATA}/current/rag/index"
    (job,) = named(docs, "Job").values()
    assert job_command(job) == [["chameleon", "index", "version", "v1", "--data", ".", "--corpus", "python-docs", "--shards", "3"]]
    assert job["metadata"]["name"] == "rag-chameleon-index-v1-3"  # another layout, another Job (a Job's template is immutable)
    server = parse(container(deployments["rag-chameleon-server"])["args"]).params
    assert server["coordinator"] == "tcp://rag-chameleon-coordinator:6000"
    assert (str(server["index"]), server["watch_index"]) == (f"{DATA}/current/rag", 10)


def served_layouts(docs: list[dict]) -> dict[str, set[int]]:
    """The index directory of each layout the retrieval Deployments serve -> its shards."""
    layouts, selectors = {}, set()
    for name, deployment in named(docs, "Deployment").items():
        if "-retrieval-" in name:
            args = parse(container(deployment)["args"]).params
            layouts.setdefault(str(args["index"]), set()).add(args["shard"])
            selectors.add(tuple(sorted(deployment["spec"]["selector"]["matchLabels"].items())))
    # no pod of one layout's Deployment is taken for another's: their selectors differ
    assert len(selectors) == sum(map(len, layouts.values()))
    return layouts


def test_a_reshard_runs_both_layouts_until_the_next_upgrade_drops_the_old_one():
    during = render({"index": {"shards": 3, "previous": {"shards": 2}}})
    assert served_layouts(during) == {f"{DATA}/versions/v1/shards-3": {0, 1, 2}, f"{DATA}/versions/v1/shards-2": {0, 1}}
    assert [job["metadata"]["name"] for job in named(during, "Job").values()] == ["rag-chameleon-index-v1-3"]  # the old layout exists
    assert served_layouts(render({"index": {"shards": 3}})) == {f"{DATA}/versions/v1/shards-3": {0, 1, 2}}
    assert served_layouts(render({"index": {"shards": 3, "previous": {"shards": 3}}})) == {f"{DATA}/versions/v1/shards-3": {0, 1, 2}}


def test_a_new_version_is_written_beside_the_old_one_and_served_once_its_nodes_run():
    """The first upgrade of a version change: the new version's Job writes it from the old one
    (`chameleon index version`, run below); both versions' nodes run. The
    second upgrade leaves the new version's alone. Neither changes the coordinator or the server."""
    update = {"from": "v1", "add": f"{DATA}/new docs.jsonl", "removeDocs": ["old-1", "old 2"]}
    during = render({"index": {"version": "v2", "update": update, "previous": {"version": "v1"}}})
    assert served_layouts(during) == {f"{DATA}/versions/v2/shards-2": {0, 1}, f"{DATA}/versions/v1/shards-2": {0, 1}}
    (job,) = named(during, "Job").values()
    assert job["metadata"]["name"] == "rag-chameleon-index-v2-2"
    assert job_command(job) == [
        ["chameleon", "index", "version", "v2", "--data", ".", "--from", "v1", "--add", f"{DATA}/new docs.jsonl"]
        + ["--remove-doc", "old-1", "--remove-doc", "old 2", "--shards", "2"]
    ]
    after = render({"index": {"version": "v2"}})
    assert served_layouts(after) == {f"{DATA}/versions/v2/shards-2": {0, 1}}
    unchanged = ("rag-chameleon-coordinator", "rag-chameleon-server")
    assert all(named(during, "Deployment")[n] == named(after, "Deployment")[n] == named(render({}), "Deployment")[n] for n in unchanged)
    budgets = named(during, "PodDisruptionBudget")
    assert {n.rsplit("-", 2)[0] for n in budgets} == {"rag-chameleon-retrieval-v1", "rag-chameleon-retrieval-v2"}


@pytest.mark.parametrize("version", ["V2", "v_2", "-v2", "a-very-long-version-name"])
def test_a_version_name_that_cannot_name_objects_is_refused(version):
    with pytest.raises(Exception, match="use lowercase letters, digits and '-'"):
        render({"index": {"version": version}})
    with pytest.raises(Exception, match="use lowercase letters, digits and '-'"):
        render({"index": {"version": "v2", "update": {"from": version}}})


def test_probes_ask_the_processes_own_readiness():
    deployments = named(render({}), "Deployment")
    server = container(deployments["rag-chameleon-server"])
    assert server["readinessProbe"]["httpGet"]["path"] == "/readyz" and server["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for name in ("rag-chameleon-retrieval-v1-2-0", "rag-chameleon-coordinator"):
        probe = container(deployments[name])["readinessProbe"]["exec"]["command"]
        assert probe[:3] == ["chameleon", "node", "probe"]


def test_gpu_and_fpga_hosts_get_their_devices_keys_and_metrics():
    docs = render(GPU_FPGA)
    deployments = named(docs, "Deployment")
    server = container(deployments["rag-chameleon-server"])
    assert server["resources"]["limits"] == {"nvidia.com/gpu": 1}
    assert deployments["rag-chameleon-server"]["spec"]["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert server["env"] == [{"name": "CHAMELEON_API_KEYS", "valueFrom": {"secretKeyRef": {"name": "chameleon-api-keys", "key": "keys"}}}]
    for shard in range(4):
        node = deployments[f"rag-chameleon-retrieval-v1-4-{shard}"]
        args = parse(container(node)["args"]).params
        assert (args["engine"], args["fpga_mode"], str(args["keys"])) == ("fpga", "hw", "/etc/chameleon/keys")
        assert container(node)["resources"]["limits"] == {"xilinx.com/fpga-xilinx_u280_gen3x16_xdma_base_1-1": 1}
        assert node["spec"]["template"]["spec"]["nodeSelector"] == {"chameleon.io/accelerator": "alveo-u280"}
        (keys,) = [v for v in node["spec"]["template"]["spec"]["volumes"] if v["name"] == "keys"]
        # the directory `chameleon keys gen` writes, from a Secret made of its files
        assert {item["path"] for item in keys["secret"]["items"]} == {"server.key_secret", "client.key_secret", "authorized/client.key"}
    (monitor,) = named(docs, "ServiceMonitor").values()
    service = named(docs, "Service")["rag-chameleon-server"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"] == [{"port": "http", "path": "/metrics"}]
    assert {p["name"] for p in service["spec"]["ports"]} == {"http"}
    assert named(docs, "PersistentVolumeClaim")["rag-chameleon-index"]["spec"]["accessModes"] == ["ReadWriteMany"]


def test_autoscalers_take_over_the_replica_counts_on_metrics_the_adapter_serves():
    docs = render({"autoscaling": {"enabled": True}, "index": {"shards": 3}})
    deployments, autoscalers = named(docs, "Deployment"), named(docs, "HorizontalPodAutoscaler")
    served = {rule["name"]["as"] for rules in ADAPTER["rules"].values() if isinstance(rules, list) for rule in rules}
    scaled = {a["spec"]["scaleTargetRef"]["name"]: a["spec"] for a in autoscalers.values()}
    assert set(scaled) == {"rag-chameleon-server", *(f"rag-chameleon-retrieval-v1-3-{shard}" for shard in range(3))}
    for name, spec in scaled.items():
        assert "replicas" not in deployments[name]["spec"]  # the autoscaler's to set
        (metric,) = spec["metrics"]
        asked = metric[metric["type"].lower()]["metric"]
        assert asked["name"] in served
        if name.startswith("rag-chameleon-retrieval-"):
            assert asked["selector"]["matchLabels"] == {"shard": name.rsplit("-", 1)[1]}
    assert "replicas" in deployments["rag-chameleon-coordinator"]["spec"]


def test_the_series_the_autoscalers_use_are_on_a_running_servers_metrics(tmp_path, facts_index, tiny_model):
    """What the adapter's rules query (deploy/helm/prometheus-adapter-values.yaml) exists on the
    /metrics of a server with a retrieval tier, with the labels the rules group by."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    from tests.helpers import start_server

    server = start_server(tmp_path, "--index", facts_index, "--model", tiny_model, "--shards", 2)
    try:
        with urllib.request.urlopen(server.url + "/metrics", timeout=30) as response:
            samples = [s for family in text_string_to_metric_families(response.read().decode()) for s in family.samples]
    finally:
        assert server.stop() == 0
    for kind, rule in adapter_rules():
        series, grouped = rule_query(rule)
        found = [s for s in samples if s.name == series]
        assert found, f"{kind} rule: no {series} on /metrics"
        assert all(grouped <= s.labels.keys() for s in found), (series, grouped)
    by_shard = {s.labels["shard"] for s in samples if s.name == "chameleon_shard_node_inflight"}
    assert by_shard == {"0", "1"}


def adapter_rules() -> list[tuple[str, dict]]:
    return [(kind, rule) for kind, rules in ADAPTER["rules"].items() if isinstance(rules, list) for rule in rules]


def rule_query(rule: dict) -> tuple[str, set[str]]:
    """A Prometheus adapter rule's query, its template filled in as the adapter fills it, parsed
    by a PromQL parser: the series it reads and the labels of ours it groups by."""
    series = promql_parser.parse(rule["seriesQuery"])
    assert isinstance(series, promql_parser.VectorSelector), rule["seriesQuery"]
    filled = (
        rule["metricsQuery"]
        .replace("<<.Series>>", series.name)
        .replace("<<.LabelMatchers>>", 'namespace="serving"')
        .replace("<<.GroupBy>>", ", ".join(rule["resources"]["overrides"]))
    )
    expression, grouped = promql_parser.parse(filled), set()  # a ValueError names what does not parse
    while isinstance(expression, promql_parser.AggregateExpr):
        grouped |= set(expression.modifier.labels)
        expression = expression.expr
    assert isinstance(expression, promql_parser.VectorSelector) and expression.name == series.name, filled
    return series.name, grouped - set(rule["resources"]["overrides"])


def test_every_adapter_rule_is_promql_over_one_of_our_series():
    assert {kind for kind, _ in adapter_rules()} == {"custom", "external"}
    for _, rule in adapter_rules():
        series, grouped = rule_query(rule)
        assert series.startswith("chameleon_")
    with pytest.raises(ValueError, match="parenthesis"):
        rule_query({"seriesQuery": "chameleon_x", "metricsQuery": "sum by (shard (<<.Series>>)", "resources": {"overrides": {}}})


def test_the_planners_values_size_the_charts_tiers(tmp_path):
    from chameleon.plan.profiles import save_profile
    from tests.helpers import chameleon
    from tests.test_plan import INFERENCE, RETRIEVAL

    save_profile(RETRIEVAL, tmp_path / "retrieval.json")
    save_profile(INFERENCE, tmp_path / "inference.json")
    profiles = ["--retrieval-profile", tmp_path / "retrieval.json", "--inference-profile", tmp_path / "inference.json"]
    database = ["--ntotal", 1e9, "--nlist", 65536, "--code-size", 16, "--node-memory-gib", 8]
    chameleon(
        "plan", *profiles, *database, "--qps", 40, "--ttft-p99", 2, "--values", tmp_path / "values.yaml", "--json", tmp_path / "plan.json"
    )
    planned = json.loads((tmp_path / "plan.json").read_text())["deployment"]
    assert planned["shards"] > 1 and planned["inference_replicas"] > 1
    docs = render(yaml.safe_load((tmp_path / "values.yaml").read_text()))
    deployments = named(docs, "Deployment")
    shards = planned["shards"]
    nodes = {n: d for n, d in deployments.items() if n.startswith(f"rag-chameleon-retrieval-v1-{shards}-")}
    assert len(nodes) == shards and {d["spec"]["replicas"] for d in nodes.values()} == {planned["replicas"]}
    assert deployments["rag-chameleon-server"]["spec"]["replicas"] == planned["inference_replicas"]
    for doc in docs:
        kubernetes_validate.validate(doc, NEWEST, strict=True)


def start_job(job: dict, data: Path, completion: int | None = None) -> subprocess.Popen:
    """An index Job's pod as the cluster starts it: its command, in the index volume (``data``),
    with the `chameleon` installed here (and ``completion``, the pod's index in an Indexed Job)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    if completion is not None:
        env["JOB_COMPLETION_INDEX"] = str(completion)
    spec = container(job)
    command = [*spec["command"], *spec["args"]] if "command" in spec else ["chameleon", *spec["args"]]
    return subprocess.Popen(command, cwd=data, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(pod: subprocess.Popen) -> tuple[int, str]:
    output, _ = pod.communicate(timeout=600)
    return pod.returncode, output


def test_a_vector_index_is_built_in_parts_by_jobs_that_start_in_any_order(tmp_path):
    """Vector mode's three Jobs run as their pods would (all at once, the join first): each step
    waits for the one before it; the join writes the version split as the nodes serve it, equal
    array for array to a build in one process, makes it current and removes the parts. A
    re-shard's Job then splits the version again, the parts gone."""
    from retriever.build import build_index
    from retriever.index import IVFPQParams, load_index

    base = np.random.default_rng(7).standard_normal((3000, 16)).astype(np.float32)
    (tmp_path / "input").mkdir()
    np.save(tmp_path / "input" / "base.npy", base)
    vectors = {"file": "input/base.npy", "nlist": 16, "m": 4, "parts": 3, "waitSeconds": 300}
    docs = render({"index": {"vectors": vectors}})
    jobs = named(docs, "Job")
    assert list(jobs) == ["rag-chameleon-index-v1-train", "rag-chameleon-index-v1-encode", "rag-chameleon-index-v1-2"]
    encode = jobs["rag-chameleon-index-v1-encode"]["spec"]
    assert (encode["completionMode"], encode["completions"], encode["parallelism"]) == ("Indexed", 3, 3)
    assert {container(job)["image"] for job in jobs.values()} == {"chameleon-retrieval:latest"}  # no embedder needed
    throttled = named(render({"index": {"vectors": {**vectors, "parallelism": 2}}}), "Job")["rag-chameleon-index-v1-encode"]["spec"]
    assert (throttled["completions"], throttled["parallelism"]) == (3, 2)
    deployments = named(docs, "Deployment")
    assert "rag-chameleon-server" not in deployments  # a vector index has no passages to serve
    assert str(parse(container(deployments["rag-chameleon-coordinator"])["args"]).params["index"]) == f"{DATA}/current/vectors"
    pods = [start_job(jobs["rag-chameleon-index-v1-2"], tmp_path)]
    pods += [start_job(jobs["rag-chameleon-index-v1-encode"], tmp_path, part) for part in range(3)]
    pods.append(start_job(jobs["rag-chameleon-index-v1-train"], tmp_path))
    for pod in pods:
        code, output = finish(pod)
        assert code == 0, output
    assert os.readlink(tmp_path / "current") == "versions/v1"
    assert sorted(p.name for p in (tmp_path / "versions" / "v1").iterdir()) == ["shards-2", "vectors"]
    assert_same_index(load_index(tmp_path / "current" / "vectors", verify=True), build_index(base, IVFPQParams("l2", 16, 16, 4), nshards=2))
    assert (tmp_path / "versions" / "v1" / "shards-2").resolve() == (tmp_path / "versions" / "v1" / "vectors").resolve()  # no second copy
    reshard = named(render({"index": {"vectors": vectors, "shards": 3, "previous": {"shards": 2}}}), "Job")["rag-chameleon-index-v1-3"]
    code, output = finish(start_job(reshard, tmp_path))
    assert code == 0, output
    assert load_index(tmp_path / "versions" / "v1" / "shards-3").nshards == 3


def test_a_new_versions_job_writes_it_and_a_failing_one_leaves_the_served_version(tmp_path, facts_index):
    """The passage index's update Job, run as its pod would on a volume that serves v1: v2 is v1
    without a document, split as served, and current. An update that cannot be made (a document
    that is not there) fails with the reason, writes nothing, and leaves `current` as it was."""
    from chameleon.rag.corpus import RagIndex

    shutil.copytree(facts_index, tmp_path / "versions" / "v1" / "rag")
    (tmp_path / "current").symlink_to("versions/v1")
    (job,) = named(render({"index": {"version": "v2", "update": {"from": "v1", "removeDocs": ["fact-3"]}}}), "Job").values()
    code, output = finish(start_job(job, tmp_path))
    assert code == 0, output
    assert os.readlink(tmp_path / "current") == "versions/v2"
    served = RagIndex(tmp_path / "current" / "rag")
    assert served.meta["documents"] == 299 and "fact-3" not in {p.doc_id for p in served.passages}
    assert RagIndex(tmp_path / "versions" / "v1" / "rag").meta["documents"] == 300
    assert (tmp_path / "versions" / "v2" / "shards-2" / "manifest.json").is_file()
    (failing,) = named(render({"index": {"version": "v3", "update": {"from": "v2", "removeDocs": ["fact-3"]}}}), "Job").values()
    code, output = finish(start_job(failing, tmp_path))
    assert code != 0 and "not in" in output and "'fact-3'" in output
    assert os.readlink(tmp_path / "current") == "versions/v2"
    assert [p.name for p in (tmp_path / "versions" / "v3").iterdir()] == []  # no half version left


def test_vector_mode_refuses_autoscaling_it_has_no_metrics_for():
    with pytest.raises(Exception, match="a vector index runs no server: set retrieval.replicas"):
        render({"index": {"vectors": {"file": "input/base.npy"}}, "autoscaling": {"enabled": True}})
