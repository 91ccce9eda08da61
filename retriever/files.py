"""Atomic writes: a reader sees the old file (or directory) or the new one, never half of one;
and waiting for one to appear."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from retriever.errors import InvalidInput, NotFound


def _write_atomic(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_json_atomic(path: str | os.PathLike, data) -> None:
    _write_atomic(Path(path), lambda f: f.write(json.dumps(data, indent=1).encode()))


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    _write_atomic(Path(path), lambda f: f.write(text.encode()))


def save_npy_atomic(path: str | os.PathLike, array: np.ndarray) -> None:
    _write_atomic(Path(path), lambda f: np.save(f, array))


@contextmanager
def atomic_directory(target: str | os.PathLike, replace: bool = False) -> Iterator[Path]:
    """Fill the yielded temporary directory; on success it becomes ``target``.

    An existing ``target`` is an error unless ``replace``; it is swapped out only once the new
    directory is complete. On any failure the temporary directory is removed and ``target`` is
    left as it was.
    """
    target = Path(target)
    if target.exists() and not replace:
        raise InvalidInput(f"{target} already exists (use --force to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.rename(target, trash / "old")
            os.rename(tmp, target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def wait_for_path(path: str | os.PathLike, seconds: float, poll: float = 0.5) -> None:
    """Wait up to ``seconds`` for ``path`` to exist, or raise :class:`NotFound`. What this package
    writes appears whole (atomically), so a process started beside a deployment's index job may
    wait for its index instead of failing and being restarted until it is there."""
    deadline = time.monotonic() + seconds
    while not Path(path).exists():
        if time.monotonic() >= deadline:
            raise NotFound(f"{path} does not exist" + (f" (waited {seconds:g} s)" if seconds else ""))
        time.sleep(poll)
