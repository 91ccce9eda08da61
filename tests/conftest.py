import json

import numpy as np
import pytest

from chameleon.rag.corpus import build_rag_index
from retriever.build import build_index
from retriever.datasets import synthetic
from retriever.index import IVFPQParams


@pytest.fixture(scope="session")
def small_data():
    """20k clustered 32-d vectors and 200 queries (l2)."""
    return synthetic(n=20_000, dim=32, nqueries=200, seed=0)


@pytest.fixture(scope="session", params=["l2", "ip", "cos"])
def small_index(request, small_data):
    """A 64-list, 8-sub-quantizer index of ``small_data`` for each metric."""
    params = IVFPQParams(request.param, small_data.dim, nlist=64, m=8)
    return build_index(small_data.base, params, train_size=10_000, seed=7)


@pytest.fixture(scope="session")
def l2_index(small_data):
    return build_index(small_data.base, IVFPQParams("l2", small_data.dim, nlist=64, m=8), train_size=10_000, seed=7)


@pytest.fixture(scope="session")
def tiny_hdf5(tmp_path_factory, small_data):
    """An ann-benchmarks file: 8,000 of ``small_data``'s vectors, 100 queries, exact top-100."""
    from retriever.datasets import exact_knn
    from tests.helpers import write_ann_hdf5

    path = tmp_path_factory.mktemp("data") / "tiny-euclidean.hdf5"
    base, queries = small_data.base[:8000], small_data.queries[:100]
    write_ann_hdf5(path, base, queries, exact_knn(base, queries, 100, "l2"), "euclidean")
    return path


@pytest.fixture
def rng():
    return np.random.default_rng(123)


COLOURS = ["red", "green", "blue", "amber", "violet", "teal", "coral", "ivory", "olive", "indigo"]


@pytest.fixture(scope="session")
def embedder():
    from chameleon.rag.embedder import Embedder

    return Embedder()


@pytest.fixture(scope="session")
def engine():
    from chameleon.engines.torch_engine import TorchEngine

    return TorchEngine()


@pytest.fixture(scope="session")
def facts_corpus(tmp_path_factory):
    """300 one-line documents, each stating one made-up fact."""
    path = tmp_path_factory.mktemp("corpus") / "facts.jsonl"
    with open(path, "w") as f:
        for n in range(300):
            colour = COLOURS[n % len(COLOURS)]
            text = f"The planet Zorblax-{n} has {colour} oceans and {n + 3} moons orbiting it."
            f.write(json.dumps({"id": f"fact-{n}", "title": f"Zorblax-{n}", "text": text}) + "\n")
    return path


@pytest.fixture(scope="session")
def facts_index(tmp_path_factory, facts_corpus, embedder):
    out = tmp_path_factory.mktemp("rag") / "facts"
    build_rag_index(facts_corpus, out, embedder, nlist=4, m=48)
    return out


@pytest.fixture(scope="session")
def rag_index(facts_index, embedder):
    """The facts corpus opened for RAG."""
    from chameleon.rag.corpus import RagIndex

    return RagIndex(facts_index, embedder.fingerprint)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny random-initialised Llama with the built-in tokenizer: fast, and a real model directory."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from chameleon.models import builtin_llm_path

    tokenizer = AutoTokenizer.from_pretrained(builtin_llm_path())
    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny32(tmp_path_factory, tiny_model):
    """The tiny model in float32 with larger random weights, so that positions, masks and KV change its tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chameleon.engines.torch_engine import TorchEngine

    path = tmp_path_factory.mktemp("models") / "tiny-sharp"
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0, 0.3)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(path)
    return TorchEngine(path, dtype="float32")
