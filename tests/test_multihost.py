"""The retrieval tier across hosts: the coordinator, each retrieval node and the searching client
each in a Linux network namespace of its own, with its own address, joined by veth pairs to a
bridge in a switch namespace. The coordinator finds the nodes by name (``dns://retrieval:5555``,
the name resolved through that host's own /etc/hosts, as a Compose service or a Kubernetes
headless Service would resolve), and the test changes what the name lists, kills processes and
cuts links while a bounded load searches. Traffic stays between the namespaces the test made.

Needs root and iproute2 (``ip netns``); skipped elsewhere.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from retriever.index import save_index
from tests.helpers import wait_for

PORT, COORDINATOR_PORT = 5555, 6000
TIMEOUT = 2.0  # the coordinator's default: a node starved of CPU on a busy 2-core machine still answers within it
SUBNET = "10.211.0"


def _ip(*args) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


class Lab:
    """Hosts (network namespaces) on one bridge; ``hosts[name]`` is the host's address."""

    def __init__(self):
        self.tag = uuid.uuid4().hex[:6]
        self.switch = f"chsw{self.tag}"
        self.hosts: dict[str, str] = {}
        self.processes: list[subprocess.Popen] = []
        _ip("netns", "add", self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")

    def namespace(self, host: str) -> str:
        return f"ch{host}{self.tag}"

    def add_host(self, host: str) -> str:
        address = f"{SUBNET}.{len(self.hosts) + 2}"
        ns, inside, outside = self.namespace(host), f"h{len(self.hosts)}{self.tag}", f"s{len(self.hosts)}{self.tag}"
        _ip("netns", "add", ns)
        _ip("link", "add", inside, "type", "veth", "peer", "name", outside)
        _ip("link", "set", inside, "netns", ns)
        _ip("link", "set", outside, "netns", self.switch)
        _ip("-n", self.switch, "link", "set", outside, "master", "br0", "up")
        _ip("-n", ns, "link", "set", inside, "name", "eth0")
        _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        self.hosts[host] = address
        return address

    def set_link(self, host: str, up: bool) -> None:
        _ip("-n", self.namespace(host), "link", "set", "eth0", "up" if up else "down")

    def names(self, host: str, names: dict[str, list[str]]) -> None:
        """What ``host`` resolves each name to (its /etc/hosts, rewritten in place: a running
        process keeps reading the file it was given)."""
        lines = ["127.0.0.1 localhost", *(f"{address} {name}" for name, addresses in names.items() for address in addresses)]
        path = Path("/etc/netns") / self.namespace(host) / "hosts"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n")

    def run(self, host: str, *command, **options) -> subprocess.Popen:
        process = subprocess.Popen(["ip", "netns", "exec", self.namespace(host), *map(str, command)], start_new_session=True, **options)
        self.processes.append(process)
        return process

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.wait()
        for host in self.hosts:
            subprocess.run(["ip", "netns", "del", self.namespace(host)], capture_output=True)
            shutil.rmtree(Path("/etc/netns") / self.namespace(host), ignore_errors=True)
        subprocess.run(["ip", "netns", "del", self.switch], capture_output=True)


@pytest.fixture
def lab():
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 for network namespaces")
    try:
        lab = Lab()
    except subprocess.CalledProcessError as e:
        pytest.skip(f"cannot make network namespaces here: {e.stderr.decode().strip()}")
    try:
        yield lab
    finally:
        lab.close()


def chameleon(*args) -> list:
    return [sys.executable, "-m", "chameleon", *args]


def test_nodes_on_other_hosts_join_leave_fail_and_return_while_searches_run(lab, tmp_path, l2_index, small_data):
    index_dir = save_index(l2_index.resharded(2), tmp_path / "index")
    for host in ("coordinator", "client", "a", "b", "c", "d"):
        lab.add_host(host)
    shard_of = {"a": 0, "b": 1, "c": 0, "d": 1}
    ready_dir = tmp_path / "ready"
    ready_dir.mkdir()
    nodes: dict[str, subprocess.Popen] = {}

    def behind_the_name(*hosts: str) -> None:
        """The hosts the coordinator's host resolves ``retrieval`` to."""
        lab.names("coordinator", {"retrieval": [lab.hosts[h] for h in hosts]})

    def start_node(host: str) -> None:
        ready = ready_dir / f"{host}.json"
        ready.unlink(missing_ok=True)
        command = chameleon("node", "retrieval", "--index", index_dir, "--shard", shard_of[host], "--threads", "1")
        nodes[host] = lab.run(host, *command, "--bind", f"tcp://{lab.hosts[host]}:{PORT}", "--ready-file", ready)
        wait_for(ready.is_file, seconds=60, what=f"the node on host {host}")

    def info() -> dict:
        probe = lab.run("client", *chameleon("node", "probe", coordinator_endpoint), stdout=subprocess.PIPE)
        return json.loads(probe.communicate(timeout=30)[0])

    def alive() -> set[str]:
        by_address = {address: host for host, address in lab.hosts.items()}
        return {by_address[n["endpoint"].split("//")[1].split(":")[0]] for n in info()["nodes"] if n["alive"]}

    def answered(host: str) -> int:
        return sum(n["answered"] for n in info()["nodes"] if f"//{lab.hosts[host]}:" in n["endpoint"])

    # two hosts, one per shard; the coordinator resolves the name on its own host
    behind_the_name("a", "b")
    start_node("a")
    start_node("b")
    coordinator_endpoint = f"tcp://{lab.hosts['coordinator']}:{COORDINATOR_PORT}"
    command = chameleon("node", "coordinator", "--index", index_dir, "--nodes", f"dns://retrieval:{PORT}", "--timeout", TIMEOUT)
    lab.run("coordinator", *command, "--bind", coordinator_endpoint, "--ready-file", tmp_path / "coordinator.json")
    wait_for((tmp_path / "coordinator.json").is_file, seconds=60, what="the coordinator")
    wait_for(lambda: alive() == {"a", "b"}, seconds=60, what="both nodes in rotation")

    queries = tmp_path / "queries.npy"
    np.save(queries, small_data.queries)
    load = lab.run("client", sys.executable, "-m", "tests.load", coordinator_endpoint, index_dir, queries, tmp_path / "load.json",
                   "--stop-file", tmp_path / "stop", "--seconds", "240")  # fmt: skip
    wait_for(lambda: answered("a") > 10, seconds=60, what="searches through the tier")

    # replicas 2: a new host per shard joins once the name lists it, and takes searches within seconds
    start_node("c")
    start_node("d")
    behind_the_name("a", "b", "c", "d")
    joined = time.monotonic()
    wait_for(lambda: answered("c") > 0 and answered("d") > 0, seconds=20, what="the new hosts' first searches")
    join_seconds = time.monotonic() - joined

    # replicas 2: a host's processes SIGKILLed and another host's link cut: no search fails or is partial
    nodes["c"].kill()
    lab.set_link("d", up=False)
    wait_for(lambda: alive() == {"a", "b"}, seconds=60, what="the dead hosts out of rotation")
    time.sleep(2 * TIMEOUT)
    # ... and both come back
    start_node("c")
    lab.set_link("d", up=True)
    wait_for(lambda: alive() == {"a", "b", "c", "d"}, seconds=60, what="the hosts back in rotation")

    # a host stopped by SIGTERM (drained), then taken off the name (Compose's way), and another
    # taken off the name, then stopped (Kubernetes' way): still none fails
    nodes["c"].send_signal(signal.SIGTERM)
    assert nodes["c"].wait(timeout=30) == 0
    behind_the_name("a", "b", "d")
    behind_the_name("a", "b")
    time.sleep(2.0)
    nodes["d"].send_signal(signal.SIGTERM)
    assert nodes["d"].wait(timeout=30) == 0
    wait_for(
        lambda: {n["endpoint"] for n in info()["nodes"]} == {f"tcp://{lab.hosts[h]}:{PORT}" for h in "ab"}, seconds=60, what="c and d gone"
    )
    whole_until = time.time()

    # replicas 1: a SIGKILLed host and a cut link make answers partial, within the timeout, until the host returns
    outages = []
    for host, stop, back in [
        ("a", lambda: nodes["a"].kill(), lambda: start_node("a")),
        ("b", lambda: lab.set_link("b", up=False), lambda: lab.set_link("b", up=True)),
    ]:
        started = time.time()
        stop()
        time.sleep(3 * TIMEOUT)
        back()
        wait_for(lambda: alive() == {"a", "b"}, seconds=60, what=f"host {host} back in rotation")
        outages.append((shard_of[host], started, time.time()))
        time.sleep(1.0)

    (tmp_path / "stop").touch()
    assert load.wait(timeout=60) == 0
    summary = json.loads((tmp_path / "load.json").read_text())
    print(f"{summary['searches']} searches, {summary['whole']} whole; new hosts searched within {join_seconds:.1f} s")
    assert summary["failed"] == [] and summary["wrong"] == []
    # a search is in an outage when the time it was in flight (from ``at``, for ``seconds``) overlaps it
    early = [(round(at - whole_until, 2), missing) for at, missing, seconds in summary["partial"] if at + seconds < whole_until]
    assert early == [], f"partial answers while a replica remained (seconds before the one-replica phase, missing shards): {early}"
    for shard, started, ended in outages:
        during = [(missing, seconds) for at, missing, seconds in summary["partial"] if at <= ended and at + seconds >= started]
        assert during, f"no partial answer while shard {shard} was down"
        assert all(missing == [shard] and seconds < TIMEOUT + 1.0 for missing, seconds in during), during
    # every partial answer came during an outage: the tier was whole again once the host returned
    assert all(any(at <= ended and at + seconds >= started for _, started, ended in outages) for at, _, seconds in summary["partial"])
