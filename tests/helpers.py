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


def wait_for(condition, seconds: float, what: str = "the condition", interval: float = 0.1) -> None:
    """Return once ``condition()`` is true; fail the test if it is not within ``seconds``."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)


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
    from chameleon.server.launch import spawn
    from retriever.errors import InvalidInput

    try:
        process, info = spawn(tmp_path, *args, timeout=START_TIMEOUT)
    except InvalidInput as e:
        pytest.fail(str(e))
    return Server(process, info["url"], info["state_dir"], tmp_path / "serve.log")


def chameleon(*args, expect=0):
    """Run the ``chameleon`` command line in a subprocess; it must exit with ``expect`` and print no traceback."""
    result = subprocess.run([sys.executable, "-m", "chameleon", *map(str, args)], capture_output=True, text=True, timeout=600)
    assert result.returncode == expect, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return result


def write_ann_hdf5(path, train, test, neighbors, distance):
    """A dataset file in ann-benchmarks' HDF5 layout."""
    import h5py  # not in the vLLM test environment, whose tests import this module too

    with h5py.File(path, "w") as f:
        f.attrs["distance"] = distance
        f.create_dataset("train", data=train)
        f.create_dataset("test", data=test)
        f.create_dataset("neighbors", data=neighbors)


def parse(args: list[str]):
    """``args`` parsed by `chameleon`'s own command line, the context of the command they name (an
    unknown command or option, or a bad value, raises)."""
    from typer.main import get_command

    from chameleon.cli import app

    command, context, name = get_command(app), None, "chameleon"
    while hasattr(command, "get_command"):  # a group: the chart passes it no options, only a command's name
        context = command.make_context(name, list(args), parent=context)
        name, args = args[0], args[1:]
        command = command.get_command(context, name)
        assert command is not None, f"`chameleon` has no command {name}"
    return command.make_context(name, list(args), parent=context)


def assert_same_index(a, b):
    assert a.params == b.params and a.nshards == b.nshards
    np.testing.assert_array_equal(a.centroids, b.centroids)
    np.testing.assert_array_equal(a.codebooks, b.codebooks)
    for x, y in zip(a.shards, b.shards):
        for name in ("offsets", "ids", "codes"):
            np.testing.assert_array_equal(getattr(x, name), getattr(y, name))
