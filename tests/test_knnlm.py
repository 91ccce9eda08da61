"""kNN-LM on a small corpus of repeated facts, with the built-in model."""

import json
import subprocess
import sys

import pytest

from chameleon.rag.corpus import Document
from retriever.errors import InvalidInput

CODES = ["ALPHA", "BRAVO", "CHARLIE", "DELTA", "ECHO", "FOXTROT", "GOLF", "HOTEL"]
FACTS = [f"The secret code of planet Zorblax-{n} is {CODES[n % 8]}-{n * 7 % 100}." for n in range(60)]


@pytest.fixture(scope="module")
def datastore(tmp_path_factory, engine):
    from chameleon.rag.knnlm import build_datastore

    out = tmp_path_factory.mktemp("knnlm") / "store"
    documents = [Document(f"d{n}", "facts", " ".join(FACTS), "test") for n in range(3)]
    with pytest.warns(UserWarning, match="training PQ on"):
        meta = build_datastore(documents, engine, out, nlist=8)
    assert meta["keys"] > 3000
    return out


def test_interpolation_lowers_perplexity_on_text_of_the_corpus(engine, datastore):
    from chameleon.rag.knnlm import KnnLm, perplexity

    text = " ".join(FACTS[10:20])
    base = perplexity(engine, text)
    knn = KnnLm.open(datastore, engine, k=8, lam=0.5)
    assert perplexity(engine, text, knn) < 0.8 * base
    off = KnnLm.open(datastore, engine, k=8, lam=0.0)  # lambda 0 is the plain LM
    assert perplexity(engine, text, off) == pytest.approx(base, rel=1e-4)


def test_generation_draws_on_the_datastore(engine, datastore):
    from chameleon.engines.batching import BatchingEngine
    from chameleon.rag.knnlm import KnnLm, generate

    prompt = engine.tokenizer("The secret code of planet Zorblax-13 is", add_special_tokens=False)["input_ids"]
    knn_tokens = generate(engine, KnnLm.open(datastore, engine, k=8, lam=0.9), prompt, 4)
    knn_text = engine.tokenizer.decode(knn_tokens)
    base_text = engine.tokenizer.decode(engine.generate(prompt, 4).tokens)
    assert any(code in knn_text for code in CODES), knn_text  # a code from the corpus, which the base LM does not know
    assert not any(code in base_text for code in CODES)
    # querying only at the first step: the rest is the LM's own greedy continuation of that token
    first_only = generate(engine, KnnLm.open(datastore, engine, k=8, lam=0.9), prompt, 4, every=100)
    assert first_only[0] == generate(engine, KnnLm.open(datastore, engine, k=8, lam=0.9), prompt, 1)[0]
    assert first_only[1:] == engine.generate(prompt + first_only[:1], 3).tokens
    with pytest.raises(InvalidInput, match="at least 1"):
        generate(engine, KnnLm.open(datastore, engine), prompt, 4, every=0)
    # the server's engine: the batcher over the torch engine
    batched = BatchingEngine(engine)
    try:
        assert generate(batched, KnnLm.open(datastore, batched, k=8, lam=0.9), prompt, 4) == knn_tokens
    finally:
        batched.close()


def test_datastore_errors(engine, datastore, tmp_path):
    from chameleon.rag.knnlm import KnnLm, build_datastore

    with pytest.raises(InvalidInput, match="knnlm.json is missing"):
        KnnLm.open(tmp_path, engine)
    meta = json.loads((datastore / "knnlm.json").read_text())
    (tmp_path / "other").mkdir()
    for name in ("values.npy",):
        (tmp_path / "other" / name).write_bytes((datastore / name).read_bytes())
    (tmp_path / "other" / "knnlm.json").write_text(json.dumps({**meta, "model": "another-model:4096:32000"}))
    with pytest.raises(InvalidInput, match="was built with the model"):
        KnnLm.open(tmp_path / "other", engine)
    with pytest.raises(InvalidInput, match="lambda"):
        KnnLm.open(datastore, engine, lam=1.5)
    with pytest.raises(InvalidInput, match="at least 256"):
        build_datastore([Document("a", "t", "too short", "s")], engine, tmp_path / "tiny")


def test_knnlm_command_line(tmp_path):
    corpus = tmp_path / "facts.jsonl"
    corpus.write_text("".join(json.dumps({"id": n, "text": " ".join(FACTS[n:] + FACTS[:n])}) + "\n" for n in range(10)))

    def chameleon(*args, expect=0):
        result = subprocess.run([sys.executable, "-m", "chameleon", *map(str, args)], capture_output=True, text=True, timeout=900)
        assert result.returncode == expect, result.stdout + result.stderr
        assert "Traceback" not in result.stderr
        return result

    chameleon("index", "build", "--knnlm", "--corpus", corpus, "--out", tmp_path / "store", "--nlist", 8)
    assert json.loads((tmp_path / "store" / "knnlm.json").read_text())["keys"] > 3000
    assert "give --corpus" in chameleon("index", "build", "--knnlm", "--vectors", corpus, "--out", tmp_path / "x", expect=2).stderr
    result = json.loads(
        chameleon(
            "bench", "knnlm", "--corpus", corpus, "--k", 8, "--lambda", "0.25,0.5", "--temperature", 10, "--json", tmp_path / "r.json"
        ).stdout
    )
    assert set(result) >= {"ppl_base", "ppl_knnlm", "lambda", "k"}
    assert result["ppl_knnlm"] < result["ppl_base"]
    assert result["lambda"] in (0.25, 0.5) and len(result["validation_sweep"]) == 2
    assert json.loads((tmp_path / "r.json").read_text()) == result
