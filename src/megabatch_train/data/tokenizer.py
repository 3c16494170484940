"""Tokenizers for the built-in text tower: word-level (a dataset's vocabulary), subword (BPE) or bytes.

All return (n, context_length) int64 ids: position 0 is <cls> (the text tower pools there), then
the tokens, then <pad> (id 0). Text longer than the context is truncated. Ids: 0 <pad>, 1 <cls>,
2 <unk> (word level: any word outside the vocabulary), then the vocabulary or the 256 byte values.
`BpeTokenizer` (users' captions) is a byte-level BPE from the `tokenizers` package, trained on
training captions only, lower-cased; it never produces <unk>. Its JSON travels in the checkpoint.
"""
from __future__ import annotations

import contextlib
import math
import os
import re
from typing import Any, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor

PAD, CLS, UNK = 0, 1, 2
_WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


def words(text: str) -> list[str]:
    """The word-level tokenizer's words of `text` (lower-cased; a data source's vocabulary is made of them)."""
    return _WORD.findall(text.lower())


class _Padded:
    """What every tokenizer here shares: <cls> + the text's tokens, cut or padded with <pad> to a
    fixed context, cached per text. Subclasses say how a text becomes tokens (`_body`)."""

    def __init__(self, context_length: int):
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (<cls> plus one token), got {context_length}")
        self.context_length = context_length
        self._cache: dict[str, list[int]] = {}

    def _body(self, text: str) -> list[int]:
        raise NotImplementedError(f"{type(self).__name__} must say how a text becomes tokens")

    def _encode(self, text: str) -> list[int]:
        ids = self._cache.get(text)
        if ids is None:
            ids = [CLS] + self._body(text)[: self.context_length - 1]
            ids += [PAD] * (self.context_length - len(ids))
            if len(self._cache) < 100_000:
                self._cache[text] = ids
        return ids

    def __call__(self, texts: list[str]) -> Tensor:
        """(n, context_length) int64 token ids for n texts."""
        if not texts:
            return torch.zeros(0, self.context_length, dtype=torch.long)
        return torch.tensor([self._encode(t) for t in texts], dtype=torch.long)


class Tokenizer(_Padded):
    """Word-level when `vocabulary` is given, else byte-level (UTF-8)."""

    def __init__(self, context_length: int, vocabulary: Optional[list[str]] = None):
        super().__init__(context_length)
        self.vocabulary = None if vocabulary is None else list(vocabulary)
        self._ids = None if vocabulary is None else {w: i + 3 for i, w in enumerate(self.vocabulary)}

    @property
    def vocab_size(self) -> int:
        return 3 + (256 if self._ids is None else len(self._ids))

    def _body(self, text: str) -> list[int]:
        if self._ids is None:
            return [3 + b for b in text.encode("utf-8")]
        return [self._ids.get(w, UNK) for w in words(text)]

    def state_dict(self) -> dict[str, Any]:
        return {"context_length": self.context_length, "vocabulary": self.vocabulary}

    def lengths(self, texts: Sequence[str]) -> list[int]:
        """Tokens each text needs, <cls> included (before truncation)."""
        if self._ids is None:
            return [1 + len(t.encode("utf-8")) for t in texts]
        return [1 + len(words(t)) for t in texts]

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "AnyTokenizer":
        if state.get("kind") == "bpe":
            return BpeTokenizer.from_state_dict(state)
        if state.get("kind") == "minilm":
            from ..models.minilm import MiniLMTokenizer

            return MiniLMTokenizer.from_state_dict(state)
        return cls(state["context_length"], state["vocabulary"])


BPE_VOCAB = 8192  # at most; a small caption set stops merging earlier
FIT_QUANTILE = 0.99  # the fitted context holds this fraction of the training captions whole
MAX_FIT = 77  # and is at most CLIP's context (longer captions are truncated and counted)
_SPECIALS = ("<pad>", "<cls>", "<unk>")


@contextlib.contextmanager
def _serial_tokenizers() -> Iterator[None]:
    """Run `tokenizers` on one thread: once its thread pool has run, every fork (DataLoader
    workers) prints a warning and disables it anyway."""
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if old is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


class BpeTokenizer(_Padded):
    """Byte-level BPE (`tokenizers`) with our <pad>=0, <cls>=1, <unk>=2 and a fixed context."""

    def __init__(self, context_length: int, model: Any):
        super().__init__(context_length)
        self.model = model
        self.fit: dict[str, Any] = {}  # training captions: how many, how many truncated, context fitted?

    @classmethod
    def train(cls, captions: Sequence[str], context_length: int = 0, vocab_size: int = BPE_VOCAB) -> "BpeTokenizer":
        """Learn merges from `captions`; context_length 0 fits FIT_QUANTILE of them (at most MAX_FIT)."""
        try:
            from tokenizers import Tokenizer as HfTokenizer
            from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers
        except ImportError as e:
            raise ImportError("captions of csv/wds data need the `tokenizers` package: pip install "
                              "'megabatch[train]' (or pip install tokenizers)") from e

        if not captions:
            raise ValueError("no training captions to learn a tokenizer from")
        model = HfTokenizer(models.BPE())
        model.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
        model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        model.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=list(_SPECIALS),
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        with _serial_tokenizers():
            model.train_from_iterator(list(captions), trainer)
        assert [model.token_to_id(t) for t in _SPECIALS] == [0, 1, 2]
        tok = cls(max(context_length, 2), model)
        lengths = tok.lengths(captions)
        if context_length == 0:
            tok.context_length = fit_context(lengths)
        tok.fit = {"captions": len(lengths), "truncated": sum(n > tok.context_length for n in lengths),
                   "fitted": context_length == 0}
        return tok

    @property
    def vocab_size(self) -> int:
        return self.model.get_vocab_size()

    def lengths(self, texts: Sequence[str]) -> list[int]:
        """Tokens each text needs, <cls> included (before truncation)."""
        with _serial_tokenizers():
            return [1 + len(e.ids) for e in self.model.encode_batch(list(texts))]

    def _body(self, text: str) -> list[int]:
        with _serial_tokenizers():
            return list(self.model.encode(text).ids)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "bpe", "context_length": self.context_length, "json": self.model.to_str(), "fit": self.fit}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "BpeTokenizer":
        from tokenizers import Tokenizer as HfTokenizer

        tok = cls(state["context_length"], HfTokenizer.from_str(state["json"]))
        tok.fit = dict(state.get("fit", {}))
        return tok

    def describe(self) -> str:
        fit, n = self.fit, self.fit.get("captions", 0)
        how = f"fits {FIT_QUANTILE:.0%} of them" if fit.get("fitted") else "as given"
        cut = f"; {fit['truncated']:,} of {n:,} truncated" if n else ""
        return (f"byte-level BPE, {self.vocab_size:,} tokens learnt from {n:,} training captions; context "
                f"{self.context_length} ({how}{cut})")


AnyTokenizer = Union[Tokenizer, BpeTokenizer]


def fit_context(lengths: Sequence[int]) -> int:
    """The context (<cls> included) that holds FIT_QUANTILE of texts of these lengths, in [2, MAX_FIT]."""
    if not lengths:
        return 2
    ordered = sorted(lengths)
    at = ordered[min(len(ordered) - 1, math.ceil(FIT_QUANTILE * len(ordered)) - 1)]
    return int(min(MAX_FIT, max(2, at)))


def truncation(tokenizer: Any, captions: Sequence[str]) -> dict[str, int]:
    """How many of `captions` the context cuts, and how many distinct captions it makes identical."""
    distinct = sorted(set(captions))
    lengths = tokenizer.lengths(distinct)
    count = dict(zip(distinct, lengths))
    cut = sum(count[c] > tokenizer.context_length for c in captions)
    ids = tokenizer(distinct) if distinct else torch.zeros(0, 1)
    merged = len(distinct) - len({tuple(r) for r in ids.tolist()})
    return {"captions": len(captions), "truncated": int(cut), "distinct": len(distinct), "merged": int(merged)}


def tokenizer_for(context_length: int, stream: Any, text_tower: str = "builtin") -> Any:
    """A fresh run's tokenizer for a training stream: MiniLM's for that tower, else BPE when it has
    users' captions."""
    if text_tower == "minilm":
        from ..models.minilm import MiniLMTokenizer

        return MiniLMTokenizer(context_length)
    captions = stream.training_captions() if hasattr(stream, "training_captions") else None
    return build_tokenizer(context_length, getattr(stream, "vocabulary", None), captions)


def build_tokenizer(context_length: int, vocabulary: Optional[list[str]], captions: Optional[Sequence[str]]) -> Any:
    """The tokenizer of a fresh run: BPE over `captions` (users' files), else word or byte level.
    A context_length of 0 is fitted to the captions (or to the vocabulary's longest caption)."""
    if captions is not None:
        return BpeTokenizer.train(captions, context_length)
    if context_length == 0:
        raise ValueError("context_length 0 (fit) needs training captions; give --context-length")
    return Tokenizer(context_length, vocabulary)
