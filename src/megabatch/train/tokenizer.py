"""Tokenizers for the built-in text tower: word-level (from a dataset's vocabulary) or byte-level.

Both return (n, context_length) int64 ids: position 0 is <cls> (the text tower pools there), then
the tokens, then <pad> (id 0). Text longer than the context is truncated. Ids: 0 <pad>, 1 <cls>,
2 <unk> (word level: any word outside the vocabulary), then the vocabulary or the 256 byte values.
"""
from __future__ import annotations

import re
from typing import Any, Optional

import torch
from torch import Tensor

PAD, CLS, UNK = 0, 1, 2
_WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


class Tokenizer:
    """Word-level when `vocabulary` is given, else byte-level (UTF-8)."""

    def __init__(self, context_length: int, vocabulary: Optional[list[str]] = None):
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (<cls> plus one token), got {context_length}")
        self.context_length = context_length
        self.vocabulary = None if vocabulary is None else list(vocabulary)
        self._ids = None if vocabulary is None else {w: i + 3 for i, w in enumerate(self.vocabulary)}
        self._cache: dict[str, list[int]] = {}

    @property
    def vocab_size(self) -> int:
        return 3 + (256 if self._ids is None else len(self._ids))

    def _encode(self, text: str) -> list[int]:
        ids = self._cache.get(text)
        if ids is None:
            if self._ids is None:
                body = [3 + b for b in text.encode("utf-8")]
            else:
                body = [self._ids.get(w, UNK) for w in _WORD.findall(text.lower())]
            ids = [CLS] + body[: self.context_length - 1]
            ids += [PAD] * (self.context_length - len(ids))
            if len(self._cache) < 100_000:
                self._cache[text] = ids
        return ids

    def __call__(self, texts: list[str]) -> Tensor:
        """(n, context_length) int64 token ids for n texts."""
        if not texts:
            return torch.zeros(0, self.context_length, dtype=torch.long)
        return torch.tensor([self._encode(t) for t in texts], dtype=torch.long)

    def state_dict(self) -> dict[str, Any]:
        return {"context_length": self.context_length, "vocabulary": self.vocabulary}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "Tokenizer":
        return cls(state["context_length"], state["vocabulary"])
