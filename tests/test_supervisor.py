"""chameleon.supervisor on small real processes: restarts and their causes, the backoff, giving up
on a process that fails at every start, missed heartbeats, and nothing restarted once stopped.
(`tests/test_server.py` kills the tier processes of a real `chameleon serve`.)"""

import subprocess
import sys
import time
from pathlib import Path

from chameleon.supervisor import Child, RestartPolicy, Supervisor
from tests.helpers import wait_for

FAST = RestartPolicy(first_delay_s=0.05, max_delay_s=0.2, healthy_after_s=60, max_failures=3, window_s=60, silent_limit_s=0.6)

# Counts its starts in READY.starts; "crash" exits at start with a last word, else it says it is
# ready (its start number as its endpoint) and sleeps.
CHILD = """
import json, os, pathlib, sys, time
ready, mode = pathlib.Path(sys.argv[1]), sys.argv[2]
starts = ready.with_suffix(".starts")
n = int(starts.read_text()) + 1 if starts.exists() else 1
starts.write_text(str(n))
if mode == "crash":
    print("cannot load shard-001/codes.npy: truncated", flush=True)
    sys.exit(2)
ready.write_text(json.dumps({"endpoint": f"tcp://127.0.0.1:{n}", "pid": os.getpid()}))
time.sleep(60)
"""


def child(tmp_path: Path, name: str, mode: str = "serve") -> Child:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    ready = tmp_path / f"{name}.json"
    command = [sys.executable, str(script), str(ready), mode]
    c = Child(name, "retrieval", 0, command, tmp_path / f"{name}.log", ready)
    c.process = spawn(c)
    return c


def spawn(c: Child) -> subprocess.Popen:
    with open(c.log, "ab") as log:
        return subprocess.Popen(c.command, stdout=log, stderr=subprocess.STDOUT)


def starts(c: Child) -> int:
    path = c.ready_file.with_suffix(".starts")
    return int(path.read_text()) if path.exists() else 0


def test_a_child_that_dies_is_restarted_and_each_restart_is_recorded(tmp_path):
    changes = []
    c = child(tmp_path, "node-0")
    supervisor = Supervisor([c], spawn, changed=lambda ch: changes.append((ch.state, ch.cause)), policy=FAST).start()
    try:
        wait_for(lambda: c.state == "running", 30, interval=0.02)
        assert c.ready["endpoint"] == "tcp://127.0.0.1:1"
        first = c.process
        first.kill()
        wait_for(lambda: c.state == "running" and c.process is not first, 30, interval=0.02)
        assert c.restarts == 1 and c.cause == "killed by SIGKILL" and c.ready["endpoint"] == "tcp://127.0.0.1:2"
        c.process.terminate()
        wait_for(lambda: c.restarts == 2 and c.state == "running", 30, interval=0.02)
        assert c.cause == "killed by SIGTERM"
        assert ("waiting", "killed by SIGKILL") in changes and changes[-1] == ("running", "killed by SIGTERM")
        assert supervisor.snapshot() == [
            {"name": "node-0", "tier": "retrieval", "shard": 0, "state": "running", "restarts": 2, "cause": "killed by SIGTERM"}
        ]
        assert supervisor.failed() == []
    finally:
        supervisor.stop()
        c.process.kill()


def test_a_child_that_fails_at_every_start_is_given_up_with_its_last_words(tmp_path):
    healthy, broken = child(tmp_path, "node-0"), child(tmp_path, "node-1", mode="crash")
    supervisor = Supervisor([healthy, broken], spawn, policy=FAST).start()
    try:
        wait_for(lambda: broken.state == "failed", 30, interval=0.02)
        assert starts(broken) == FAST.max_failures  # the first start and two restarts, then no more
        assert broken.restarts == FAST.max_failures - 1
        (reason,) = supervisor.failed()
        assert reason.startswith("node-1 failed: exited with status 2 while starting, 3 times in 60 s")
        assert reason.endswith("last words: cannot load shard-001/codes.npy: truncated")
        time.sleep(FAST.max_delay_s * 3)
        assert starts(broken) == FAST.max_failures and healthy.state == "running" and healthy.restarts == 0
    finally:
        supervisor.stop()
        healthy.process.kill()


def test_the_delay_doubles_up_to_its_cap(tmp_path):
    c = child(tmp_path, "node-0", mode="crash")
    policy = RestartPolicy(first_delay_s=0.05, max_delay_s=0.2, max_failures=10, window_s=60)
    delays = []
    supervisor = Supervisor([c], spawn, changed=lambda ch: delays.append(ch._delay) if ch.state == "waiting" else None, policy=policy)
    supervisor.start()
    try:
        wait_for(lambda: len(delays) >= 5, 30, interval=0.02)
    finally:
        supervisor.stop()
    # the delay recorded after each failure is the next one's: 0.05 went, then 0.1, 0.2, 0.2...
    assert delays[:5] == [0.1, 0.2, 0.2, 0.2, 0.2]


def test_a_child_the_tier_does_not_hear_is_killed_and_restarted(tmp_path):
    c = child(tmp_path, "node-0")
    deaf = {"node-0"}
    supervisor = Supervisor([c], spawn, unheard=lambda: set(deaf), policy=FAST).start()
    try:
        wait_for(lambda: c.restarts == 1, 30, interval=0.02)
        assert c.cause.startswith("missed heartbeats for")
        deaf.clear()  # heard again: left alone
        wait_for(lambda: c.state == "running", 30, interval=0.02)
        time.sleep(FAST.silent_limit_s * 3)
        assert c.restarts == 1 and c.state == "running"
    finally:
        supervisor.stop()
        c.process.kill()


def test_nothing_is_restarted_once_stopped(tmp_path):
    c = child(tmp_path, "node-0")
    supervisor = Supervisor([c], spawn, policy=FAST).start()
    wait_for(lambda: c.state == "running", 30, interval=0.02)
    supervisor.stop()
    c.process.kill()
    c.process.wait()
    time.sleep(FAST.max_delay_s * 3)
    assert starts(c) == 1 and c.restarts == 0
