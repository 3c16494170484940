"""`megabatch train --model hf:PATH`: a Hugging Face CLIP/SigLIP-like dual encoder in the app.

PATH is either
  - a local pretrained directory (``save_pretrained``'s config.json + weights, with its own
    tokenizer files unless --tokenizer names another), loaded with ``local_files_only``; or
  - a config JSON (its ``model_type``: clip, siglip, ...) for a random initialisation; then
    --tokenizer names a local tokenizer directory, or ``app`` for the app's own tokenizer (word /
    BPE / bytes, as for the built-in towers, plus an end token the text tower pools at).
Nothing is downloaded (HF_HUB_OFFLINE=1 is set before transformers is imported).

`HFDualEncoder` gives the loop what it needs: ``encode_image`` (the app's images, as the data set
normalises them, go in as pixel_values; a pretrained model's own processor normalisation is not
re-applied), ``encode_text`` (token ids with -1 at padding: the mask is read from them, since CLIP
tokenizers pad with their end token), ``logit_scale`` (and ``logit_bias``) as the model's own
parameters. CLIP's 0-dim logit_scale becomes a 1-element parameter (FSDP2 refuses 0-dim ones);
``to_hf()`` gives it back in Hugging Face's shape, for ``save_pretrained``.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from .files import DataError

PIP_INSTALL = "pip install 'megabatch[hf]'"
PAD = -1  # padding positions in the ids HFDualEncoder.encode_text reads


def _transformers() -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import transformers
    except ImportError as e:
        raise DataError(f"--model hf:... needs transformers: {PIP_INSTALL}") from e
    transformers.logging.set_verbosity_error()
    return transformers


class HFDualEncoder(nn.Module):
    """A Hugging Face dual encoder (CLIPModel, SiglipModel, ...) with the app's tower interface."""

    def __init__(self, model: nn.Module, pretrained: bool):
        super().__init__()
        from ..integrations.hf import loss_family

        self.family = loss_family(model)
        self.pretrained = pretrained  # the loop keeps a pretrained model's logit_bias as it is
        if model.logit_scale.dim() == 0:
            model.logit_scale = nn.Parameter(model.logit_scale.detach().reshape(1))
        self.hf = model
        text = model.config.text_config
        self.pad_id = text.pad_token_id if text.pad_token_id is not None else 0
        # HF's SigLIP text towers were trained on max-length padding, attended to (its docs say so)
        self.masked = self.family == "clip"

    @property
    def logit_scale(self) -> Tensor:
        return self.hf.logit_scale

    @property
    def logit_bias(self) -> Optional[Tensor]:
        return getattr(self.hf, "logit_bias", None)

    def encode_image(self, images: Tensor) -> Tensor:
        return _pooled(self.hf.get_image_features(pixel_values=images))

    def encode_text(self, tokens: Tensor) -> Tensor:
        real = tokens != PAD
        ids = torch.where(real, tokens, torch.full_like(tokens, self.pad_id))
        mask = real.long() if self.masked else None
        return _pooled(self.hf.get_text_features(input_ids=ids, attention_mask=mask))

    def fsdp_units(self) -> list[nn.Module]:
        """The transformer layers of both towers (what FSDP2 shards one by one)."""
        return [m for m in self.hf.modules() if type(m).__name__.endswith("EncoderLayer")]

    def to_hf(self) -> nn.Module:
        """The wrapped model with logit_scale in Hugging Face's own shape (for save_pretrained)."""
        if self.family == "clip" and self.hf.logit_scale.shape == (1,):
            self.hf.logit_scale = nn.Parameter(self.hf.logit_scale.detach().reshape(()))
        return self.hf


def _pooled(out: Any) -> Tensor:
    return out if isinstance(out, Tensor) else out.pooler_output


class HFTokenizer:
    """A local Hugging Face tokenizer directory: list[str] -> (n, L) int64 with -1 at padding."""

    def __init__(self, path: str, context_length: int):
        tf = _transformers()
        try:
            self._tok = tf.AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise DataError(f"--tokenizer {path}: no Hugging Face tokenizer there ({e})") from e
        self.path, self.context_length = path, context_length
        self.vocab_size = len(self._tok)

    def __call__(self, texts: list[str]) -> Tensor:
        if not texts:
            return torch.zeros(0, self.context_length, dtype=torch.long)
        enc = self._tok(list(texts), padding="max_length", truncation=True, max_length=self.context_length,
                        return_tensors="pt")
        return enc["input_ids"].masked_fill(enc["attention_mask"] == 0, PAD)

    def describe(self) -> str:
        return f"Hugging Face tokenizer from {self.path} ({self.vocab_size:,} tokens); context {self.context_length}"

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "hf", "path": self.path, "context_length": self.context_length}


class AppTokenizer:
    """The app's own tokenizer for a randomly initialised HF text tower: its ids, with an end token
    (id = its vocabulary size, where CLIP's text tower pools) after the text (over its last token when
    the text fills the context), and -1 at padding."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.context_length = inner.context_length
        self.vocab_size = inner.vocab_size + 1
        self.end = inner.vocab_size

    def __call__(self, texts: list[str]) -> Tensor:
        from .tokenizer import PAD as APP_PAD

        ids = self.inner(texts)
        real = ids != APP_PAD
        out = torch.where(real, ids, torch.full_like(ids, PAD))
        out[torch.arange(len(ids)), real.sum(1).clamp(max=self.context_length - 1)] = self.end
        return out

    def describe(self) -> str:
        describe = getattr(self.inner, "describe", None)
        return (describe() if callable(describe) else type(self.inner).__name__) + " + an end token"

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "app+end", "inner": self.inner.state_dict() if hasattr(self.inner, "state_dict") else None}


def is_hf(source: str) -> bool:
    return source.startswith("hf:")


def image_size(source: str) -> int:
    """The vision tower's input size, read before the data is built (the app renders at that size)."""
    config = _config(source)[0]
    size = getattr(config.vision_config, "image_size", None)
    if not isinstance(size, int):
        raise DataError(f"--model {source}: its vision_config has no image_size (Siglip2's variable-size patches "
                        "are not supported by the app)")
    return size


def build(source: str, tokenizer_spec: Optional[str], context_length: int, stream: Any, loss: str,
          app_tokenizer: Any) -> tuple[HFDualEncoder, Any]:
    """The wrapped model and its tokenizer (see the module's docstring)."""
    tf = _transformers()
    config, pretrained, path = _config(source)
    if tokenizer_spec is None and not pretrained:
        raise DataError(f"--model {source} is a config (random initialisation): name its tokenizer with "
                        "--tokenizer DIR (a local Hugging Face tokenizer) or --tokenizer app (the app's own)")
    spec = tokenizer_spec or str(path)
    text = config.text_config
    length = min(context_length or 32, text.max_position_embeddings) if spec != "app" else None
    if spec == "app":
        tokenizer = AppTokenizer(app_tokenizer(stream))
        if pretrained:
            raise DataError("--tokenizer app builds a new vocabulary: it needs a config (random init), not a "
                            "pretrained directory")
        text.vocab_size = tokenizer.vocab_size
        text.eos_token_id = tokenizer.end
        text.pad_token_id = 0
        text.max_position_embeddings = max(text.max_position_embeddings, tokenizer.context_length)
    else:
        tokenizer = HFTokenizer(spec, length)
        if tokenizer.vocab_size > text.vocab_size:
            if pretrained:
                raise DataError(f"--tokenizer {spec} has {tokenizer.vocab_size} tokens but the model's text tower "
                                f"only {text.vocab_size}")
            text.vocab_size = tokenizer.vocab_size
        tok = tokenizer._tok
        if not pretrained:
            text.eos_token_id = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
            text.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    if pretrained:
        model = tf.AutoModel.from_pretrained(str(path), local_files_only=True)
    else:
        model = tf.AutoModel.from_config(config)
    if not pretrained and isinstance(getattr(model, "logit_bias", None), Tensor):
        with torch.no_grad():  # HF initialises SigLIP's scale at 0 (t = 1); the paper's t is 10 (the loop sets b)
            model.logit_scale.fill_(math.log(10.0))
    wrapped = HFDualEncoder(model, pretrained)
    if wrapped.family != loss:
        raise DataError(f"--model {source} is a {wrapped.family} model ({type(model).__name__}): train it with "
                        f"--loss {wrapped.family}")
    return wrapped, tokenizer


def _config(source: str) -> tuple[Any, bool, Path]:
    tf = _transformers()
    path = Path(source[len("hf:"):]).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise DataError(f"--model {source}: the directory has no config.json (a save_pretrained directory)")
        config, pretrained = tf.AutoConfig.from_pretrained(str(path), local_files_only=True), True
    elif path.is_file():
        try:
            fields = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise DataError(f"--model {source}: not a readable JSON config ({e})") from e
        kind = fields.pop("model_type", None) if isinstance(fields, dict) else None
        if not isinstance(kind, str):
            raise DataError(f"--model {source}: the config has no model_type (clip, siglip, ...)")
        try:
            config = tf.AutoConfig.for_model(kind, **fields)
        except (ValueError, KeyError) as e:
            raise DataError(f"--model {source}: transformers does not know model_type {kind!r} ({e})") from e
        pretrained = False
    else:
        raise DataError(f"--model {source}: no such directory or config file")
    if not hasattr(config, "vision_config") or not hasattr(config, "text_config"):
        raise DataError(f"--model {source}: model_type {config.model_type!r} is not a CLIP/SigLIP-like dual encoder "
                        "(its config has no vision_config and text_config)")
    return config, pretrained, path
