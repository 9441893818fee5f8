"""Chat generation for one or several models with the same prompt, seed and sampling.

`generate` returns the whole answer; `stream` yields text pieces as they are produced
and ends with a `Generation` holding the full text and the speed. Both apply the
tokenizer's chat template and run without gradients.

Every generation draws its random numbers from its own `torch.Generator` seeded with
`Sampling.seed`, never from torch's global one: a server answering several requests at
once gives the same tokens for the same seed and settings whatever else is running.
transformers samples with `torch.multinomial` on the global generator, so sampling here
is greedy decoding over logits the request's `GumbelSampler` has perturbed (exact, see
there); greedy decoding (temperature 0) is plain greedy.
"""

from __future__ import annotations

import queue
import shutil
import threading
import time
from dataclasses import dataclass
from typing import Iterator, Optional, Union

import torch

from .errors import MergeError
from .placement import input_device

Messages = Union[str, list[dict]]
THREAD_NAME = "mergelab-generate"
JOIN_SECONDS = 10.0  # a stopped generation ends within one forward pass; this bounds the wait


@dataclass
class Generation:
    text: str
    new_tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class Sampling:
    """Sampling settings shared by every pane; temperature 0 means greedy decoding."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int = 0

    def generate_kwargs(self, tokenizer, stop: Optional[threading.Event] = None) -> dict:
        """Arguments for `model.generate`: always greedy over the processed logits, so the
        model's own generation_config (SmolLM2's says do_sample=True) cannot bring back
        sampling from the global generator. The repetition penalty is left to transformers
        (it builds the same processor, before ours); the warpers and the noise are ours."""
        from transformers import (LogitsProcessorList, StoppingCriteriaList, TemperatureLogitsWarper,
                                  TopKLogitsWarper, TopPLogitsWarper)

        processors = LogitsProcessorList()
        if self.temperature > 0:
            if self.temperature != 1.0:
                processors.append(TemperatureLogitsWarper(self.temperature))
            if self.top_k:
                processors.append(TopKLogitsWarper(self.top_k))
            if self.top_p < 1.0:
                processors.append(TopPLogitsWarper(self.top_p))
            processors.append(GumbelSampler(self.seed))
        return {"max_new_tokens": self.max_new_tokens, "repetition_penalty": self.repetition_penalty,
                "pad_token_id": pad_id(tokenizer), "do_sample": False, "temperature": None, "top_p": None,
                "top_k": None, "logits_processor": processors,
                "stopping_criteria": StoppingCriteriaList([StopWhenSet(stop)] if stop is not None else [])}


class GumbelSampler:  # a transformers LogitsProcessor, not subclassed so this module imports light
    """Noise that makes greedy decoding an exact sample, drawn from one request's generator.

        token = argmax_i (s_i + g_i),  g_i = -log(-log u_i),  u_i ~ U(0, 1) independent

    is distributed as softmax(s) (the Gumbel-max trick), so with s the logits after the
    repetition penalty, 1/T and the top-k/top-p warpers, greedy picks a sample of
    softmax(s); tokens a warper removed stay at -inf and are never picked. One sampler per
    generation: its generator is seeded once and then moves on token by token."""

    def __init__(self, seed: int):
        self.seed = seed
        self.generator: Optional[torch.Generator] = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.generator is None:  # made where the logits are, which may not be the first layer's device
            self.generator = torch.Generator(device=scores.device).manual_seed(self.seed)
        uniform = torch.rand(scores.shape, generator=self.generator, device=scores.device, dtype=torch.float32)
        # u = 0 would give -inf noise; the smallest float keeps every token possible
        gumbel = -torch.log(-torch.log(uniform.clamp_min(torch.finfo(torch.float32).tiny)))
        return scores + gumbel.to(scores.dtype)


class StopWhenSet:  # a transformers StoppingCriteria
    """Ends generation at the next token once `event` is set (the request went away)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def pad_id(tokenizer) -> int:
    """The id that fills padding: the pad token, or end-of-sequence when there is none."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def pad_batch(sequences, value: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Token sequences as one (batch, width) tensor filled with `value`, and its attention mask.
    Left padding makes every prompt end where generation starts."""
    width = max(len(sequence) for sequence in sequences)
    ids = torch.full((len(sequences), width), value, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        span = slice(width - len(sequence), width) if left else slice(0, len(sequence))
        ids[row, span] = torch.as_tensor(sequence, dtype=torch.long)
        mask[row, span] = 1
    return ids, mask


def chat_inputs(tokenizer, messages: Messages, device, max_prompt_tokens: Optional[int] = None) -> dict:
    """Token ids for a conversation (a plain string is one user message); a prompt longer
    than `max_prompt_tokens` is refused here, before any forward pass."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if tokenizer.chat_template:
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                return_dict=True)
    else:  # base models without a template: the conversation as plain text
        text = "\n".join(m["content"] for m in messages)
        encoded = tokenizer(text, return_tensors="pt")
    length = encoded["input_ids"].shape[1]
    if max_prompt_tokens is not None and length > max_prompt_tokens:
        raise MergeError(f"the prompt is {length} tokens; the limit is {max_prompt_tokens}")
    return {k: v.to(device) for k, v in encoded.items()}


def generate(model, tokenizer, messages: Messages, sampling: Sampling = Sampling(),
             max_prompt_tokens: Optional[int] = None, **overrides) -> Generation:
    """The model's answer to `messages` (the text `stream` would end with), generated in the
    calling thread: torch's OpenMP threads run a forward pass up to twice as fast from a
    thread that is the only one using them (measured: benchmarks/bench_generation.py)."""
    if overrides:
        sampling = Sampling(**{**sampling.__dict__, **overrides})
    inputs = chat_inputs(tokenizer, messages, input_device(model), max_prompt_tokens)
    started = time.perf_counter()
    with torch.no_grad():
        ids = model.generate(**inputs, **sampling.generate_kwargs(tokenizer))
    new = ids[0, inputs["input_ids"].shape[1]:]
    return Generation(tokenizer.decode(new, skip_special_tokens=True), int(new.numel()),
                      time.perf_counter() - started)


def stream(model, tokenizer, messages: Messages, sampling: Sampling = Sampling(),
           max_prompt_tokens: Optional[int] = None, **overrides) -> Iterator[Union[str, Generation]]:
    """Text pieces as they are generated, then one final `Generation`.

    The model runs in a thread named THREAD_NAME that ends with the stream: closing the
    stream early (a cancelled request) stops generation at the next token and joins it."""
    if overrides:
        sampling = Sampling(**{**sampling.__dict__, **overrides})
    for _, piece in stream_many([(model, tokenizer)], messages, sampling, max_prompt_tokens):
        yield piece


class _QueueStreamer:  # a transformers BaseStreamer over TextStreamer's decoding
    """Puts (index, text) on a shared queue as the text is finalized, (index, None) at the end."""

    def __init__(self, tokenizer, index: int, shared: "queue.Queue"):
        from transformers import TextStreamer

        class Streamer(TextStreamer):
            def on_finalized_text(inner, text: str, stream_end: bool = False):
                if text:
                    shared.put((index, text))

        self.decoder = Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)

    def put(self, value):
        self.decoder.put(value)

    def end(self):
        self.decoder.end()


def stream_many(pairs: list, messages: Messages, sampling: Sampling = Sampling(),
                max_prompt_tokens: Optional[int] = None) -> Iterator[tuple[int, Union[str, Generation]]]:
    """The same prompt, seed and settings for several (model, tokenizer) pairs at once:
    (index, text piece) as each model produces it, interleaved, and (index, Generation)
    when that model is done. Each model runs in its own THREAD_NAME thread with its own
    seeded generator; closing the stream stops every generation at its next token and
    joins the threads. An error in one stops the others and is raised here."""
    inputs = []
    for model, tokenizer in pairs:  # every prompt checked before any forward pass
        inputs.append(chat_inputs(tokenizer, messages, input_device(model), max_prompt_tokens))
    shared: queue.Queue = queue.Queue()
    stop = threading.Event()
    outputs: list[dict] = [{} for _ in pairs]
    DONE = None

    def run(index: int, model, tokenizer, kwargs):
        try:
            with torch.no_grad():
                outputs[index]["ids"] = model.generate(**inputs[index], **kwargs,
                                                       streamer=_QueueStreamer(tokenizer, index, shared))
        except BaseException as error:  # surface it in the caller's thread
            outputs[index]["error"] = error
        finally:
            outputs[index]["seconds"] = time.perf_counter() - started
            shared.put((index, DONE))

    started = time.perf_counter()
    workers = [threading.Thread(target=run, name=THREAD_NAME, daemon=True,
                                args=(index, model, tokenizer, sampling.generate_kwargs(tokenizer, stop)))
               for index, (model, tokenizer) in enumerate(pairs)]
    for worker in workers:
        worker.start()
    pieces: list[list[str]] = [[] for _ in pairs]
    try:
        running = len(workers)
        while running:
            index, piece = shared.get()
            if piece is not DONE:
                pieces[index].append(piece)
                yield index, piece
                continue
            running -= 1
            workers[index].join()
            if "error" in outputs[index]:
                raise outputs[index]["error"]
            new_tokens = outputs[index]["ids"].shape[1] - inputs[index]["input_ids"].shape[1]
            yield index, Generation("".join(pieces[index]), int(new_tokens), outputs[index]["seconds"])
    finally:  # also when the consumer closes the stream early, or one model failed
        stop.set()
        for worker in workers:
            worker.join(JOIN_SECONDS)


def generate_many(models: dict, messages: Messages, sampling: Sampling = Sampling()) -> dict[str, Generation]:
    """The same prompt, seed and settings for several (model, tokenizer) pairs, by name."""
    return {name: generate(model, tokenizer, messages, sampling) for name, (model, tokenizer) in models.items()}


def load_model(folder, dtype: str = "auto", device: str = "cpu", trust_remote_code: bool = False,
               max_memory=None, offload_folder=None):
    """A saved model and its tokenizer (a parent in the arena, or a merge written to disk).
    With `max_memory` (see merging.placement) transformers places it with accelerate across
    the GPUs, CPU memory and files in a new folder under `offload_folder`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if max_memory is None:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=trust_remote_code)
        return model.to(device).eval(), tokenizer
    from .placement import delete_with, new_offload_folder

    offload = new_offload_folder(offload_folder)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=trust_remote_code,
                                                     device_map="auto", max_memory=dict(max_memory),
                                                     offload_folder=str(offload))
    except BaseException:
        shutil.rmtree(offload, ignore_errors=True)
        raise
    delete_with(model, offload)
    return model.eval(), tokenizer
