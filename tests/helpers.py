import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest


def same_up_to_ties(d1, i1, d2, i2, rtol=1e-5):
    """Per row: True when two top-k lists agree except for the order (or, at the cut, the choice)
    of candidates whose distances are equal within ``rtol``."""
    rows = []
    for a_d, a_i, b_d, b_i in zip(d1, i1, d2, i2):
        if not np.allclose(a_d, b_d, rtol=rtol, atol=rtol):
            rows.append(False)
            continue
        tied_with_next = np.isclose(a_d[1:], a_d[:-1], rtol=rtol, atol=rtol)
        group_starts = np.flatnonzero(np.concatenate([[True], ~tied_with_next]))
        bounds = list(group_starts) + [len(a_d)]
        ok = all(
            set(a_i[lo:hi]) == set(b_i[lo:hi]) for lo, hi in zip(bounds[:-2], bounds[1:-1])
        )  # the last group may be cut at k differently
        rows.append(ok)
    return np.array(rows)


START_TIMEOUT = 300


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    state_dir: str | None
    log: Path

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


def start_server(tmp_path: Path, *args) -> Server:
    ready, log = tmp_path / "ready.json", tmp_path / "serve.log"
    command = [sys.executable, "-m", "chameleon", "serve", "--port", "0", "--ready-file", str(ready), "--state-dir", str(tmp_path / "state"), *map(str, args)]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + START_TIMEOUT
    while not ready.is_file():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the server did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)
    info = json.loads(ready.read_text())
    return Server(process, info["url"], info["state_dir"], log)
