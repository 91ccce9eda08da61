import json

import numpy as np
import pytest

import retriever.index as index_module
from retriever.errors import InvalidInput
from retriever.index import FORMAT_VERSION, IVFPQParams, load_index, read_manifest, save_index, verify_index


def assert_same_index(a, b):
    assert a.params == b.params
    np.testing.assert_array_equal(a.centroids, b.centroids)
    np.testing.assert_array_equal(a.codebooks, b.codebooks)
    assert a.nshards == b.nshards
    for sa, sb in zip(a.shards, b.shards):
        np.testing.assert_array_equal(sa.offsets, sb.offsets)
        np.testing.assert_array_equal(sa.ids, sb.ids)
        np.testing.assert_array_equal(sa.codes, sb.codes)


def test_round_trip_keeps_every_array(tmp_path, small_index):
    path = save_index(small_index, tmp_path / "idx")
    loaded = load_index(path, verify=True)
    assert_same_index(small_index, loaded)
    manifest = read_manifest(path)
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["ntotal"] == small_index.ntotal == 20_000
    assert manifest["metric"] == small_index.params.metric
    assert set(manifest["arrays"]) == {
        "centroids.npy",
        "codebooks.npy",
        "shard-000/offsets.npy",
        "shard-000/ids.npy",
        "shard-000/codes.npy",
    }
    assert isinstance(loaded.shards[0].codes, np.memmap)


def test_round_trip_of_sharded_index(tmp_path, l2_index):
    sharded = l2_index.resharded(3)
    loaded = load_index(save_index(sharded, tmp_path / "idx"))
    assert_same_index(sharded, loaded)
    single = load_index(tmp_path / "idx", shard=1)
    np.testing.assert_array_equal(single.shards[0].ids, sharded.shards[1].ids)
    with pytest.raises(InvalidInput, match="shard 3 does not exist"):
        load_index(tmp_path / "idx", shard=3)


def _flip_byte(path, offset_from_end=10):
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupted_array_fails_checksum(tmp_path, l2_index):
    path = save_index(l2_index, tmp_path / "idx")
    _flip_byte(path / "shard-000" / "codes.npy")
    load_index(path)  # shapes still fine: only --verify reads every byte
    with pytest.raises(InvalidInput, match="codes.npy is corrupt"):
        load_index(path, verify=True)
    with pytest.raises(InvalidInput, match="sha256"):
        verify_index(path)


def test_truncated_array_is_detected_without_verify(tmp_path, l2_index):
    path = save_index(l2_index, tmp_path / "idx")
    codes = path / "shard-000" / "codes.npy"
    codes.write_bytes(codes.read_bytes()[:-1000])
    with pytest.raises(InvalidInput, match="truncated or corrupt"):
        load_index(path)


def test_missing_or_bad_manifest(tmp_path, l2_index):
    with pytest.raises(InvalidInput, match="manifest.json is missing"):
        load_index(tmp_path)
    path = save_index(l2_index, tmp_path / "idx")
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(InvalidInput, match="format version 99"):
        load_index(path)
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(InvalidInput, match="corrupt"):
        load_index(path)


def test_manifest_shape_mismatch(tmp_path, l2_index):
    path = save_index(l2_index, tmp_path / "idx")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["arrays"]["centroids.npy"]["shape"] = [63, 32]
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InvalidInput, match="the manifest says"):
        load_index(path)


def test_existing_directory_needs_force(tmp_path, l2_index):
    target = tmp_path / "idx"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(InvalidInput, match="--force"):
        save_index(l2_index, target)
    assert (target / "keep.txt").read_text() == "mine"
    save_index(l2_index, target, force=True)
    assert not (target / "keep.txt").exists()
    assert load_index(target).ntotal == l2_index.ntotal
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]  # no temporary directories left


def test_failed_write_leaves_nothing_behind(tmp_path, l2_index, monkeypatch):
    calls = []

    def failing_save(f, array):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        np.lib.format.write_array(f, array)

    monkeypatch.setattr(index_module.np, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_index(l2_index, tmp_path / "idx")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"metric": "hamming"}, "metric must be one of"),
        ({"m": 5}, "must divide the dimension"),
        ({"nbits": 6}, "nbits must be one of"),
        ({"nlist": 0}, "nlist must be a positive integer"),
    ],
)
def test_bad_parameters(kwargs, message):
    args = {"metric": "l2", "dim": 32, "nlist": 16, "m": 8, **kwargs}
    with pytest.raises(InvalidInput, match=message):
        IVFPQParams(**args)
