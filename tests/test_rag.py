"""Text corpora, the built-in models, the torch engine and passage RAG (real models, tiny corpora)."""

import json
import subprocess
import sys

import pytest

from chameleon.models import builtin_llm_path, resolve_model
from chameleon.rag.corpus import (
    Document,
    RagIndex,
    add_to_rag_index,
    build_rag_index,
    chunk,
    python_docs,
    read_corpus,
    remove_from_rag_index,
)
from retriever.errors import InvalidInput


def test_read_corpus_folder_and_jsonl(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# Reading files\nUse open().")
    (tmp_path / "docs" / "b.txt").write_text("plain text")
    (tmp_path / "docs" / "skip.bin").write_bytes(b"\x00")
    documents = read_corpus(tmp_path / "docs")
    assert [(d.id, d.title) for d in documents] == [("a.md", "Reading files"), ("b.txt", "b")]
    (tmp_path / "c.jsonl").write_text('{"id": 1, "title": "T", "text": "x"}\n\n{"id": 2, "text": "y"}\n')
    assert [(d.id, d.title) for d in read_corpus(tmp_path / "c.jsonl")] == [("1", "T"), ("2", "2")]
    (tmp_path / "bad.jsonl").write_text('{"title": "no id"}\n')
    with pytest.raises(InvalidInput, match="bad.jsonl:1"):
        read_corpus(tmp_path / "bad.jsonl")
    with pytest.raises(InvalidInput, match="a corpus is python-docs"):
        read_corpus(tmp_path / "missing")


def test_python_docs_is_the_stdlib_documentation():
    documents = {d.id: d for d in python_docs()}
    assert "pydoc:for" in documents and "module:json" in documents and "module:io" in documents
    assert "open" in documents["module:io"].text
    assert "open" in documents["module:builtins"].text
    assert len(documents) > 200


def test_chunks_are_token_windows_with_overlap(embedder):
    words = " ".join(f"word{n}" for n in range(400))
    passages = chunk([Document("d", "t", words, "s")], embedder.tokenizer, max_tokens=100, overlap=20)
    counts = [len(embedder.tokenizer(p.text, add_special_tokens=False)["input_ids"]) for p in passages]
    assert all(c <= 100 for c in counts) and len(passages) >= 3
    for first, second in zip(passages, passages[1:]):
        assert first.text.split()[-1] in second.text  # neighbours share their edge
    assert [p.id for p in passages] == list(range(len(passages)))
    with pytest.raises(InvalidInput, match="overlap"):
        chunk([], embedder.tokenizer, max_tokens=10, overlap=10)


def test_rag_index_round_trip_and_embedder_check(facts_index, embedder):
    rag = RagIndex(facts_index, embedder.fingerprint)
    assert rag.meta["passages"] == 300 and rag.index.ntotal == 300 and rag.index.params.metric == "cos"
    with pytest.raises(InvalidInput, match="was built with the embedder"):
        RagIndex(facts_index, "another-model:768")
    with pytest.raises(InvalidInput, match="rag.json is missing"):
        RagIndex(facts_index / "index")


def test_too_small_corpus_is_refused(tmp_path, embedder):
    (tmp_path / "tiny.jsonl").write_text('{"id": 1, "text": "hello"}\n')
    with pytest.raises(InvalidInput, match="at least 256"):
        build_rag_index(tmp_path / "tiny.jsonl", tmp_path / "out", embedder)
    assert not (tmp_path / "out").exists()


def test_builtin_llm_is_converted_once(engine):
    path = builtin_llm_path()
    assert (path / "model.safetensors").is_file() and (path / "chameleon-source.json").is_file()
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert builtin_llm_path() == path and (path / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(InvalidInput, match="not a Hugging Face model directory"):
        resolve_model("/nonexistent/model")


def test_torch_engine_greedy_equals_transformers_generate(engine):
    import torch

    tokens = engine.chat_tokens(
        [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Name three colours."}]
    )
    ours = engine.generate(tokens, max_new_tokens=24)
    reference = engine.model.generate(torch.tensor([tokens]), max_new_tokens=24, do_sample=False)[0, len(tokens) :].tolist()
    assert ours.tokens == reference[: len(ours.tokens)]
    assert ours.ttft_s > 0 and ours.prompt_tokens == len(tokens)
    prefix, _ = engine.prefill(tokens[:12])
    again = engine.generate(tokens, max_new_tokens=24, prefix=prefix)
    assert again.tokens == ours.tokens and again.cached_tokens == 12
    whole, _ = engine.prefill(tokens)
    assert engine.generate(tokens, max_new_tokens=24, prefix=whole).tokens == ours.tokens  # fully cached prompt
    with pytest.raises(InvalidInput, match="exceed the context window"):
        engine.generate(tokens, max_new_tokens=engine.context_window)
    with pytest.raises(InvalidInput, match="does not start with the cached prefix"):
        engine.prefill(tokens[1:], prefix)


def test_any_local_model_directory(tiny_model):
    """--model takes a local Hugging Face directory: here a tiny random Llama with the built-in tokenizer."""
    import torch

    from chameleon.engines.torch_engine import TorchEngine

    tiny = TorchEngine(tiny_model)
    tokens = tiny.chat_tokens([{"role": "user", "content": "hello"}])
    out = tiny.generate(tokens, max_new_tokens=8)
    reference = tiny.model.generate(torch.tensor([tokens]), max_new_tokens=8, do_sample=False)[0, len(tokens) :].tolist()
    assert out.tokens == reference[: len(out.tokens)] and tiny.context_window == 1024


def test_rag_answers_from_the_right_passage(facts_index, embedder, engine):
    from chameleon.rag.pipeline import RagPipeline

    pipeline = RagPipeline(RagIndex(facts_index, embedder.fingerprint), embedder, engine, k=3, nprobe=4)
    answer = pipeline.ask("What colour are the oceans of Zorblax-42?", max_new_tokens=16)
    best = next(s for s in answer.sources if s["doc_id"] == "fact-42")
    assert "Zorblax-42 has blue oceans" in best["snippet"]
    assert answer.answer
    assert {"embed_s", "coarse_s", "retrieval_s", "ttft_s", "decode_tokens_per_s"} <= set(answer.timings.as_dict())
    with pytest.raises(InvalidInput, match="question is empty"):
        pipeline.ask("   ")


def test_retrieval_interval_continues_the_same_answer_when_passages_stay(facts_index, embedder, engine, monkeypatch):
    from chameleon.rag.pipeline import RagPipeline

    pipeline = RagPipeline(RagIndex(facts_index, embedder.fingerprint), embedder, engine, k=3, nprobe=4)
    question = "Describe the planet Zorblax-17 in detail."
    once = pipeline.ask(question, max_new_tokens=24)
    first = pipeline.retrieve(question)
    queries = []
    real_retrieve = pipeline.retrieve

    def same_passages(query, timings=None, k=None, on_early=None):
        queries.append(query)
        real_retrieve(query, timings, k)  # the real retrieval runs; its answer is pinned to the first one
        return first

    monkeypatch.setattr(pipeline, "retrieve", same_passages)
    stepped = pipeline.ask(question, max_new_tokens=24, retrieval_interval=5)
    assert stepped.answer == once.answer
    assert stepped.timings.retrievals == len(queries) >= 2 and stepped.timings.passage_changes == 0
    assert all(q.startswith(question) for q in queries) and len(queries[-1]) > len(question)  # query = question + answer
    assert stepped.timings.reused_kv_tokens > 0
    with pytest.raises(InvalidInput, match="retrieval interval"):
        pipeline.ask(question, max_new_tokens=8, retrieval_interval=9)


def test_new_passages_rebuild_the_prompt(facts_index, embedder, engine, monkeypatch):
    from chameleon.rag.pipeline import RagPipeline

    pipeline = RagPipeline(RagIndex(facts_index, embedder.fingerprint), embedder, engine, k=2, nprobe=4)
    real_retrieve = pipeline.retrieve
    returned = []

    def shifting(query, timings=None, k=None, on_early=None):
        ranked = real_retrieve(query, timings, k)
        returned.append(ranked if not returned else ranked[::-1])  # later retrievals rank differently
        return returned[-1]

    monkeypatch.setattr(pipeline, "retrieve", shifting)
    answer = pipeline.ask("What colour are the oceans of Zorblax-42?", max_new_tokens=12, retrieval_interval=4)
    assert answer.timings.new_tokens > 4, "the answer ended before the second retrieval"
    assert answer.timings.passage_changes >= 1
    assert answer.timings.reused_kv_tokens > 0  # the system prompt and the template stay cached
    assert [s["doc_id"] for s in answer.sources] == [p.doc_id for p, _ in returned[-1]]  # the prompt's passages


def test_truncation_drops_the_lowest_ranked_passages(facts_index, embedder, engine, monkeypatch):
    from chameleon.rag.corpus import Passage
    from chameleon.rag.pipeline import RagPipeline

    pipeline = RagPipeline(RagIndex(facts_index, embedder.fingerprint), embedder, engine)
    passages = [Passage(n, f"d{n}", f"T{n}", "s", "lorem ipsum " * 40) for n in range(4)]
    full, kept = pipeline.prompt_tokens("q?", passages, 10)
    assert kept == 4
    monkeypatch.setattr(engine, "context_window", len(full) - 1)
    _, kept = pipeline.prompt_tokens("q?", passages, 10)
    assert kept == 3
    monkeypatch.setattr(engine, "context_window", 40)
    with pytest.raises(InvalidInput, match="leaves no room"):
        pipeline.prompt_tokens("q?", passages, 10)


def ask(*args, expect=0):
    result = subprocess.run([sys.executable, "-m", "chameleon", "ask", *map(str, args)], capture_output=True, text=True, timeout=900)
    assert result.returncode == expect, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    return result


def test_documents_added_to_a_passage_index_are_retrieved_and_removed_ones_are_not(facts_index, embedder, tmp_path):
    import shutil

    import numpy as np

    from retriever.search import Searcher

    index = tmp_path / "facts"
    shutil.copytree(facts_index, index)
    (tmp_path / "new.jsonl").write_text(
        json.dumps({"id": "quibblex", "title": "Quibblex-7", "text": "The moons of Quibblex-7 are made of solid copper."})
        + "\n"
        + json.dumps({"id": "snorf", "title": "Snorf", "text": "Snorf is a dance performed on glaciers at dawn."})
        + "\n"
    )
    meta = add_to_rag_index(index, tmp_path / "new.jsonl", embedder)
    assert meta["documents"] == 302 and meta["passages"] == 302
    assert meta["added"] == [{"corpus": str(tmp_path / "new.jsonl"), "documents": 2, "passages": 2}]
    rag = RagIndex(index, embedder.fingerprint)
    assert [(p.id, p.doc_id) for p in rag.passages[-2:]] == [(300, "quibblex"), (301, "snorf")]
    assert rag.passages[:300] == RagIndex(facts_index).passages  # what was there is kept as it was
    query = embedder.embed(["What are the moons of Quibblex-7 made of?"])
    ids = Searcher(rag.index, device="cpu").search(query, 3, rag.index.params.nlist).ids
    assert rag.passages_for(ids[0])[0].doc_id == "quibblex"
    with pytest.raises(InvalidInput, match="in .* already .*'quibblex'"):
        add_to_rag_index(index, tmp_path / "new.jsonl", embedder)
    assert RagIndex(index).index.ntotal == 302  # the refused addition changed nothing
    # the command line: documents to a passage index, and no vectors into it
    (tmp_path / "more.jsonl").write_text(json.dumps({"id": "zz", "title": "Zz", "text": "Zz sleeps."}) + "\n")
    subprocess.run(
        [sys.executable, "-m", "chameleon", "index", "add", "--index", str(index), "--corpus", str(tmp_path / "more.jsonl")],
        check=True,
        capture_output=True,
    )
    assert RagIndex(index).passages[-1].doc_id == "zz"
    # removing documents: their passages go, the later ones move up
    meta = remove_from_rag_index(index, ["quibblex", "fact-7"])
    assert meta["documents"] == 301 and meta["passages"] == 301 and meta["removed"] == [{"documents": 2, "passages": 2}]
    rag = RagIndex(index, embedder.fingerprint)
    assert [p.id for p in rag.passages] == list(range(301)) and {"quibblex", "fact-7"}.isdisjoint(p.doc_id for p in rag.passages)
    assert rag.passages[7].doc_id == "fact-8" and rag.passages[-1].doc_id == "zz"
    ids = Searcher(rag.index, device="cpu").search(query, 3, rag.index.params.nlist).ids
    assert "quibblex" not in [p.doc_id for p in rag.passages_for(ids[0])]
    snorf = embedder.embed(["Which dance is performed on glaciers at dawn?"])
    ids = Searcher(rag.index, device="cpu").search(snorf, 1, rag.index.params.nlist).ids
    assert rag.passages_for(ids[0])[0].doc_id == "snorf"  # passage ids and vector ids moved up together
    with pytest.raises(InvalidInput, match="not in .*'quibblex'"):
        remove_from_rag_index(index, ["quibblex"])
    subprocess.run(
        [sys.executable, "-m", "chameleon", "index", "remove", "--index", str(index), "--doc-id", "zz"], check=True, capture_output=True
    )
    assert RagIndex(index).passages[-1].doc_id == "snorf"
    np.save(tmp_path / "v.npy", np.zeros((2, 384), np.float32))
    for target, message in ((index, "add documents with --corpus"), (index / "index", "vectors of the passage index")):
        refused = subprocess.run(
            [sys.executable, "-m", "chameleon", "index", "add", "--index", str(target), "--vectors", str(tmp_path / "v.npy")],
            capture_output=True,
            text=True,
        )
        assert refused.returncode == 2 and message in refused.stderr


def test_ask_command(facts_index, tmp_path):
    out = json.loads(ask("What colour are the oceans of Zorblax-42?", "--index", facts_index, "--json", "--max-tokens", 12).stdout)
    assert set(out) == {"answer", "sources", "timings"}
    assert "fact-42" in [s["doc_id"] for s in out["sources"]]
    assert "empty" in ask("  ", "--index", facts_index, expect=2).stderr
    assert "rag.json is missing" in ask("q", "--index", tmp_path, expect=2).stderr
    assert "not a Hugging Face model directory" in ask("q", "--index", facts_index, "--model", tmp_path, expect=2).stderr
    sampled = [
        json.loads(ask("Zorblax-42?", "--index", facts_index, "--json", "--max-tokens", 12, "--temperature", 1.2, "--seed", 3).stdout)[
            "answer"
        ]
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1] != json.loads(ask("Zorblax-42?", "--index", facts_index, "--json", "--max-tokens", 12).stdout)["answer"]
    assert "temperature" in ask("q", "--index", facts_index, "--temperature", 3, expect=2).stderr


@pytest.mark.integration
def test_ask_python_docs_on_the_builtin_index():
    """The issue's acceptance question, on the built-in python-docs index (built on first use)."""
    out = json.loads(ask("How do I read a file line by line?", "--json", "--max-tokens", 48).stdout)
    assert out["answer"]
    assert out["sources"] and all(s["doc_id"].startswith(("module:", "pydoc:")) for s in out["sources"])
    assert any(word in " ".join(s["snippet"] + s["title"] for s in out["sources"]).lower() for word in ("line", "file"))


def test_ask_through_a_cluster_gives_the_in_process_sources(facts_index, tmp_path, embedder):
    from chameleon import cluster

    question = "What colour are the oceans of Zorblax-42?"
    local = json.loads(ask(question, "--index", facts_index, "--json", "--max-tokens", 8, "--nprobe", 2).stdout)
    cluster.up(facts_index / "index", 2, tmp_path / "state")
    try:
        remote = json.loads(
            ask(question, "--index", facts_index, "--cluster", tmp_path / "state", "--json", "--max-tokens", 8, "--nprobe", 2).stdout
        )
        assert remote["sources"] == local["sources"] and remote["answer"] == local["answer"]
        assert remote["timings"]["retrieval_partial"] is False
        other = tmp_path / "other.jsonl"
        other.write_text("".join(json.dumps({"id": n, "text": f"Fact number {n} about nothing."}) + "\n" for n in range(300)))
        build_rag_index(other, tmp_path / "other", embedder, nlist=4, m=48)
        refused = ask(question, "--index", tmp_path / "other", "--cluster", tmp_path / "state", expect=2).stderr
        assert "serves another index" in refused
    finally:
        cluster.down(tmp_path / "state")


def test_a_passage_has_the_same_tokens_whatever_follows_it(tiny32):
    """The document KV cache keeps a passage's KV by its position: its tokens must not depend on
    how many passages come after it."""
    from chameleon.rag.corpus import Passage
    from chameleon.rag.pipeline import context_block, prompt_segments

    a, b, c = (Passage(n, f"doc-{n}", f"Title {n}", "test", f"Text of passage {n}.") for n in range(3))
    alone, followed, longer = (prompt_segments(tiny32, "Why?", chosen) for chosen in ([a], [a, b], [a, b, c]))
    assert alone[1] == followed[1] == longer[1] and followed[2] == longer[2]
    assert context_block([a, b]) == "[1] Title 0\nText of passage 0.\n\n[2] Title 1\nText of passage 1."
