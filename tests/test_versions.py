"""A deployment's versioned index directory (chameleon/versions.py, ``chameleon index version``):
versions written whole and once, made current by a rename, vector versions changed without
training, and what cannot be a version refused before anything is written."""

import os

import numpy as np
import pytest

from chameleon.versions import VersionSpec, current_version, write_version
from retriever.build import build_index
from retriever.errors import InvalidInput
from retriever.index import IVFPQParams, load_index, read_manifest, save_index
from tests.helpers import chameleon

BASE = np.random.default_rng(3).standard_normal((2000, 16)).astype(np.float32)


@pytest.fixture
def served(tmp_path):
    """A volume that serves v1, a two-shard vector index of BASE."""
    save_index(build_index(BASE, IVFPQParams("l2", 16, 8, 4), nshards=2), tmp_path / "versions" / "v1" / "vectors")
    (tmp_path / "current").symlink_to("versions/v1")
    return tmp_path


def test_a_vector_version_is_changed_without_training_and_made_current(served):
    np.save(served / "more.npy", BASE[:10] + 1)
    write_version(served, VersionSpec("v2", base="v1", add=str(served / "more.npy"), remove_ids=(0, 5)), shards=[2, 3])
    assert current_version(served) == "v2" and os.readlink(served / "current") == "versions/v2"
    v1, v2 = load_index(served / "versions" / "v1" / "vectors"), load_index(served / "current" / "vectors")
    np.testing.assert_array_equal(v1.centroids, v2.centroids)  # the same quantizers: nothing trained
    ids = np.sort(np.concatenate([shard.ids for shard in v2.shards]))
    np.testing.assert_array_equal(ids, np.setdiff1d(np.arange(2010), [0, 5]))
    assert v1.ntotal == 2000  # the served version is never written
    assert os.readlink(served / "versions" / "v2" / "shards-2") == "vectors"  # split so already: linked
    three = read_manifest(served / "versions" / "v2" / "shards-3")
    assert len(three["shards"]) == 3 and three["build"]["resharded_from"]


def test_a_version_there_already_is_kept_and_a_first_versions_job_keeps_a_newer_current(served):
    np.save(served / "more.npy", BASE[:10])
    spec = VersionSpec("v2", base="v1", add=str(served / "more.npy"))
    write_version(served, spec)
    written = read_manifest(served / "versions" / "v2" / "vectors")["build"]["written"]
    write_version(served, spec, shards=[2])  # a job run again: the version stays, the layout is added
    assert read_manifest(served / "versions" / "v2" / "vectors")["build"]["written"] == written
    write_version(served, VersionSpec("v1", base="v0", remove_ids=(1,)), keep_current=True)  # v1 is there
    assert current_version(served) == "v2"


@pytest.mark.parametrize(
    "spec, message",
    [
        (VersionSpec("V2", base="v1", remove_ids=(1,)), "use lowercase letters"),
        (VersionSpec("v2"), "exactly one of"),
        (VersionSpec("v2", corpus="docs", base="v1"), "exactly one of"),
        (VersionSpec("v2", corpus="docs", remove_docs=("a",)), r"name it \(--from\)"),
        (VersionSpec("v2", base="v1"), "say what v2 changes in v1"),
        (VersionSpec("v1", base="v1", remove_ids=(1,)), "cannot be made from itself"),
        (VersionSpec("v2", base="v9", remove_ids=(1,)), "version v9 is not in"),
        (VersionSpec("v2", base="v1", remove_docs=("a",)), "a vector index: remove vectors by their ids"),
        (VersionSpec("v2", base="v1", remove_ids=(99_999,)), "not in the index"),
    ],
)
def test_what_cannot_be_a_version_is_refused_and_nothing_moves(served, spec, message):
    with pytest.raises(InvalidInput, match=message):
        write_version(served, spec, shards=[2])
    assert current_version(served) == "v1"
    assert sorted(p.name for p in (served / "versions").iterdir() if not p.name.startswith(".")) in (["v1"], ["v1", "v2"])
    assert not (served / "versions" / "v2" / "vectors").exists()


def test_the_command_line_writes_a_version_and_says_what_is_current(served):
    out = chameleon("index", "version", "v2", "--data", served, "--from", "v1", "--remove-ids", "3,4", "--shards", 2)
    assert current_version(served) == "v2" and load_index(served / "current" / "vectors").ntotal == 1998
    assert f"{served / 'current'} -> versions/v2" in out.stderr
    refused = chameleon("index", "version", "v3", "--data", served, "--from", "v2", "--remove-ids", "1", "--shards", 0, expect=2)
    assert "shards must be in 1..256" in refused.stderr
