"""Vocabularies that differ: one output vocabulary, every model's token rows mapped onto it.

    tokenizer_source: base | <model> | union      (or mergekit's  tokenizer: {source: ...})

The output vocabulary is the donor's tokenizer (the base's, or the named model's), or
for `union` the base's followed by every token another model has and the base lacks
(added to the output tokenizer, so it encodes them). Each model's embedding and lm_head
rows are then matched by token, not by position. A token a model lacks takes the
base's row; if the base lacks it too, the row of the only model that has it; if several
have it, their mean. Rows past a tokenizer's vocabulary (padding rows) keep their place.

Models are wrapped (`AlignedCheckpoint`), so the merge reads every model's vocabulary
tensors with the output's rows and the engine needs no special case.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ..errors import MergeError
from .tensors import Checkpoint

MISSING = -1
PADDING = -2  # a row past the output tokenizer's tokens (tokenizer.pad_to_multiple_of)


_VOCABULARIES: dict = {}  # (folder, tokenizer file digest) -> vocabulary: live sessions re-plan often


def read_vocabulary(checkpoint: Checkpoint) -> Optional[tuple[dict[str, int], dict[str, bool]]]:
    """The tokenizer's token -> id map and, for added tokens, whether each is special; None
    when the model has no tokenizer files."""
    fingerprint = _tokenizer_fingerprint(checkpoint)
    if fingerprint is None:
        return None
    key = (str(checkpoint.folder), fingerprint)
    if key not in _VOCABULARIES:
        _VOCABULARIES[key] = _load_vocabulary(checkpoint.folder)
    return _VOCABULARIES[key]


def _load_vocabulary(folder) -> Optional[tuple[dict[str, int], dict[str, bool]]]:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception:
        return None
    added = {info.content: bool(info.special) for info in tokenizer.added_tokens_decoder.values()}
    return tokenizer.get_vocab(), added


@dataclass
class VocabularyAlignment:
    """The output vocabulary and, per model, which of its rows fills each output row."""

    rows: int
    sources: dict[str, torch.Tensor]  # model -> (rows,) source row per output row, MISSING where absent
    base: str
    new_tokens: list[tuple[str, bool]] = field(default_factory=list)  # union: (token, special) to add
    padded_from: Optional[int] = None  # rows from here on are padding: each model's mean token row
    _fills: dict = field(default_factory=dict, repr=False)

    def fill_rows(self, name: str, read_all) -> tuple[torch.Tensor, torch.Tensor]:
        """(row ids, their rows) for every output row some model lacks: the base's row, else
        the only model's that has it, else the mean of those that have it (zeros if none).
        `read_all()` gives every model's tensor; it is called once per tensor name, the first
        time a model of the merge reads that tensor."""
        cached = self._fills.get(name)
        if cached is not None:
            return cached
        raw = read_all()
        present = torch.stack([self.sources[m] != MISSING for m in self.sources])  # (models, rows)
        needed = (~present).any(0).nonzero().flatten()  # padding rows count as present: filled later
        width = next(iter(raw.values())).shape[1:]
        total = torch.zeros((len(needed),) + tuple(width))
        count = torch.zeros(len(needed))
        for model, source in self.sources.items():
            index = source[needed]
            has = index != MISSING
            total[has] += raw[model][index[has]].float()
            count[has] += 1
        fill = total / count.clamp(min=1).view(-1, *([1] * len(width)))
        base_index = self.sources[self.base][needed]
        from_base = base_index != MISSING
        fill[from_base] = raw[self.base][base_index[from_base]].float()
        self._fills = {name: (needed, fill)}  # one tensor's fills at a time: the models read it in turn
        return self._fills[name]


def align_vocabularies(checkpoints: dict[str, Checkpoint], models: list[str], base: str, donor: str,
                       union: bool, pad_to_multiple_of: Optional[int] = None) -> Optional[VocabularyAlignment]:
    """The alignment when the models' vocabularies differ (by token or by row count); None
    when they agree, or when a model has no tokenizer to match tokens by.

    With `pad_to_multiple_of` m (mergekit's tokenizer.pad_to_multiple_of) the output has
    exactly the output tokenizer's n tokens, then rows up to ceil(n / m) m, each model's
    padding rows being the mean of its n token rows (so the merge of them is the mean too)."""
    rows = {m: checkpoints[m].layout.vocabulary_rows(checkpoints[m].tensors) for m in models}
    if pad_to_multiple_of is None and len(set(rows.values())) == 1 and \
            len({_tokenizer_fingerprint(checkpoints[m]) for m in models}) == 1:
        return None  # the same rows and the same tokenizer files: nothing to align (and no tokenizer loaded)
    vocabularies = {m: read_vocabulary(checkpoints[m]) for m in models}
    if any(v is None for v in vocabularies.values()) or any(r is None for r in rows.values()):
        if union:
            missing = next(m for m in models if vocabularies[m] is None)
            raise MergeError(f"tokenizer_source union needs every model's tokenizer; '{missing}' has none")
        return None
    tokens = {m: v[0] for m, v in vocabularies.items()}
    same = all(tokens[m] == tokens[donor] and rows[m] == rows[donor] for m in models)
    if same and not union and pad_to_multiple_of is None:
        return None
    out_tokens = dict(tokens[donor])
    new_tokens: list[tuple[str, bool]] = []
    if union:
        for model in models:
            for token, index in sorted(tokens[model].items(), key=lambda item: item[1]):
                if token not in out_tokens and index < rows[model]:
                    out_tokens[token] = len(tokens[donor]) + len(new_tokens)
                    new_tokens.append((token, vocabularies[model][1].get(token, False)))
    real_rows = len(tokens[donor]) + len(new_tokens)
    padded_from = None
    if pad_to_multiple_of:
        out_rows = -(-real_rows // pad_to_multiple_of) * pad_to_multiple_of
        padded_from = real_rows
    else:
        out_rows = max(rows[donor], real_rows)
    by_row: list[Optional[str]] = [None] * out_rows
    for token, index in out_tokens.items():
        if index < out_rows:
            by_row[index] = token
    sources = {}
    for model in models:
        vocabulary, limit = tokens[model], rows[model]
        source = torch.full((out_rows,), MISSING, dtype=torch.long)
        for row, token in enumerate(by_row):
            if padded_from is not None and row >= padded_from:
                source[row] = PADDING
                continue
            index = vocabulary.get(token, MISSING) if token is not None else row  # padding rows keep their place
            source[row] = index if index < limit else MISSING
        sources[model] = source
    return VocabularyAlignment(out_rows, sources, base, new_tokens, padded_from)


def _tokenizer_fingerprint(checkpoint: Checkpoint) -> Optional[bytes]:
    """A digest of the model's main tokenizer file (None without one), read once per opened
    model: a live session plans every update, and hashing a 2 MB file each time cost 4 ms."""
    import hashlib

    if "tokenizer digest" not in checkpoint.memo:
        folder, digest = checkpoint.folder, None
        for name in ("tokenizer.json", "tokenizer.model", "vocab.json"):
            if folder is not None and (Path(folder) / name).is_file():
                digest = hashlib.sha256((Path(folder) / name).read_bytes()).digest()
                break
        checkpoint.memo["tokenizer digest"] = digest
    return checkpoint.memo["tokenizer digest"]


class AlignedCheckpoint(Checkpoint):
    """A model whose vocabulary tensors are read with the output vocabulary's rows."""

    def __init__(self, inner: Checkpoint, model: str, alignment: VocabularyAlignment,
                 others: dict[str, Checkpoint]):
        tensors = dict(inner.tensors)
        for name, info in inner.tensors.items():
            if inner.layout.is_vocabulary(name) and info.shape:
                tensors[name] = type(info)(name, info.dtype, (alignment.rows,) + tuple(info.shape[1:]), info.file,
                                           info.start, info.end)
        super().__init__(inner.reference, inner.folder, inner.config, tensors)
        self.inner, self.model, self.alignment, self.others = inner, model, alignment, others
        self.warnings = inner.warnings

    @property
    def has_weights(self) -> bool:
        return self.inner.has_weights

    def fetched(self) -> "AlignedCheckpoint":
        inner = self.inner.fetched()
        if inner is self.inner:
            return self
        self.others[self.model] = inner
        return AlignedCheckpoint(inner, self.model, self.alignment, self.others)

    def read(self, name: str) -> torch.Tensor:
        if not self.inner.layout.is_vocabulary(name) or name not in self.inner.tensors:
            return self.inner.read(name)
        own = self.inner.read(name)
        source = self.alignment.sources[self.model]
        out = torch.empty((self.alignment.rows,) + tuple(own.shape[1:]))
        present = source >= 0
        out[present] = own[source[present]].float()
        needed, fill = self.alignment.fill_rows(name, lambda: {
            m: c.read(name) if c.has(name) else c.read(_tied(c, name)) for m, c in self.others.items()})
        missing_here = source[needed] == MISSING
        out[needed[missing_here]] = fill[missing_here]
        padded_from = self.alignment.padded_from
        if padded_from is not None and padded_from < len(out):
            out[padded_from:] = out[:padded_from].mean(0)
        return out

    def release(self, name: str, first_byte: int = 0, end_byte: Optional[int] = None) -> None:
        if not self.inner.layout.is_vocabulary(name):
            self.inner.release(name, first_byte, end_byte)

    def prefetch(self, name: str) -> None:
        self.inner.prefetch(name)

    def close(self) -> None:
        self.inner.close()


def _tied(checkpoint: Checkpoint, name: str) -> str:
    alternative = checkpoint.layout.tied_head_source(name)
    if alternative is None:
        raise MergeError(f"model '{checkpoint.reference}' has no tensor '{name}'")
    return alternative


def extend_tokenizer(tokenizer, alignment: Optional[VocabularyAlignment]):
    """The donor's tokenizer with a union's new tokens added, in order (ids follow on);
    unchanged without them."""
    from tokenizers import AddedToken

    for token, special in alignment.new_tokens if alignment is not None else []:
        tokenizer.add_tokens([AddedToken(token, special=special, normalized=not special)], special_tokens=special)
    return tokenizer
