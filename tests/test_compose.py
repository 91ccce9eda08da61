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
            "/var/lib/chameleon/data/shards-2",
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
        "coordinator": {"command": ["node", "coordinator", "--index", "/var/lib/chameleon/data/shards-2", "--bind", "tcp://0.0.0.0:6000"]},
        "server": {"command": ["serve", "--index", "/var/lib/chameleon/data/rag", "--coordinator", "tcp://coordinator:6000"]},
    },
}


def deployment(config=CONFIG) -> Deployment:
    return Deployment.of_config(Path("/srv/deploy/compose.yaml"), config)


def test_a_deployment_is_read_from_its_services_commands():
    d = deployment()
    assert (d.project, d.coordinator, d.coordinator_port, d.source_index) == ("demo", "coordinator", 6000, "/var/lib/chameleon/data/rag")
    assert d.base.nshards == 2 and d.base.services == ("retrieval-0", "retrieval-1") and not d.base.generated
    assert d.overlay == Path("/srv/deploy/compose.scale.demo.json")
    assert d.layout(2) is d.base
    three = d.layout(3)
    assert three.generated and three.index == "/var/lib/chameleon/data/shards-3"
    assert three.services == ("retrieval-3-0", "retrieval-3-1", "retrieval-3-2")


def test_replicas_of_the_files_own_layout():
    d = deployment()
    assert overlay(d, {d.base: 3}) == {"services": {"retrieval-0": {"deploy": {"replicas": 3}}, "retrieval-1": {"deploy": {"replicas": 3}}}}


def test_a_new_layout_has_a_job_that_writes_it_and_a_service_per_shard_under_the_same_alias():
    d = deployment()
    services = overlay(d, {d.base: 2, d.layout(3): 1})["services"]
    assert services["retrieval-0"] == {"deploy": {"replicas": 2}}
    job = services["layout-3"]
    assert job["command"] == [
        "index", "reshard", "--index", "/var/lib/chameleon/data/rag", "--shards", "3", "--out", "/var/lib/chameleon/data/shards-3",
    ]  # fmt: skip
    assert job["volumes"] == [{**DATA, "read_only": False}] and job["image"] == "chameleon-retrieval"
    for shard in range(3):
        service = services[f"retrieval-3-{shard}"]
        command = service["command"]
        assert command[command.index("--index") + 1] == "/var/lib/chameleon/data/shards-3"
        assert command[command.index("--shard") + 1] == str(shard)
        assert service["networks"] == {"tier": {"aliases": ["retrieval"]}}
        assert service["volumes"] == [DATA]  # nodes only read
        assert service["deploy"] == {"replicas": 1, "endpoint_mode": "dnsrr"}
        assert list(service["depends_on"]) == ["layout-3"]
    # once the coordinator serves the new layout, the file's own shard services run none
    after = overlay(d, {d.layout(3): 1})["services"]
    assert after["retrieval-0"] == after["retrieval-1"] == {"deploy": {"replicas": 0}}


def test_a_file_that_is_not_an_appliance_deployment_is_refused_by_name():
    no_coordinator = copy.deepcopy(CONFIG)
    del no_coordinator["services"]["coordinator"]
    with pytest.raises(InvalidInput, match="one coordinator service"):
        deployment(no_coordinator)
    gap = copy.deepcopy(CONFIG)
    gap["services"]["retrieval-1"]["command"][5] = "2"
    with pytest.raises(InvalidInput, match=r"serve shards \[0, 2\]"):
        deployment(gap)
    no_shard = copy.deepcopy(CONFIG)
    no_shard["services"]["retrieval-1"]["command"][4:6] = []
    with pytest.raises(InvalidInput, match="retrieval-1: its command has no --shard"):
        deployment(no_shard)
