"""What a cancellable prefill costs: the prompt in chunks of ``PREFILL_CHUNK`` tokens against one pass.

A speculative prefill (``coordinator.speculation``) runs in chunks so that it can be cut short when
the final top-k differs; a confirmed one pays whatever chunking costs. The prompts are the Python
documentation's own text (pydoc topics), as long as RAG prompts of 2-5 passages; the built-in
model (or ``--model``), median of ``--repeats`` prefills each.

    python benchmarks/prefill_chunks.py [--lengths 300,700,1100] [--chunks 128,256,512] [--repeats 5] [--model HF_DIR]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pydoc_data.topics import topics

import chameleon.engines.torch_engine as llm


def median_seconds(engine, tokens: list[int], chunk: int | None, repeats: int) -> float:
    """Median prefill time of ``tokens`` in one pass (``chunk`` None) or in chunks of ``chunk`` tokens."""
    times = []
    for _ in range(repeats):
        if chunk is not None:
            llm.PREFILL_CHUNK = chunk
        started = time.perf_counter()
        engine.prefill(tokens, None, (lambda: False) if chunk is not None else None)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="300,700,1100")
    parser.add_argument("--chunks", default="128,256,512")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model", help="local HF model directory (default: built-in)")
    args = parser.parse_args()

    engine = llm.TorchEngine(args.model)
    text = "\n\n".join(topics[name] for name in sorted(topics))
    corpus = engine.tokenizer(text[:200_000])["input_ids"]
    chunks = [int(c) for c in args.chunks.split(",")]
    print(f"{engine.device}, prefill ms (median of {args.repeats}), chunked / one pass")
    print(f"{'tokens':>6} {'one pass':>9} " + " ".join(f"{f'chunks of {c}':>20}" for c in chunks))
    for length in map(int, args.lengths.split(",")):
        tokens = corpus[:length]
        engine.prefill(tokens)  # warm
        whole = median_seconds(engine, tokens, None, args.repeats)
        cells = []
        for chunk in chunks:
            seconds = median_seconds(engine, tokens, chunk, args.repeats)
            cells.append(f"{seconds * 1e3:>9.0f} ms {seconds / whole:>5.2f}x")
        print(f"{length:>6} {whole * 1e3:>6.0f} ms " + " ".join(f"{cell:>20}" for cell in cells))


if __name__ == "__main__":
    main()
