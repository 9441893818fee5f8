"""Generation under a server: each request samples from its own generator, ends its thread
with itself, and refuses an over-long prompt before any forward pass."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from merging.errors import MergeError
from merging.generation import THREAD_NAME, Sampling, chat_inputs, generate, load_model, stream
from merging.routing import generate_routed
from tiny_models import tiny_tokenizer

PROMPT = "the cat sat"  # greedy decoding on the tiny base runs 24 tokens without an end token
SAMPLED = Sampling(max_new_tokens=24, temperature=0.9, top_k=40, top_p=0.95, seed=7)


@pytest.fixture(scope="module")
def base(tiny):
    return load_model(tiny["base"])


def count_forwards(model) -> list:
    """A list that grows by one on every forward pass of `model`."""
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    return calls


def generation_threads() -> list:
    return [t for t in threading.enumerate() if t.name == THREAD_NAME]


def without_end_token(folder):
    """The model with no end token, so only max_new_tokens (or a stop) ends an answer."""
    model, tokenizer = load_model(folder)
    model.generation_config.eos_token_id = None
    return model, tokenizer


def test_same_seed_same_tokens_alone_or_while_others_generate(base):
    model, tokenizer = base
    alone = generate(model, tokenizer, PROMPT, SAMPLED).text
    seeds = [7, 1, 7, 2, 7, 3]
    answers: dict = {}
    start = threading.Barrier(len(seeds) + 1)
    done = threading.Event()

    def answer(index, seed):
        start.wait()
        answers[index] = generate(model, tokenizer, PROMPT, SAMPLED, seed=seed).text

    def draw_from_the_global_generator():  # what other code in the process may do
        start.wait()
        while not done.is_set():
            torch.manual_seed(int(time.perf_counter_ns()) % 1000)
            torch.rand(1000)

    threads = [threading.Thread(target=answer, args=(i, s)) for i, s in enumerate(seeds)]
    threads.append(threading.Thread(target=draw_from_the_global_generator))
    for thread in threads:
        thread.start()
    for thread in threads[:-1]:
        thread.join()
    done.set()
    threads[-1].join()
    assert [answers[i] for i in (0, 2, 4)] == [alone] * 3
    assert len({answers[i] for i in (1, 3, 5)} | {alone}) == 4


def test_different_seeds_give_different_samples(base):
    model, tokenizer = base
    answers = {generate(model, tokenizer, PROMPT, SAMPLED, seed=seed).text for seed in range(5)}
    assert len(answers) == 5


def test_generation_leaves_the_global_generator_alone_even_when_the_model_asks_to_sample(tiny):
    model, tokenizer = load_model(tiny["base"])
    # SmolLM2-Instruct's generation_config.json says this; it must not bring back global sampling
    model.generation_config.do_sample, model.generation_config.temperature = True, 0.2
    model.generation_config.top_p = 0.9
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    sampled = generate(model, tokenizer, PROMPT, SAMPLED).text
    greedy = generate(model, tokenizer, PROMPT, Sampling(max_new_tokens=24)).text
    assert torch.equal(torch.random.get_rng_state(), state)
    assert sampled == generate(*load_model(tiny["base"]), PROMPT, SAMPLED).text  # the model's config is ignored
    inputs = chat_inputs(tokenizer, PROMPT, "cpu")
    plain = model.generate(**inputs, max_new_tokens=24, do_sample=False, pad_token_id=3)
    assert greedy == tokenizer.decode(plain[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_greedy_is_plain_greedy_token_for_token(base, penalty):
    model, tokenizer = base
    sampling = Sampling(max_new_tokens=24, repetition_penalty=penalty)
    inputs = chat_inputs(tokenizer, PROMPT, "cpu")
    plain = model.generate(**inputs, max_new_tokens=24, do_sample=False, repetition_penalty=penalty, pad_token_id=3)
    ours = model.generate(**inputs, **sampling.generate_kwargs(tokenizer))
    assert torch.equal(ours, plain)
    answer = generate(model, tokenizer, PROMPT, sampling)
    assert answer.text == tokenizer.decode(plain[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert answer.new_tokens == plain.shape[1] - inputs["input_ids"].shape[1] == 24


def test_sampler_frequencies_match_the_warped_softmax():
    """Many draws through the whole processor chain from one logits vector: each token's
    frequency is its probability under softmax(top-k(logits) / T) within 5 standard errors."""
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
    temperature, top_k, draws = 0.7, 5, 200_000
    processors = Sampling(temperature=temperature, top_k=top_k, seed=11).generate_kwargs(tiny_tokenizer())[
        "logits_processor"]
    scores = processors(torch.zeros((draws, 1), dtype=torch.long), logits.repeat(draws, 1))
    counts = torch.bincount(scores.argmax(-1), minlength=len(logits)).double()
    expected = torch.zeros(len(logits), dtype=torch.float64)
    expected[:top_k] = torch.softmax(logits[:top_k].double() / temperature, 0)
    error = (expected * (1 - expected) / draws).sqrt()
    assert counts[top_k:].sum() == 0  # tokens the warper removed are never drawn
    assert ((counts / draws - expected).abs() <= 5 * error + 1e-12).all(), (counts / draws, expected)
    assert expected[top_k - 1] > 0.03  # the rarest kept token is drawn thousands of times: the test has power


def test_closing_a_stream_stops_its_generation_within_a_token(tiny):
    model, tokenizer = without_end_token(tiny["base"])
    forwards = count_forwards(model)
    pieces = stream(model, tokenizer, PROMPT, Sampling(max_new_tokens=5000, temperature=1.0))
    assert isinstance(next(pieces), str)
    closed = time.perf_counter()
    pieces.close()  # what Gradio does when the request is cancelled
    while generation_threads() and time.perf_counter() - closed < 1.0:
        time.sleep(0.01)
    assert generation_threads() == []
    stopped_at = len(forwards)
    time.sleep(0.2)
    assert len(forwards) == stopped_at < 100  # not generating any more, and far from max_new_tokens


def test_a_finished_stream_leaves_no_thread_and_errors_reach_the_caller(base):
    model, tokenizer = base
    pieces = list(stream(model, tokenizer, PROMPT, Sampling(max_new_tokens=5)))
    assert pieces[-1].new_tokens == 5 and generation_threads() == []
    with pytest.raises(ValueError, match="strictly positive"):  # raised by transformers in the thread
        generate(model, tokenizer, PROMPT, Sampling(max_new_tokens=5, repetition_penalty=-1.0))
    assert generation_threads() == []


def test_a_long_prompt_is_refused_before_any_forward_pass(tiny):
    model, tokenizer = load_model(tiny["base"])
    forwards = count_forwards(model)
    length = chat_inputs(tokenizer, PROMPT, "cpu")["input_ids"].shape[1]
    message = f"^the prompt is {length} tokens; the limit is {length - 1}$"
    with pytest.raises(MergeError, match=message):
        generate(model, tokenizer, PROMPT, Sampling(max_new_tokens=5), max_prompt_tokens=length - 1)
    with pytest.raises(MergeError, match=message):
        next(stream(model, tokenizer, PROMPT, Sampling(max_new_tokens=5), max_prompt_tokens=length - 1))
    with pytest.raises(MergeError, match=message):
        generate_routed(model, tokenizer, PROMPT, Sampling(max_new_tokens=5), max_prompt_tokens=length - 1)
    assert forwards == [] and generation_threads() == []
    assert generate(model, tokenizer, PROMPT, Sampling(max_new_tokens=5), max_prompt_tokens=length).new_tokens == 5


@pytest.fixture(scope="module")
def tiny_mixtral(tmp_path_factory):
    from transformers import MixtralConfig, MixtralForCausalLM

    folder = tmp_path_factory.mktemp("mixtral")
    torch.manual_seed(0)
    config = MixtralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, num_local_experts=3, num_experts_per_tok=2, vocab_size=96,
                           max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    MixtralForCausalLM(config).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return load_model(folder)


def test_routed_answers_sample_from_their_own_generator(tiny_mixtral):
    model, tokenizer = tiny_mixtral
    first = generate_routed(model, tokenizer, PROMPT, SAMPLED)
    torch.manual_seed(999)  # the global generator has no say
    state = torch.random.get_rng_state()
    again = generate_routed(model, tokenizer, PROMPT, SAMPLED)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert again.tokens == first.tokens and again.text == generate(model, tokenizer, PROMPT, SAMPLED).text
    assert generate_routed(model, tokenizer, PROMPT, Sampling(max_new_tokens=24, temperature=0.9, seed=8)
                           ).tokens != first.tokens


def test_stream_many_interleaves_the_models_and_matches_each_alone(tiny):
    from merging.generation import Generation, stream_many

    pairs = [without_end_token(tiny["base"]), without_end_token(tiny["c1"])]
    alone = [generate(model, tokenizer, PROMPT, SAMPLED).text for model, tokenizer in pairs]
    order, finals = [], {}
    for index, piece in stream_many(pairs, PROMPT, SAMPLED):
        if isinstance(piece, Generation):
            finals[index] = piece
        else:
            order.append(index)
    assert [finals[i].text for i in range(2)] == alone  # each model's own seeded generator
    assert all(finals[i].new_tokens == 24 for i in range(2))
    first_done = min(len(order) - order[::-1].index(i) for i in range(2))
    assert set(order[:first_done]) == {0, 1}  # pieces of both arrive before either finishes
    assert not generation_threads()


def test_closing_stream_many_early_ends_every_thread(tiny):
    from merging.generation import stream_many

    pairs = [without_end_token(tiny["base"]), without_end_token(tiny["c2"])]
    pieces = stream_many(pairs, PROMPT, Sampling(max_new_tokens=5000, temperature=1.0))
    next(pieces)
    pieces.close()
    assert not generation_threads()
