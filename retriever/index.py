"""The IVF-PQ index: in-memory form, on-disk format, shards.

On disk an index is a directory::

    manifest.json                  format version, parameters, counts, shard layout, every array's
                                   shape, dtype and sha256
    centroids.npy                  (nlist, dim) float32 coarse centroids
    codebooks.npy                  (m, 2**nbits, dim // m) float32 PQ codebooks of the residuals
    shard-000/offsets.npy          (nlist + 1,) int64: list l is rows offsets[l]:offsets[l+1]
    shard-000/ids.npy              (n,) int64 original row ids
    shard-000/codes.npy            (n, code_size) uint8 PQ codes as faiss packs them (4-bit: two a byte)
    shard-001/...

Every index has S >= 1 shards. A shard holds a balanced slice of *every* inverted list (the way
Chameleon stripes lists across memory banks and nodes), so each query loads each shard about
equally. Arrays are plain ``.npy`` files, memory-mapped on load. The directory is written under a
temporary name and renamed into place, so a reader never sees half an index.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from retriever.errors import ChameleonError, InvalidInput
from retriever.files import atomic_directory

FORMAT_NAME = "chameleon.ivfpq"
FORMAT_VERSION = 1
METRICS = ("l2", "ip", "cos")
SUPPORTED_NBITS = (4, 8)
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class IVFPQParams:
    """Shape of an IVF-PQ index. ``cos`` is inner product on L2-normalised vectors."""

    metric: str
    dim: int
    nlist: int
    m: int
    nbits: int = 8

    def __post_init__(self):
        if self.metric not in METRICS:
            raise InvalidInput(f"metric must be one of {', '.join(METRICS)}, got {self.metric!r}")
        for name in ("dim", "nlist", "m"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise InvalidInput(f"{name} must be a positive integer, got {value!r}")
        if self.nbits not in SUPPORTED_NBITS:
            raise InvalidInput(f"nbits must be one of {SUPPORTED_NBITS}, got {self.nbits!r}")
        if self.dim % self.m:
            raise InvalidInput(f"m={self.m} must divide the dimension {self.dim}")

    @property
    def ksub(self) -> int:
        return 1 << self.nbits

    @property
    def dsub(self) -> int:
        return self.dim // self.m

    @property
    def code_size(self) -> int:
        return (self.m * self.nbits + 7) // 8

    @property
    def inner_product(self) -> bool:
        """True when larger scores are better (ip, cos)."""
        return self.metric != "l2"


def unpack_codes(codes: np.ndarray, m: int, nbits: int) -> np.ndarray:
    """(n, m) uint8 codes, one per byte, from PQ codes as faiss packs them.

    8-bit codes are already one per byte. 4-bit codes go two to a byte, sub-quantizer 2i in the low
    nibble and 2i + 1 in the high one (faiss's BitstringWriter fills bytes from the low bit).
    """
    codes = np.asarray(codes, dtype=np.uint8)
    if nbits == 8:
        return codes
    if nbits != 4:
        raise InvalidInput(f"nbits must be one of {SUPPORTED_NBITS}, got {nbits!r}")
    unpacked = np.empty((codes.shape[0], 2 * codes.shape[1]), dtype=np.uint8)
    unpacked[:, 0::2] = codes & 0x0F
    unpacked[:, 1::2] = codes >> 4
    return np.ascontiguousarray(unpacked[:, :m])


@dataclass
class InvertedLists:
    """CSR inverted lists: list l holds rows ``offsets[l]:offsets[l+1]`` of ``ids`` and ``codes``."""

    offsets: np.ndarray
    ids: np.ndarray
    codes: np.ndarray

    @property
    def ntotal(self) -> int:
        return int(self.ids.shape[0])

    @property
    def nlist(self) -> int:
        return int(self.offsets.shape[0]) - 1

    def list_sizes(self) -> np.ndarray:
        return np.diff(self.offsets)

    def assignment(self) -> np.ndarray:
        """Each entry's list, in order (what :meth:`from_assignment` grouped by)."""
        return np.repeat(np.arange(self.nlist, dtype=np.int64), self.list_sizes())

    @classmethod
    def from_assignment(cls, assignment: np.ndarray, ids: np.ndarray, codes: np.ndarray, nlist: int):
        """Group rows by list (stable, so ids keep their order within a list)."""
        order = np.argsort(assignment, kind="stable")
        offsets = np.zeros(nlist + 1, dtype=np.int64)
        np.cumsum(np.bincount(assignment, minlength=nlist), out=offsets[1:])
        return cls(offsets, np.ascontiguousarray(ids[order], dtype=np.int64), np.ascontiguousarray(codes[order]))


@dataclass
class IVFPQIndex:
    """Trained quantizers plus the encoded database, split into one or more shards."""

    params: IVFPQParams
    centroids: np.ndarray
    codebooks: np.ndarray
    shards: list[InvertedLists]
    build_info: dict = field(default_factory=dict)

    @property
    def ntotal(self) -> int:
        return sum(s.ntotal for s in self.shards)

    @property
    def nshards(self) -> int:
        return len(self.shards)

    def whole(self) -> InvertedLists:
        """The inverted lists of the whole index (the shards put back together)."""
        return merge_shards(self.shards) if self.nshards > 1 else self.shards[0]

    def shard(self, i: int) -> IVFPQIndex:
        """An index holding only shard ``i`` (what one retrieval node serves)."""
        if not 0 <= i < self.nshards:
            raise InvalidInput(f"shard {i} does not exist: the index has {self.nshards} shard(s)")
        return IVFPQIndex(self.params, self.centroids, self.codebooks, [self.shards[i]], self.build_info)

    def resharded(self, nshards: int) -> IVFPQIndex:
        return IVFPQIndex(self.params, self.centroids, self.codebooks, split_shards(self.whole(), nshards), self.build_info)


def _slice_bounds(size: int, nshards: int) -> np.ndarray:
    return np.arange(nshards + 1, dtype=np.int64) * size // nshards


def _slice_owner(list_id: int, slice_no: int, nshards: int) -> int:
    # Rotating which shard takes which slice keeps small lists' remainders from piling up on one shard.
    return (list_id + slice_no) % nshards


def split_shards(lists: InvertedLists, nshards: int) -> list[InvertedLists]:
    """Split every inverted list into ``nshards`` contiguous slices of (nearly) equal size."""
    if not isinstance(nshards, (int, np.integer)) or nshards < 1:
        raise InvalidInput(f"the number of shards must be a positive integer, got {nshards!r}")
    return [gather_shard([lists], shard, nshards) for shard in range(nshards)]


def gather_shard(parts: list[InvertedLists], shard: int, nshards: int) -> InvertedLists:
    """Shard ``shard`` of the ``nshards`` that :func:`split_shards` makes of the lists ``parts``
    hold together (each list: its entries in part after part), read from the parts slice by slice
    without putting them together first."""
    if not isinstance(nshards, (int, np.integer)) or nshards < 1 or not 0 <= shard < nshards:
        raise InvalidInput(f"shard {shard} of {nshards} does not exist")
    nlist = parts[0].nlist
    part_sizes = np.array([part.list_sizes() for part in parts])  # (parts, nlist)
    before = np.cumsum(part_sizes, axis=0) - part_sizes  # each list's entries in the parts before
    sizes = np.zeros(nlist, dtype=np.int64)
    pieces: list[tuple[InvertedLists, int, int]] = []
    for list_id in range(nlist):
        bounds = _slice_bounds(int(part_sizes[:, list_id].sum()), nshards)
        slice_no = (shard - list_id) % nshards  # the slice whose owner (_slice_owner) is this shard
        low, high = bounds[slice_no], bounds[slice_no + 1]
        sizes[list_id] = high - low
        for p, part in enumerate(parts):
            begin = before[p, list_id]
            first, last = max(low, begin), min(high, begin + part_sizes[p, list_id])
            if first < last:
                row = int(part.offsets[list_id] + first - begin)
                pieces.append((part, row, row + int(last - first)))
    offsets = np.zeros(nlist + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    code_size = parts[0].codes.shape[1]
    ids = np.concatenate([part.ids[a:b] for part, a, b in pieces]) if pieces else np.zeros(0, dtype=np.int64)
    codes = np.concatenate([part.codes[a:b] for part, a, b in pieces]) if pieces else np.zeros((0, code_size), dtype=np.uint8)
    return InvertedLists(offsets, np.ascontiguousarray(ids, dtype=np.int64), np.ascontiguousarray(codes))


def merge_shards(shards: list[InvertedLists]) -> InvertedLists:
    """Inverse of :func:`split_shards`: every list's slices back in their original order."""
    nshards = len(shards)
    nlist = shards[0].nlist
    if any(s.nlist != nlist for s in shards):
        raise InvalidInput("shards disagree on the number of inverted lists")
    bases = np.cumsum([0] + [s.ntotal for s in shards])
    pieces = []
    for list_id in range(nlist):
        for slice_no in range(nshards):
            owner = _slice_owner(list_id, slice_no, nshards)
            offsets = shards[owner].offsets
            pieces.append(bases[owner] + np.arange(offsets[list_id], offsets[list_id + 1]))
    take = np.concatenate(pieces)
    offsets = np.zeros(nlist + 1, dtype=np.int64)
    np.cumsum(sum(s.list_sizes() for s in shards), out=offsets[1:])
    ids = np.concatenate([s.ids for s in shards])
    codes = np.concatenate([s.codes for s in shards])
    return InvertedLists(offsets, ids[take], codes[take])


# ---------------------------------------------------------------------------------------------
# On-disk format


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def save_index(index: IVFPQIndex, out: str | os.PathLike, force: bool = False) -> Path:
    """Write ``index`` to the directory ``out`` atomically (temporary directory, then rename).

    An existing ``out`` is an error unless ``force``; then it is replaced only once the new index
    is complete on disk.
    """
    with index_writer(out, index.params, index.centroids, index.codebooks, index.build_info, force) as write_shard:
        for shard in index.shards:
            write_shard(shard)
    return Path(out)


@contextmanager
def index_writer(
    out: str | os.PathLike, params: IVFPQParams, centroids: np.ndarray, codebooks: np.ndarray, build_info: dict, force: bool = False
) -> Iterator[Callable[[InvertedLists], None]]:
    """Write an index a shard at a time: the block gets a function that writes the next shard; the
    manifest is written, and the directory appears at ``out``, when the block ends without error
    (atomically, as :func:`save_index`)."""
    with atomic_directory(Path(out), replace=force) as tmp:
        entries: dict[str, dict] = {}
        shards: list[dict] = []

        def write(name: str, array: np.ndarray) -> None:
            path = tmp / name
            path.parent.mkdir(exist_ok=True)
            with open(path, "wb") as f:
                np.save(f, np.ascontiguousarray(array))
                f.flush()
                os.fsync(f.fileno())
            entries[name] = {"shape": list(array.shape), "dtype": str(array.dtype), "sha256": _sha256(path)}

        def write_shard(lists: InvertedLists) -> None:
            i = len(shards)
            for name, array in (("offsets", lists.offsets), ("ids", lists.ids), ("codes", lists.codes)):
                write(f"shard-{i:03d}/{name}.npy", array)
            shards.append({"ntotal": lists.ntotal})

        write("centroids.npy", centroids)
        write("codebooks.npy", codebooks)
        yield write_shard
        if not shards:
            raise InvalidInput("an index needs at least one shard")
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "metric": params.metric,
            "dim": params.dim,
            "nlist": params.nlist,
            "m": params.m,
            "nbits": params.nbits,
            "ntotal": sum(shard["ntotal"] for shard in shards),
            "shards": shards,
            "arrays": entries,
            "build": {**build_info, "written": datetime.now(timezone.utc).isoformat(timespec="seconds")},
        }
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=2)
            f.flush()
            os.fsync(f.fileno())


def read_manifest(path: str | os.PathLike) -> dict:
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise InvalidInput(f"{path} is not an index directory: {MANIFEST} is missing")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidInput(f"{manifest_path} is corrupt: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise InvalidInput(f"{manifest_path} is not a {FORMAT_NAME} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise InvalidInput(f"{path} has format version {manifest.get('format_version')!r}; this build reads version {FORMAT_VERSION}")
    return manifest


def manifest_params(manifest: dict) -> IVFPQParams:
    """The parameters a manifest records (``KeyError`` for one it lacks)."""
    return IVFPQParams(manifest["metric"], manifest["dim"], manifest["nlist"], manifest["m"], manifest["nbits"])


def index_fingerprint(manifest: dict) -> str:
    """Identifies one version of an index: its parameters, quantizers, shard layout and contents.

    Every shard of a version has the same fingerprint; nodes serving different versions must not
    be merged. Contents count, not only the quantizers: ``index add`` and ``index remove`` make a
    new version with the same centroids, possibly with the same number of vectors.
    """
    identity = [manifest[key] for key in ("metric", "dim", "nlist", "m", "nbits", "ntotal")]
    identity += [len(manifest["shards"]), sorted((name, entry["sha256"]) for name, entry in manifest["arrays"].items())]
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]


def content_fingerprint(manifest: dict) -> str:
    """Identifies the vectors of one version, whatever its shard layout: a re-sharded copy names
    the version it was split from (``build.resharded_from``), any other index is its own.

    Every layout of one version answers every search alike (the same centroids, codebooks and
    codes, split another way), so a coordinator may switch between them while it serves.
    """
    return manifest["build"].get("resharded_from") or index_fingerprint(manifest)


def content_now(path: str | os.PathLike) -> str | None:
    """The content fingerprint of the index in ``path`` as it is now (its manifest alone is read),
    for whoever follows a path that a deployment changes; None while it cannot be read (being
    replaced, or gone: the next look decides)."""
    try:
        return content_fingerprint(read_manifest(path))
    except (ChameleonError, OSError):
        return None


def save_layout(source: str | os.PathLike, nshards: int, out: str | os.PathLike) -> Path:
    """The index in ``source`` split into ``nshards`` shards, written to ``out`` (atomically) unless
    ``out`` already holds that layout of the same version. The copy keeps the version's
    :func:`content_fingerprint`, so a coordinator may switch between it and other layouts."""
    out = Path(out)
    content = content_fingerprint(read_manifest(source))
    if (out / "manifest.json").is_file():
        existing = read_manifest(out)
        if content_fingerprint(existing) == content and len(existing["shards"]) == nshards:
            return out
    index = load_index(source).resharded(nshards)
    index.build_info = {**index.build_info, "resharded_from": content}
    return save_index(index, out, force=True)


def verify_index(path: str | os.PathLike) -> None:
    """Check every array's sha256 against the manifest; raise :class:`InvalidInput` on a mismatch."""
    path = Path(path)
    for name, entry in read_manifest(path)["arrays"].items():
        file = path / name
        if not file.is_file():
            raise InvalidInput(f"{file} is missing")
        if _sha256(file) != entry["sha256"]:
            raise InvalidInput(f"{file} is corrupt: its sha256 does not match the manifest")


def _load_array(path: Path, name: str, entry: dict) -> np.ndarray:
    file = path / name
    try:
        array = np.load(file, mmap_mode="r")
    except FileNotFoundError:
        raise InvalidInput(f"{file} is missing") from None
    except ValueError as e:
        raise InvalidInput(f"{file} is truncated or corrupt: {e}") from None
    if list(array.shape) != entry["shape"] or str(array.dtype) != entry["dtype"]:
        raise InvalidInput(f"{file} holds {array.dtype}{list(array.shape)}, the manifest says {entry['dtype']}{entry['shape']}")
    return array


def load_index(path: str | os.PathLike, verify: bool = False, shard: int | None = None) -> IVFPQIndex:
    """Memory-map an index directory (only ``shard`` of it when given).

    Shapes, dtypes and file sizes are always checked; ``verify`` also checks every checksum.
    """
    path = Path(path)
    manifest = read_manifest(path)
    if verify:
        verify_index(path)
    try:
        params = manifest_params(manifest)
        arrays = manifest["arrays"]
        nshards = len(manifest["shards"])
        wanted = range(nshards) if shard is None else [shard]
        if shard is not None and not 0 <= shard < nshards:
            raise InvalidInput(f"shard {shard} does not exist: {path} has {nshards} shard(s)")
        centroids = _load_array(path, "centroids.npy", arrays["centroids.npy"])
        codebooks = _load_array(path, "codebooks.npy", arrays["codebooks.npy"])
        shards = []
        for i in wanted:
            names = [f"shard-{i:03d}/{a}.npy" for a in ("offsets", "ids", "codes")]
            shards.append(InvertedLists(*(_load_array(path, n, arrays[n]) for n in names)))
    except KeyError as e:
        raise InvalidInput(f"{path / MANIFEST} lacks the entry {e}") from None
    index = IVFPQIndex(params, centroids, codebooks, shards, manifest.get("build", {}))
    _check_consistent(index, path)
    return index


def _check_consistent(index: IVFPQIndex, path: Path) -> None:
    p = index.params
    if index.centroids.shape != (p.nlist, p.dim) or index.codebooks.shape != (p.m, p.ksub, p.dsub):
        raise InvalidInput(f"{path}: quantizer shapes do not match the parameters")
    for s in index.shards:
        if s.offsets.shape != (p.nlist + 1,) or s.codes.shape != (s.ntotal, p.code_size):
            raise InvalidInput(f"{path}: inverted list shapes do not match the parameters")
        if s.offsets[0] != 0 or s.offsets[-1] != s.ntotal or np.any(np.diff(s.offsets) < 0):
            raise InvalidInput(f"{path}: inverted list offsets are corrupt")
