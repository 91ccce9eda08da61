"""The Compose scaler's reading of a deployment and the overlays it writes (no Docker needed:
``make test-deploy`` runs them against a real deployment)."""

import copy
from pathlib import Path

import pytest

from chameleon.compose import Deployment, overlay
from retriever.errors import InvalidInput

DATA = {"type": "volume", "source": "data", "target": "/var/lib/chameleon/data", "read_only": True, "volume": {}}


def node(shard: int) -> dict:
    return {
        "image": "chameleon-retrieval",
        "command": [
            "node",
            "retrieval",
            "--index",
            "/var/lib/chameleon/data/versions/v1/shards-2",
            "--shard",
            str(shard),
            "--bind",
            "tcp://0.0.0.0:5555",
        ],
        "networks": {"tier": {"aliases": ["retrieval"]}},
        "volumes": [DATA],
        "depends_on": {"index": {"condition": "service_started", "required": True}},
        "restart": "unless-stopped",
        "deploy": {"replicas": 2, "endpoint_mode": "dnsrr"},
    }


# what `docker compose config --format json` prints for deploy/compose.yaml, cut to what matters
CONFIG = {
    "name": "demo",
    "services": {
        "index": {"image": "chameleon-server", "command": ["set -e; chameleon index build ..."]},
        "retrieval-0": node(0),
        "retrieval-1": node(1),
        "coordinator": {
            "command": ["node", "coordinator", "--index", "/var/lib/chameleon/data/current/rag/index", "--bind", "tcp://0.0.0.0:6000"]
        },
        "server": {
            "image": "chameleon-server",
            "command": [
                "serve",
                "--index",
                "/var/lib/chameleon/data/current/rag",
                "--watch-index",
                "5",
                "--coordinator",
                "tcp://coordinator:6000",
            ],
            "volumes": [DATA, {"type": "volume", "source": "cache", "target": "/var/lib/chameleon/cache", "volume": {}}],
            "networks": {"tier": None},
        },
    },
}


def deployment(config=CONFIG) -> Deployment:
    return Deployment.of_config(Path("/srv/deploy/compose.yaml"), config)


def test_a_deployment_is_read_from_its_services_commands():
    d = deployment()
    assert (d.project, d.coordinator, d.coordinator_port, d.server) == ("demo", "coordinator", 6000, "server")
    assert (str(d.versions), str(d.current_link)) == ("/var/lib/chameleon/data/versions", "/var/lib/chameleon/data/current")
    assert (d.base.version, d.base.nshards, d.base.services, d.base.generated) == ("v1", 2, ("retrieval-0", "retrieval-1"), False)
    assert d.overlay == Path("/srv/deploy/compose.scale.demo.json")
    assert d.layout(2, "v1") is d.base
    three = d.layout(3, "v1")
    assert three.generated and three.index == "/var/lib/chameleon/data/versions/v1/shards-3"
    assert three.services == ("retrieval-v1-3-0", "retrieval-v1-3-1", "retrieval-v1-3-2")
    other = d.layout(2, "v2")  # another version: services of its own, even with the file's shard count
    assert other.generated and other.index == "/var/lib/chameleon/data/versions/v2/shards-2" and other.services[0] == "retrieval-v2-2-0"


def test_replicas_of_the_files_own_layout():
    d = deployment()
    assert overlay(d, {d.base: 3}) == {"services": {"retrieval-0": {"deploy": {"replicas": 3}}, "retrieval-1": {"deploy": {"replicas": 3}}}}


def test_a_new_layout_has_a_job_that_writes_it_and_a_service_per_shard_under_the_same_alias():
    d = deployment()
    services = overlay(d, {d.base: 2, d.layout(3, "v1"): 1})["services"]
    assert services["retrieval-0"] == {"deploy": {"replicas": 2}}
    job = services["layout-v1-3"]
    assert job["command"] == [
        "index", "reshard", "--index", "/var/lib/chameleon/data/versions/v1/rag", "--shards", "3",
        "--out", "/var/lib/chameleon/data/versions/v1/shards-3",
    ]  # fmt: skip
    assert job["volumes"] == [{**DATA, "read_only": False}] and job["image"] == "chameleon-retrieval"
    for shard in range(3):
        service = services[f"retrieval-v1-3-{shard}"]
        command = service["command"]
        assert command[command.index("--index") + 1] == "/var/lib/chameleon/data/versions/v1/shards-3"
        assert command[command.index("--shard") + 1] == str(shard)
        assert service["networks"] == {"tier": {"aliases": ["retrieval"]}}
        assert service["volumes"] == [DATA]  # nodes only read
        assert service["deploy"] == {"replicas": 1, "endpoint_mode": "dnsrr"}
        assert list(service["depends_on"]) == ["layout-v1-3"]
    # once the coordinator serves the new layout, the file's own shard services run none
    after = overlay(d, {d.layout(3, "v1"): 1})["services"]
    assert after["retrieval-0"] == after["retrieval-1"] == {"deploy": {"replicas": 0}}


def test_a_new_version_is_written_by_a_job_its_layout_waits_for(tmp_path):
    """``update``'s overlay while both versions run: the job writes v2 with ``chameleon index
    version`` (v1 copied, the host's corpus, mounted read-only, added, documents removed, split as
    served, then made current); v2's layout job waits for it to finish; the job runs the server's
    image, with its volumes."""
    from chameleon.compose import VersionWrite
    from tests.helpers import parse

    d = deployment()
    corpus = tmp_path / "new docs.jsonl"
    corpus.write_text("{}\n")
    write = VersionWrite("v2", "v1", 2, corpus, ("old-1", "old 2"))
    services = overlay(d, {d.base: 2, d.layout(2, "v2"): 2}, write)["services"]
    job = services["version-v2"]
    assert job["image"] == "chameleon-server" and "entrypoint" not in job  # the image's: chameleon
    args = parse(job["command"]).params
    assert (args["name"], str(args["data"]), args["base"], args["add"]) == (
        "v2",
        "/var/lib/chameleon/data",
        "v1",
        "/var/lib/chameleon/update/new docs.jsonl",
    )
    assert (args["remove_docs"], args["shards"]) == (["old-1", "old 2"], [2])
    assert {v["target"]: v.get("read_only") for v in job["volumes"]} == {
        "/var/lib/chameleon/data": False,
        "/var/lib/chameleon/cache": None,
        "/var/lib/chameleon/update/new docs.jsonl": True,
    }
    assert services["layout-v2-2"]["depends_on"] == {"version-v2": {"condition": "service_completed_successfully", "required": True}}
    assert services["retrieval-0"] == {"deploy": {"replicas": 2}} and services["retrieval-v2-2-1"]["deploy"]["replicas"] == 2
    # afterwards: v2's services alone, and no job of the version (it is done)
    after = overlay(d, {d.layout(2, "v2"): 2})["services"]
    assert "version-v2" not in after and after["retrieval-0"] == {"deploy": {"replicas": 0}}
    assert after["layout-v2-2"]["depends_on"] == CONFIG["services"]["retrieval-0"]["depends_on"]


def test_an_update_that_names_no_change_or_a_bad_version_is_refused():
    from chameleon.compose import update

    with pytest.raises(InvalidInput, match="use lowercase letters"):
        update("/nonexistent/compose.yaml", "V2", remove_docs=("a",))
    with pytest.raises(InvalidInput, match="say what the new version changes"):
        update("/nonexistent/compose.yaml", "v2")
    with pytest.raises(InvalidInput, match="no such corpus"):
        update("/nonexistent/compose.yaml", "v2", add="/nonexistent/new.jsonl")


def test_a_file_that_is_not_an_appliance_deployment_is_refused_by_name():
    no_coordinator = copy.deepcopy(CONFIG)
    del no_coordinator["services"]["coordinator"]
    with pytest.raises(InvalidInput, match="one coordinator service"):
        deployment(no_coordinator)
    gap = copy.deepcopy(CONFIG)
    gap["services"]["retrieval-1"]["command"][5] = "2"
    with pytest.raises(InvalidInput, match=r"serve shards \[0, 2\]"):
        deployment(gap)
    unversioned = copy.deepcopy(CONFIG)
    for name in ("retrieval-0", "retrieval-1"):
        unversioned["services"][name]["command"][3] = "/var/lib/chameleon/data/shards-2"
    with pytest.raises(InvalidInput, match=r"needs the layout of a version \(DATA/versions/VERSION/shards-N\)"):
        deployment(unversioned)
    no_shard = copy.deepcopy(CONFIG)
    no_shard["services"]["retrieval-1"]["command"][4:6] = []
    with pytest.raises(InvalidInput, match="retrieval-1: its command has no --shard"):
        deployment(no_shard)
