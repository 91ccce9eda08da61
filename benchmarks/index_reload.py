"""Changing a served index: ``POST /admin/reload`` vs restarting the server, under a search load.

``chameleon serve`` (built-in model, 2 retrieval shards) serves a copy of the built-in python-docs
passage index while a client sends ``/v1/search`` requests one after another. Documents are added
with ``chameleon index add`` and the server is told to reload; later the peer, a restart (SIGTERM,
then the same command again), serves the same change. Reports for each: how long searches were
not answered, how many failed, and search latency around the change.

    python benchmarks/index_reload.py [--seconds 10]
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from chameleon.rag.corpus import builtin_rag_index
from chameleon.rag.embedder import Embedder
from chameleon.server.launch import spawn

NEW_DOCUMENTS = 20


def start(index: Path, work: Path) -> tuple[subprocess.Popen, str]:
    process, ready = spawn(work, "--index", index, "--shards", 2)
    return process, ready["url"]


def post(url: str, body: dict, timeout: float = 600) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


class SearchLoad:
    """Searches one after another on a thread: (start time, seconds, answered) of each."""

    def __init__(self, url: str):
        self.url, self.log, self._stop = url, [], threading.Event()
        self._thread = threading.Thread(target=self._run)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                post(self.url + "/v1/search", {"query": "How do I read a file line by line?", "k": 4}, timeout=30)
                answered = True
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                answered = False
                time.sleep(0.01)
            self.log.append((started, time.monotonic() - started, answered))

    def stop(self) -> np.ndarray:
        self._stop.set()
        self._thread.join()
        return np.array(self.log)


def report(name: str, log: np.ndarray, began: float, ended: float) -> float:
    """Print the searches around a change made between ``began`` and ``ended``; returns the longest
    time without an answer."""
    answered = log[log[:, 2] == 1]
    finished = answered[:, 0] + answered[:, 1]
    gaps = np.diff(np.concatenate([[began], finished[(finished >= began) & (finished <= ended + 60)]]))
    during = log[(log[:, 0] >= began) & (log[:, 0] <= ended)]
    steady = answered[answered[:, 0] < began]
    longest = float(gaps.max()) if len(gaps) else float("nan")
    print(
        f"  {name:<8} change took {ended - began:6.2f} s; searches started meanwhile {len(during):5d}, failed "
        f"{int((during[:, 2] == 0).sum()):5d}; longest wait for an answer {longest:6.2f} s; "
        f"p50 before {np.median(steady[:, 1]) * 1e3:6.1f} ms, during {np.median(during[during[:, 2] == 1][:, 1]) * 1e3 if (during[:, 2] == 1).any() else float('nan'):6.1f} ms"
    )
    return longest


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10, help="Steady load before each change.")
    args = parser.parse_args()
    source = builtin_rag_index(Embedder(), progress=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        index = work / "python-docs"
        shutil.copytree(source, index)
        for name in ("reload", "restart"):
            with open(work / f"{name}.jsonl", "w") as f:
                for n in range(NEW_DOCUMENTS):
                    f.write(
                        json.dumps(
                            {
                                "id": f"{name}-note-{n}",
                                "title": f"Release note {n}",
                                "text": f"Release note {n} ({name}): the frobnicate module gained option {n}.",
                            }
                        )
                        + "\n"
                    )
        process, url = start(index, work)
        passages = post(url + "/admin/reload", {})["index"]["passages"]
        print(
            f"python-docs, {passages:,} passages, 2 shards, built-in model; {NEW_DOCUMENTS} documents added per change; "
            f"{time.strftime('%Y-%m-%d %H:%M')}"
        )

        load = SearchLoad(url)
        time.sleep(args.seconds)
        subprocess.run(
            [sys.executable, "-m", "chameleon", "index", "add", "--index", str(index), "--corpus", str(work / "reload.jsonl")],
            check=True,
            capture_output=True,
        )
        began = time.monotonic()
        answer = post(url + "/admin/reload", {})
        ended = time.monotonic()
        time.sleep(2)
        reload_gap = report("reload", load.stop(), began, ended)
        assert answer["reloaded"] and answer["index"]["passages"] == passages + NEW_DOCUMENTS, answer

        load = SearchLoad(url)
        time.sleep(args.seconds)
        subprocess.run(
            [sys.executable, "-m", "chameleon", "index", "add", "--index", str(index), "--corpus", str(work / "restart.jsonl")],
            check=True,
            capture_output=True,
        )
        began = time.monotonic()
        process.send_signal(signal.SIGTERM)
        process.wait()
        process, fresh_url = start(index, work)
        load.url = fresh_url  # the same port is not promised: the client follows the new one
        while not load.log or not load.log[-1][2]:
            time.sleep(0.01)
        ended = time.monotonic()
        time.sleep(2)
        restart_gap = report("restart", load.stop(), began, ended)
        process.send_signal(signal.SIGTERM)
        process.wait()
    print(f"longest wait for an answer: reload {reload_gap:.2f} s vs restart {restart_gap:.2f} s ({restart_gap / reload_gap:.0f}x shorter)")


if __name__ == "__main__":
    main()
