"""The Helm chart (deploy/helm/chameleon) rendered offline with Helm's own engine
(``helm-python-sdk``), linted, every manifest validated against the Kubernetes API schemas
(``kubernetes-validate``), every command it runs parsed by our own command line, and the
autoscaling rules' PromQL parsed (``promql-parser``). No cluster
runs here: docs/deployment.md says what has run where."""

import json
import shlex
from pathlib import Path

import helm_python
import kubernetes_validate
import promql_parser
import pytest
import yaml
from typer.main import get_command

from chameleon.cli import app

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


def parse(args: list[str]):
    """``args`` parsed by `chameleon`'s own command line, the context of the command they name (an
    unknown command or option, or a bad value, raises)."""
    command, context, name = get_command(app), None, "chameleon"
    while hasattr(command, "get_command"):  # a group: the chart passes it no options, only a command's name
        context = command.make_context(name, list(args), parent=context)
        name, args = args[0], args[1:]
        command = command.get_command(context, name)
        assert command is not None, f"`chameleon` has no command {name}"
    return command.make_context(name, list(args), parent=context)


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
    (job,) = named(docs, "Job").values()
    commands = [words[words.index("chameleon") + 1 :] for words in job_steps(job) if "chameleon" in words]
    assert len(commands) >= 3  # build or update, verify, reshard
    for command in commands:
        parse(command)


def job_steps(job: dict) -> list[list[str]]:
    """The words of each step of the index Job's shell script."""
    return [shlex.split(step) for step in container(job)["args"][0].split(";")]


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
    assert ["chameleon", "index", "reshard", "--index", "versions/v1/rag", "--shards", "3", "--out", "versions/v1/shards-3"] in job_steps(
        job
    )
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
    """The first upgrade of a version change: the new version's Job copies the old one, adds and
    removes documents, checks it, splits it and moves `current`; both versions' nodes run. The
    second upgrade leaves the new version's alone. Neither changes the coordinator or the server."""
    update = {"from": "v1", "add": f"{DATA}/new docs.jsonl", "removeDocs": ["old-1", "old 2"]}
    during = render({"index": {"version": "v2", "update": update, "previous": {"version": "v1"}}})
    assert served_layouts(during) == {f"{DATA}/versions/v2/shards-2": {0, 1}, f"{DATA}/versions/v1/shards-2": {0, 1}}
    (job,) = named(during, "Job").values()
    assert job["metadata"]["name"] == "rag-chameleon-index-v2-2"
    steps = job_steps(job)
    order = [
        ["cp", "-a", "versions/v1/rag", "versions/v2/rag.partial"],
        ["chameleon", "index", "add", "--index", "versions/v2/rag.partial", "--corpus", f"{DATA}/new docs.jsonl"],
        ["chameleon", "index", "remove", "--index", "versions/v2/rag.partial", "--doc-id", "old-1", "--doc-id", "old 2"],
        ["mv", "versions/v2/rag.partial", "versions/v2/rag"],
        ["chameleon", "index", "info", "versions/v2/rag/index", "--verify"],
        ["chameleon", "index", "reshard", "--index", "versions/v2/rag", "--shards", "2", "--out", "versions/v2/shards-2"],
        ["ln", "-sfn", "versions/v2", "current.new"],
        ["mv", "-T", "current.new", "current"],  # a rename: the servers never see the link missing
    ]
    found = [step[-len(expected) :] for step in steps for expected in order if step[-len(expected) :] == expected]
    assert found == order
    assert steps[0] == ["set", "-e"] and ["if", "!", "test", "-f", "versions/v2/rag/rag.json"] in [s[:5] for s in steps]
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
