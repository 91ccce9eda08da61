"""The versioned index directory that a deployment serves (docs/deployment.md, "Changing the
index while serving"), and the one way a version is written into it (``chameleon index version``:
the Kubernetes chart's index Jobs and the Compose update run it).

    DATA/versions/NAME/rag/       a passage index (a corpus), or
    DATA/versions/NAME/vectors/   a vector index (a vector file, built in parts)
    DATA/versions/NAME/shards-N/  its layouts: what the retrieval nodes serve
    DATA/current                  a link to the version served: coordinators and servers name paths through it

A version is written once, under a temporary name, then renamed: a job run again, or one that
failed half way, never serves half a version and never writes one twice. ``current`` moves by a
rename too, so it is never missing.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retriever.errors import InvalidInput
from retriever.files import atomic_directory
from retriever.index import read_manifest, save_layout, verify_index

NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,14}[a-z0-9])?")  # a directory, and a part of service and object names
CURRENT = "current"
PASSAGES, VECTORS = "rag", "vectors"  # a version's index, by kind


@dataclass(frozen=True)
class VersionSpec:
    """What a version is made of: exactly one of a corpus (a new passage index), the parts of a
    vector build (``index encode``), or an earlier version (``base``) changed by ``add`` (a corpus,
    or a vector file) and the removals, with the base's trained quantizers."""

    name: str
    corpus: str | None = None
    parts: tuple[Path, ...] = ()
    base: str | None = None
    add: str | None = None
    remove_docs: tuple[str, ...] = ()
    remove_ids: tuple[int, ...] = ()

    def check(self) -> None:
        check_name(self.name)
        if sum((self.corpus is not None, bool(self.parts), self.base is not None)) != 1:
            raise InvalidInput("a version is made of exactly one of a corpus, the parts of a vector build, or an earlier version")
        if self.base is None and (self.add is not None or self.remove_docs or self.remove_ids):
            raise InvalidInput("adding and removing change an earlier version: name it (--from)")
        if self.base is not None:
            check_name(self.base)
            if self.base == self.name:
                raise InvalidInput(f"version {self.name} cannot be made from itself")
            if self.add is None and not self.remove_docs and not self.remove_ids:
                raise InvalidInput(f"say what {self.name} changes in {self.base}: what to add, or what to remove")


def check_name(name: str) -> None:
    if not NAME.fullmatch(name):
        raise InvalidInput(
            f"index version {name!r}: use lowercase letters, digits and '-' (at most 16 characters, a letter or digit at each end)"
        )


def index_of(version: Path) -> Path:
    """The index of the version directory ``version``: its passage index or its vector index."""
    index = _index_in(version)
    if index is None:
        raise InvalidInput(f"{version} holds no index version ({PASSAGES}/ or {VECTORS}/)")
    return index


def _index_in(version: Path) -> Path | None:
    return next((version / kind for kind in (PASSAGES, VECTORS) if (version / kind).is_dir()), None)


def current_version(data: str | os.PathLike) -> str | None:
    """The name of the version ``DATA/current`` links to (None before the first)."""
    link = Path(data) / CURRENT
    return Path(os.readlink(link)).name if link.is_symlink() else None


def write_version(
    data: str | os.PathLike, spec: VersionSpec, shards: Sequence[int] = (), keep_current: bool = False, progress: bool = False
) -> Path:
    """Write the version ``spec`` describes into ``DATA/versions/NAME`` (kept as it is if it is
    there already), check every array against its manifest, write its ``shards`` layouts, then
    make it current (with ``keep_current``, only if none is: a deployment's first version, whose
    job may run again after a newer one is served). Returns the version's directory."""
    spec.check()
    if any(not 1 <= n <= 256 for n in shards):
        raise InvalidInput(f"shards must be in 1..256, got {list(shards)}")
    data = Path(data)
    version = data / "versions" / spec.name
    index = _index_in(version)
    if index is None:
        _write_index(data, version, spec, shards, progress)
        index = index_of(version)
    vectors = index / "index" if index.name == PASSAGES else index
    verify_index(vectors)
    for n in shards:
        _write_layout(vectors, n, version / f"shards-{n}")
    if not (keep_current and current_version(data)):
        make_current(data, spec.name)
    return version


def make_current(data: Path, name: str) -> None:
    """Point ``DATA/current`` at ``versions/NAME``: a new link, renamed over the old one."""
    fresh = data / f".{CURRENT}.{os.getpid()}"
    fresh.unlink(missing_ok=True)
    fresh.symlink_to(Path("versions") / name)
    os.replace(fresh, data / CURRENT)


def _write_index(data: Path, version: Path, spec: VersionSpec, shards: Sequence[int], progress: bool) -> None:
    if spec.corpus is not None:
        from chameleon.rag.corpus import build_rag_index
        from chameleon.rag.embedder import Embedder

        with atomic_directory(version / PASSAGES) as tmp:
            build_rag_index(spec.corpus, tmp, Embedder(), force=True, progress=progress)
        return
    if spec.parts:
        from retriever.build import join_parts

        # joined straight into the first layout asked for: one output shard in memory at a time
        with atomic_directory(version / VECTORS) as tmp:
            join_parts(list(spec.parts), shards[0] if shards else 1, tmp, force=True)
        return
    base = data / "versions" / spec.base
    if not base.is_dir():
        raise InvalidInput(f"version {spec.base} is not in {data / 'versions'}")
    source = index_of(base)
    with atomic_directory(version / source.name) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
        if source.name == PASSAGES:
            _change_passages(tmp, spec, progress)
        else:
            _change_vectors(tmp, spec, progress)


def _change_passages(index: Path, spec: VersionSpec, progress: bool) -> None:
    from chameleon.rag.corpus import add_to_rag_index, remove_from_rag_index

    if spec.remove_ids:
        raise InvalidInput(f"version {spec.base} is a passage index: remove documents by their ids, not vectors")
    if spec.add is not None:
        from chameleon.rag.embedder import Embedder

        add_to_rag_index(index, spec.add, Embedder(), progress=progress)
    if spec.remove_docs:
        remove_from_rag_index(index, list(spec.remove_docs))


def _change_vectors(index: Path, spec: VersionSpec, progress: bool) -> None:
    from retriever.build import add_vectors, remove_ids
    from retriever.datasets import read_vectors
    from retriever.index import load_index, save_index

    if spec.remove_docs:
        raise InvalidInput(f"version {spec.base} is a vector index: remove vectors by their ids, not documents")
    if spec.add is not None:
        save_index(add_vectors(load_index(index), read_vectors(spec.add), progress=progress), index, force=True)
    if spec.remove_ids:
        save_index(remove_ids(load_index(index), np.asarray(spec.remove_ids, dtype=np.int64)), index, force=True)


def _write_layout(vectors: Path, nshards: int, out: Path) -> None:
    """``out``: the layout of ``nshards`` shards. An index split that way already is linked, not
    copied (a version built in parts is joined straight into its layout: no second copy on disk)."""
    if len(read_manifest(vectors)["shards"]) == nshards and not out.exists():
        fresh = out.with_name(f".{out.name}.{os.getpid()}")
        fresh.unlink(missing_ok=True)
        fresh.symlink_to(vectors.relative_to(out.parent))
        os.replace(fresh, out)
        return
    save_layout(vectors, nshards, out)
