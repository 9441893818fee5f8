"""Chat generation for one or several models with the same prompt, seed and sampling.

`generate` returns the whole answer; `stream` yields text pieces as they are produced
and ends with a `Generation` holding the full text and the speed. Both apply the
tokenizer's chat template, seed torch before generating (so models given the same
seed and settings draw the same random numbers) and run without gradients.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Iterator, Union

import torch

Messages = Union[str, list[dict]]


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

    def generate_kwargs(self, tokenizer) -> dict:
        kwargs = {"max_new_tokens": self.max_new_tokens, "repetition_penalty": self.repetition_penalty,
                  "pad_token_id": pad_id(tokenizer)}
        if self.temperature > 0:
            kwargs.update(do_sample=True, temperature=self.temperature, top_p=self.top_p,
                          top_k=self.top_k or None)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kwargs


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


def chat_inputs(tokenizer, messages: Messages, device) -> dict:
    """Token ids for a conversation (a plain string is one user message)."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if tokenizer.chat_template:
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                return_dict=True)
    else:  # base models without a template: the conversation as plain text
        text = "\n".join(m["content"] for m in messages)
        encoded = tokenizer(text, return_tensors="pt")
    return {k: v.to(device) for k, v in encoded.items()}


def generate(model, tokenizer, messages: Messages, sampling: Sampling = Sampling(), **overrides) -> Generation:
    """The model's answer to `messages`."""
    result = None
    for piece in stream(model, tokenizer, messages, sampling, **overrides):
        if isinstance(piece, Generation):
            result = piece
    return result


def stream(model, tokenizer, messages: Messages, sampling: Sampling = Sampling(), **overrides
           ) -> Iterator[Union[str, Generation]]:
    """Text pieces as they are generated, then one final `Generation`."""
    from transformers import TextIteratorStreamer

    if overrides:
        sampling = Sampling(**{**sampling.__dict__, **overrides})
    device = next(model.parameters()).device
    inputs = chat_inputs(tokenizer, messages, device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    outputs: dict = {}

    def run():
        try:
            torch.manual_seed(sampling.seed)
            with torch.no_grad():
                outputs["ids"] = model.generate(**inputs, **sampling.generate_kwargs(tokenizer), streamer=streamer)
        except BaseException as error:  # surface it in the caller's thread
            outputs["error"] = error
            streamer.end()

    started = time.perf_counter()
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    pieces = []
    for piece in streamer:
        if piece:
            pieces.append(piece)
            yield piece
    worker.join()
    if "error" in outputs:
        raise outputs["error"]
    new_tokens = outputs["ids"].shape[1] - inputs["input_ids"].shape[1]
    yield Generation("".join(pieces), int(new_tokens), time.perf_counter() - started)


def generate_many(models: dict, messages: Messages, sampling: Sampling = Sampling()) -> dict[str, Generation]:
    """The same prompt, seed and settings for several (model, tokenizer) pairs, by name."""
    return {name: generate(model, tokenizer, messages, sampling) for name, (model, tokenizer) in models.items()}


def load_model(folder, dtype: str = "auto", device: str = "cpu", trust_remote_code: bool = False):
    """A saved model and its tokenizer (a parent in the arena, or a merge written to disk)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    return model.to(device).eval(), tokenizer
