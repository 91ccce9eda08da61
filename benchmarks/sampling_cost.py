"""What choosing a sampled token costs: ``chameleon.engines.sampling.Sampler.pick`` vs transformers' own sampling.

The logits are real: the built-in model (or ``--model``) answers questions about the Python
documentation, drawing each token at the temperature and top-p under test, and every step's
logits row is kept. The peer is what ``transformers`` does in ``generate(do_sample=True)``:
its ``TemperatureLogitsWarper`` and ``TopPLogitsWarper`` (a sort of the vocabulary), then
``torch.multinomial``. The two take turns on each row; the script reports microseconds per
token (median), the ratio, a decode step of one sequence for scale, and how often the most
likely 64 tokens already held ``top_p`` (ours sorts nothing then).

    python benchmarks/sampling_cost.py [--tokens 48] [--settings 1.0:1.0,0.7:0.9,1.0:0.95] [--model HF_DIR]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from chameleon.engines.sampling import NUCLEUS_FIRST_TRY, Sampler, Sampling
from chameleon.engines.torch_engine import TorchEngine

QUESTIONS = [
    "How do I read a file line by line in Python?",
    "What does the with statement do?",
    "Explain list comprehensions with an example.",
    "How do I sort a dictionary by value?",
]


def collect_logits(engine: TorchEngine, sampling: Sampler, tokens_each: int) -> tuple[list[torch.Tensor], float]:
    """Every step's logits row while the model answers ``QUESTIONS`` with ``sampling``, and the
    median seconds of one decode step."""
    rows, steps = [], []
    for question in QUESTIONS:
        state, logits = engine.prefill(engine.chat_tokens([{"role": "user", "content": question}]))
        cache = state.cache
        with torch.inference_mode():
            for _ in range(tokens_each):
                rows.append(logits.clone())
                token = sampling.pick(logits)
                started = time.perf_counter()
                out = engine.model(torch.tensor([[token]]), past_key_values=cache, use_cache=True)
                steps.append(time.perf_counter() - started)
                cache, logits = out.past_key_values, out.logits[0, -1]
    return rows, statistics.median(steps)


def transformers_pick(logits: torch.Tensor, temperature: float, top_p: float) -> int:
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    scores = TemperatureLogitsWarper(temperature)(None, logits.float()[None])
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return int(torch.multinomial(torch.softmax(scores, dim=-1), 1))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=48, help="tokens drawn per question")
    parser.add_argument("--settings", default="1.0:1.0,0.7:0.9,1.0:0.95", help="temperature:top_p pairs")
    parser.add_argument("--model", help="local HF model directory (default: built-in)")
    args = parser.parse_args()
    torch.manual_seed(0)
    engine = TorchEngine(args.model)
    print(f"{time.strftime('%Y-%m-%d')}, torch threads {torch.get_num_threads()}, model {engine.model.config._name_or_path or 'built-in'}")
    print("temperature  top_p  rows  ours (us)  transformers (us)  ratio  decode step (ms)  top-64 held top_p")
    for setting in args.settings.split(","):
        temperature, top_p = (float(x) for x in setting.split(":"))
        rows, step_s = collect_logits(engine, Sampling(temperature, top_p, seed=0).sampler(), args.tokens)
        ours, peer, held = [], [], 0
        sampling = Sampling(temperature, top_p, seed=1).sampler()
        for row in rows:
            for name in ("ours", "peer") if len(ours) % 2 else ("peer", "ours"):  # nobody always goes first
                started = time.perf_counter()
                sampling.pick(row) if name == "ours" else transformers_pick(row, temperature, top_p)
                (ours if name == "ours" else peer).append(time.perf_counter() - started)
            probabilities = torch.softmax(row.float() / temperature, dim=-1)
            held += int(torch.topk(probabilities, NUCLEUS_FIRST_TRY).values.sum() >= top_p)
        ours_us, peer_us = statistics.median(ours) * 1e6, statistics.median(peer) * 1e6
        nucleus = f"{held / len(rows):.0%}" if top_p < 1 else "-"
        print(
            f"{temperature:11.2f}  {top_p:5.2f}  {len(rows):4d}  {ours_us:9.0f}  {peer_us:17.0f}  {peer_us / ours_us:4.1f}x"
            f"  {step_s * 1e3:16.1f}  {nucleus:>17}"
        )


if __name__ == "__main__":
    main()
