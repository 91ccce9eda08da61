"""Several answers to one prompt at once: prompt KV shared with running sequences vs prefilled each time.

The built-in model answers questions about the Python documentation from the built-in
python-docs index (k 4 passages), the way the server runs a request for ``n`` sampled choices:
one thread per choice calls ``RagPipeline.ask`` with its own seed, on one ``BatchingEngine``. With
``share_running_prompts`` (the default) a choice admitted while another is decoding starts from
that one's KV of the prompt; the peer, the same engine with it off, prefills every choice. Both
also answer ``n`` different questions at once, where only the chat template is shared: the cost
of looking. The settings take turns question by question. Reports time to first token (mean over
the choices and the last one) and the time until every choice is done.

    python benchmarks/shared_prompts.py [--n 4] [--questions 6] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

from chameleon.engines.batching import BatchingEngine
from chameleon.engines.sampling import Sampling
from chameleon.engines.torch_engine import TorchEngine
from chameleon.rag.corpus import RagIndex, builtin_rag_index
from chameleon.rag.embedder import Embedder
from chameleon.rag.pipeline import RagPipeline

QUESTIONS = [
    "How do I read a file line by line?",
    "What does the with statement do?",
    "How do I sort a list of dictionaries by a key?",
    "How do I parse command-line arguments?",
    "How do I run a shell command and capture its output?",
    "How do I format a date as a string?",
    "How do I read a CSV file?",
    "What is a generator?",
]


def burst(pipeline: RagPipeline, questions: list[str], max_tokens: int) -> dict:
    """Ask ``questions`` at once, one thread each, each sampled with its own seed."""
    ttft, ends = [None] * len(questions), [0.0] * len(questions)
    started = time.perf_counter()

    def ask(n: int) -> None:
        def first_token(token: int) -> bool:
            ttft[n] = ttft[n] or time.perf_counter() - started
            return False

        pipeline.ask(questions[n], max_tokens, on_token=first_token, sampling=Sampling(1.0, 0.95, n).sampler())
        ends[n] = time.perf_counter() - started

    threads = [threading.Thread(target=ask, args=(n,)) for n in range(len(questions))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"ttft_mean": statistics.mean(ttft), "ttft_last": max(ttft), "all_done": max(ends)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4, help="Choices per request.")
    parser.add_argument("--questions", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    embedder = Embedder()
    rag_index = RagIndex(builtin_rag_index(embedder), embedder.fingerprint)
    engine = TorchEngine()
    pipelines = {
        "shared": RagPipeline(rag_index, embedder, BatchingEngine(engine, 8), k=4),
        "prefilled each": RagPipeline(rag_index, embedder, BatchingEngine(engine, 8, share_running_prompts=False), k=4),
    }
    prompt = pipelines["shared"].prompt_tokens(QUESTIONS[0], [p for p, _ in pipelines["shared"].retrieve(QUESTIONS[0])], args.max_tokens)[0]
    print(
        f"built-in model on {engine.device}, python-docs, k 4 (a prompt of ~{len(prompt)} tokens), n {args.n}, "
        f"{args.max_tokens} new tokens each, {args.questions} questions, {time.strftime('%Y-%m-%d %H:%M')}"
    )
    rows = {(name, kind): [] for kind in ("one question", "different questions") for name in pipelines}
    burst(pipelines["shared"], QUESTIONS[:2], 4)  # warm up
    for q in range(args.questions):
        asked = {
            "one question": [QUESTIONS[q % len(QUESTIONS)]] * args.n,
            "different questions": [QUESTIONS[(q + i) % len(QUESTIONS)] for i in range(args.n)],
        }
        for name, kind in rows if q % 2 == 0 else reversed(rows):
            rows[name, kind].append(burst(pipelines[name], asked[kind], args.max_tokens))
    summary = {row: {key: statistics.median(r[key] for r in runs) for key in runs[0]} for row, runs in rows.items()}
    print(f"  {'':<36} {'TTFT mean':>10} {'TTFT last':>10} {'all done':>10}   (medians over questions, seconds)")
    for (name, kind), values in summary.items():
        print(f"  {kind + ', ' + name:<36} {values['ttft_mean']:10.3f} {values['ttft_last']:10.3f} {values['all_done']:10.3f}")
    for kind in ("one question", "different questions"):
        shared, each = summary["shared", kind], summary["prefilled each", kind]
        print(
            f"{kind}, prefilled each / shared: TTFT mean {each['ttft_mean'] / shared['ttft_mean']:.2f}x, "
            f"TTFT last {each['ttft_last'] / shared['ttft_last']:.2f}x, all done {each['all_done'] / shared['all_done']:.2f}x"
        )
    for pipeline in pipelines.values():
        pipeline.engine.close()


if __name__ == "__main__":
    main()
