"""Routers of a mixture of experts: built from prompts, and read back from a running model.

Building (one vector per expert per layer; layer l's router matrix is them stacked):

    hidden      v[l, e] = normalize(mean_{p in P_e} h_l(p) - mean_{n in N_e} h_l(n))
                where h_l(p) is the base model's hidden state entering layer l at the
                last token of prompt p (hidden_avg: averaged over p's tokens).
    cheap_embed v[l, e] = normalize(normalize(sum_{p in P_e} sum_t E[p_t])
                                    - normalize(sum_{n in N_e} sum_t E[n_t])), every l.
    random      v ~ N(0, 1);  uniform_random  v ~ U(-1/sqrt(H), 1/sqrt(H)).

A Mixtral router scores token x with softmax(V_l x), keeps the top k scores and
renormalizes them to sum to 1, so an expert is chosen by how well x lines up with
its prompts' direction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .generation import pad_batch
from .placement import input_device
from .moe_config import Expert

PROMPT_BATCH = 16  # prompts per forward pass: bounds activation memory on long lists
FLOAT32_LIMIT = 8 << 30  # run the base in float32 for hidden states when it fits in this


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Beginning-of-sequence (when the tokenizer has one), then the prompt's tokens."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + list(ids)


def normalize(vectors: torch.Tensor) -> torch.Tensor:
    return vectors / vectors.norm(dim=-1, keepdim=True).clamp(min=1e-8)


@torch.no_grad()
def hidden_states(model, tokenizer, prompts: list[str], average: bool) -> torch.Tensor:
    """Mean over `prompts` of the hidden state entering each layer, (layers, hidden).

    Prompts are batched with left padding; positions are counted from each prompt's
    first real token, so a padded prompt sees exactly what it would see alone."""
    device = input_device(model)
    total = None
    for start in range(0, len(prompts), PROMPT_BATCH):
        sequences = [prompt_ids(tokenizer, p) for p in prompts[start:start + PROMPT_BATCH]]
        ids, mask = pad_batch(sequences, 0, left=True)
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        output = model(input_ids=ids, attention_mask=mask, position_ids=positions, output_hidden_states=True)
        # hidden_states[l] enters layer l; the last entry is the final norm's output
        states = torch.stack(output.hidden_states[:-1]).float()  # (layers, batch, tokens, hidden)
        if average:
            real = mask.bool()[None, :, :, None]  # padded rows may hold NaN: select, not multiply
            summary = states.where(real, 0.0).sum(2) / real.sum(2)
        else:
            summary = states[:, :, -1]
        total = summary.sum(1) if total is None else total + summary.sum(1)
    return total.cpu() / len(prompts)


def embedding_direction(embeddings: torch.Tensor, tokenizer, prompts: list[str]) -> torch.Tensor:
    """normalize(sum over the prompts' tokens of their input embeddings), (hidden,)."""
    ids = torch.tensor([i for p in prompts for i in prompt_ids(tokenizer, p)], dtype=torch.long)
    return normalize(embeddings.index_select(0, ids).float().sum(0))


def gate_vectors(gate_mode: str, experts: list[Expert], num_layers: int, hidden_size: int, *,
                 tokenizer=None, model=None, embeddings: Optional[torch.Tensor] = None, seed: int = 0,
                 progress: Optional[Callable[[int, int], None]] = None) -> torch.Tensor:
    """Router weights, (layers, experts, hidden), float32; see the module docstring.

    hidden modes need `model` (the base, loaded) and `tokenizer`; cheap_embed needs the
    base's input `embeddings` and `tokenizer`; random modes need neither."""
    shape = (num_layers, len(experts), hidden_size)
    generator = torch.Generator().manual_seed(seed)
    if gate_mode == "random":
        return torch.randn(shape, generator=generator)
    if gate_mode == "uniform_random":
        bound = hidden_size ** -0.5
        return (torch.rand(shape, generator=generator) * 2 - 1) * bound
    vectors = []
    for index, expert in enumerate(experts):
        if gate_mode == "cheap_embed":
            direction = embedding_direction(embeddings, tokenizer, expert.positive_prompts)
            if expert.negative_prompts:
                direction = direction - embedding_direction(embeddings, tokenizer, expert.negative_prompts)
            direction = direction.expand(num_layers, hidden_size)
        else:
            average = gate_mode == "hidden_avg"
            direction = hidden_states(model, tokenizer, expert.positive_prompts, average)
            if expert.negative_prompts:
                direction = direction - hidden_states(model, tokenizer, expert.negative_prompts, average)
        vectors.append(normalize(direction))
        if progress:
            progress(index + 1, len(experts))
    return torch.stack(vectors, dim=1).contiguous()


def degenerate_layers(vectors: torch.Tensor, threshold: float = 5.0) -> list[int]:
    """Layers whose router rows are nearly linearly dependent (condition number above
    `threshold`): their experts cannot all be told apart, so some will be underused."""
    if vectors.shape[1] < 2:
        return []
    conditions = torch.linalg.cond(vectors.double())
    return [layer for layer, value in enumerate(conditions.tolist()) if not value <= threshold]


@dataclass
class RoutingTrace:
    """Where each token went: `weights[l, t, e]` is expert e's share of token t's MLP
    output at layer l (zero outside the top k; each row sums to 1), `probabilities` the
    router's full softmax."""

    weights: torch.Tensor
    probabilities: torch.Tensor

    @property
    def token_shares(self) -> torch.Tensor:
        """(tokens, experts): each expert's share of a token, averaged over layers."""
        return self.weights.mean(0)

    @property
    def token_experts(self) -> list[int]:
        """The expert with the largest share of each token."""
        return self.token_shares.argmax(-1).tolist()


@torch.no_grad()
def trace_routing(model, input_ids: torch.Tensor) -> RoutingTrace:
    """Run a Mixtral-style model over one sequence and read its routers' choices."""
    device = input_device(model)
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=device).reshape(1, -1)
    output = model(input_ids=ids, output_router_logits=True)
    logits = torch.stack([layer.float().reshape(ids.shape[1], -1) for layer in output.router_logits])
    probabilities = logits.softmax(-1)  # (layers, tokens, experts)
    top = probabilities.topk(model.config.num_experts_per_tok, dim=-1)
    weights = torch.zeros_like(probabilities).scatter(-1, top.indices, top.values)
    weights = weights / weights.sum(-1, keepdim=True)
    return RoutingTrace(weights.cpu(), probabilities.cpu())


@dataclass
class RoutedAnswer:
    """A generated answer with the routing of every token, prompt and answer."""

    text: str
    tokens: list[str]  # the answer's tokens, as text
    prompt_length: int
    trace: RoutingTrace  # over prompt + answer tokens

    @property
    def answer_experts(self) -> list[int]:
        return self.trace.token_experts[self.prompt_length:]

    @property
    def answer_shares(self) -> torch.Tensor:
        return self.trace.token_shares[self.prompt_length:]

    @property
    def last_prompt_token(self) -> torch.Tensor:
        """(layers, experts): the router's probabilities at the prompt's last token."""
        return self.trace.probabilities[:, self.prompt_length - 1]


@torch.no_grad()
def generate_routed(model, tokenizer, messages, sampling=None, max_prompt_tokens=None) -> RoutedAnswer:
    """Generate an answer, then read which experts each token was routed to (one more
    forward pass over the whole sequence, which sees the same states generation did).
    Sampling draws from the request's own generator (see merging.generation)."""
    from .generation import Sampling, chat_inputs

    sampling = sampling or Sampling()
    device = input_device(model)
    inputs = chat_inputs(tokenizer, messages, device, max_prompt_tokens)
    ids = model.generate(**inputs, **sampling.generate_kwargs(tokenizer))[0]
    return _routed_answer(model, tokenizer, ids, inputs["input_ids"].shape[1])


def stream_routed(model, tokenizer, messages, sampling=None, max_prompt_tokens=None):
    """The answer's text pieces as they are generated, then one `RoutedAnswer` (the same
    tokens generate_routed gives: same sampling, its own seeded generator). Generation runs
    in a merging.generation.THREAD_NAME thread; closing the stream early stops it at the
    next token and joins it."""
    import threading

    from transformers import TextIteratorStreamer

    from .generation import JOIN_SECONDS, THREAD_NAME, Sampling, chat_inputs

    sampling = sampling or Sampling()
    device = input_device(model)
    inputs = chat_inputs(tokenizer, messages, device, max_prompt_tokens)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    stop = threading.Event()
    kwargs = sampling.generate_kwargs(tokenizer, stop)
    outputs: dict = {}

    def run():
        try:
            with torch.no_grad():
                outputs["ids"] = model.generate(**inputs, **kwargs, streamer=streamer)
        except BaseException as error:  # surface it in the caller's thread
            outputs["error"] = error
            streamer.end()

    worker = threading.Thread(target=run, name=THREAD_NAME, daemon=True)
    worker.start()
    try:
        for piece in streamer:
            if piece:
                yield piece
        worker.join()
    finally:  # also when the consumer closes the stream early
        stop.set()
        worker.join(JOIN_SECONDS)
    if "error" in outputs:
        raise outputs["error"]
    with torch.no_grad():
        yield _routed_answer(model, tokenizer, outputs["ids"][0], inputs["input_ids"].shape[1])


def _routed_answer(model, tokenizer, ids: torch.Tensor, prompt_length: int) -> RoutedAnswer:
    """The generated sequence's answer, its tokens and the routing of every token."""
    answer = ids[prompt_length:]
    if len(answer) and answer[-1].item() in _end_ids(tokenizer, model):
        answer = answer[:-1]  # the end token ends the answer; it is not part of it
    ids = ids[:prompt_length + len(answer)]
    tokens = [tokenizer.decode([token]) for token in answer.tolist()]
    return RoutedAnswer(tokenizer.decode(answer, skip_special_tokens=True), tokens, prompt_length,
                        trace_routing(model, ids))


def _end_ids(tokenizer, model) -> set:
    ends = model.generation_config.eos_token_id
    ends = set(ends if isinstance(ends, list) else [ends]) if ends is not None else set()
    return ends | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())
