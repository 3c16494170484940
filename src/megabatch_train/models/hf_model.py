"""`megabatch train --model hf:PATH`: a Hugging Face CLIP/SigLIP-like dual encoder in the app.

PATH is either
  - a local pretrained directory (``save_pretrained``'s config.json + weights, with its own
    tokenizer files unless --tokenizer names another), loaded with ``local_files_only``; or
  - a config JSON (its ``model_type``: clip, siglip, ...) for a random initialisation; then
    --tokenizer names a local tokenizer directory, or ``app`` for the app's own tokenizer (word /
    BPE / bytes, as for the built-in towers, plus an end token the text tower pools at).
Nothing is downloaded (HF_HUB_OFFLINE=1 is set before transformers is imported).

Images go in as the model's image processor makes them, in training and in evaluation, from every
data source: the size, resize and centre crop, rescale, mean and std of the directory's
``preprocessor_config.json`` (read with transformers' AutoImageProcessor, offline). Without one (a
pretrained directory saved without its processor, or a config JSON) they are CLIP's or SigLIP's
processor defaults at the vision tower's ``image_size``, and the run says so in one line. `pixels`
reads the processor; the data yields [0, 1] RGB at its output size, through its own resize and crop
(users' files) or drawn at its resize side and centre-cropped (the rendered sets; `types.Pixels`);
``HFDualEncoder.encode_image`` then applies its mean and std. These values come from the model
directory, not from the run's settings: a resumed run reads them again.

`HFDualEncoder` gives the loop what it needs: ``encode_image`` ([0, 1] images normalised as the
processor does, then pixel_values), ``encode_text`` (token ids with -1 at padding: the mask is read
from them, since CLIP tokenizers pad with their end token), ``logit_scale`` (and ``logit_bias``) as
the model's own parameters. CLIP's 0-dim logit_scale becomes a 1-element parameter (FSDP2 refuses 0-dim ones);
``to_hf()`` gives it back in Hugging Face's shape, for ``save_pretrained``.
"""
from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor, nn

from ..data.types import DataError, Pixels

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
    """A Hugging Face dual encoder (CLIPModel, SiglipModel, ...) with the app's tower interface.
    With `pixels`, encode_image takes [0, 1] images and normalises them as the processor does
    (non-persistent buffers: checkpoints hold only the model's own state); without, pixel_values."""

    def __init__(self, model: nn.Module, pretrained: bool, pixels: Optional[Pixels] = None):
        super().__init__()
        self.pixels = pixels
        if pixels is not None:
            self.register_buffer("pixel_mean", torch.tensor(pixels.mean).view(1, -1, 1, 1), persistent=False)
            self.register_buffer("pixel_std", torch.tensor(pixels.std).view(1, -1, 1, 1), persistent=False)
        from megabatch.integrations.hf import loss_family

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
        if self.pixels is not None:
            if self.pixels.scale != 1.0:
                images = images * self.pixels.scale
            images = (images - self.pixel_mean) / self.pixel_std
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
        from ..data.tokenizer import PAD as APP_PAD

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
    return _side(_config(source)[0], source)


def _side(config: Any, source: str) -> int:
    size = getattr(config.vision_config, "image_size", None)
    if not isinstance(size, int):
        raise DataError(f"--model {source}: its vision_config has no image_size (Siglip2's variable-size patches "
                        "are not supported by the app)")
    return size


class _Geometry:
    """PIL RGB image -> (3, S, S) uint8: the processor's own resize and centre crop, nothing else
    (a class, not a closure: DataLoader workers may receive it pickled)."""

    def __init__(self, processor: Any, size: int):
        self.processor, self.size = processor, size

    def __call__(self, image: Any) -> Tensor:
        out = self.processor(images=[image], do_rescale=False, do_normalize=False, return_tensors="np")
        x = np.asarray(out["pixel_values"][0])
        if x.shape != (3, self.size, self.size):
            raise DataError(f"the image processor made a {image.size[0]}x{image.size[1]} image {x.shape}, "
                            f"not (3, {self.size}, {self.size})")
        return torch.from_numpy(np.rint(x).clip(0, 255).astype(np.uint8))


def _get(size: Any, key: str) -> Any:
    """A field of a processor's size / crop_size (a dict, or transformers 5's SizeDict)."""
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def _triple(value: Any) -> tuple[float, ...]:
    values = [float(v) for v in (value if isinstance(value, (list, tuple)) else [value] * 3)]
    return tuple(values)


def pixels(source: str, announce: bool = False) -> Pixels:
    """How images become this model's input: its directory's image processor (preprocessor_config.json),
    else CLIP's / SigLIP's processor defaults at the vision tower's size. `announce`: print one line
    naming the size, mean and std (and where they come from)."""
    tf = _transformers()
    config, pretrained, path = _config(source)
    side = _side(config, source)
    saved = path / "preprocessor_config.json"
    if pretrained and saved.is_file():
        try:
            processor = tf.AutoImageProcessor.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"--model {source}: cannot read its image processor {saved} ({e})") from e
        origin = f": images go in as its {type(processor).__name__} ({saved.name}) makes them"
    else:
        family = "SigLIP" if "siglip" in str(config.model_type) else "CLIP"
        if family == "SigLIP":
            processor = tf.SiglipImageProcessor(size={"height": side, "width": side})
        else:
            processor = tf.CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
        why = "has no preprocessor_config.json" if pretrained else "is a config (random initialisation)"
        origin = f" {why}: images go in as {family}'s image processor defaults make them"
    value = functools.partial(getattr, processor)
    resize, crop = (value("do_resize", True), value("do_center_crop", False))
    edge, height, width = (_get(value("size", None) or {}, k) for k in ("shortest_edge", "height", "width"))
    if not resize:
        drawn = side
    elif edge:
        drawn = int(edge)
    elif height and width and height == width:
        drawn = int(height)
    else:
        raise DataError(f"--model {source}: its image processor resizes to {value('size', None)}; the app supports "
                        "a shortest edge or a square height and width")
    if crop:
        box = (_get(value("crop_size", None) or {}, "height"), _get(value("crop_size", None) or {}, "width"))
        if box != (side, side) or drawn < side:
            raise DataError(f"--model {source}: its image processor centre-crops {box[0]}x{box[1]} of a resize to "
                            f"{drawn}, but the vision tower takes {side}x{side} images")
    elif not resize or edge or drawn != side:
        raise DataError(f"--model {source}: its image processor (size {value('size', None)}, no centre crop) does "
                        f"not make every image {side}x{side}, the vision tower's size")
    normalise = value("do_normalize", True)
    mean = _triple(value("image_mean", 0.0)) if normalise else (0.0, 0.0, 0.0)
    std = _triple(value("image_std", 1.0)) if normalise else (1.0, 1.0, 1.0)
    scale = 255.0 * float(value("rescale_factor", 1 / 255)) if value("do_rescale", True) else 255.0
    out = Pixels(side, drawn, mean, std, _Geometry(processor, side), 1.0 if abs(scale - 1.0) < 1e-12 else scale)
    if announce:
        steps = [f"shortest edge resized to {drawn}" if edge else f"resized to {drawn}x{drawn}"] if resize else []
        steps += [f"centre crop {side}x{side}"] if crop else []
        steps += [f"mean ({', '.join(f'{m:g}' for m in mean)})", f"std ({', '.join(f'{s:g}' for s in std)})"]
        print(f"megabatch train: --model {source}{origin}: {', '.join(steps)}", flush=True)
    return out


def build(source: str, tokenizer_spec: Optional[str], context_length: int, stream: Any, loss: str,
          app_tokenizer: Any, pixels: Optional[Pixels] = None) -> tuple[HFDualEncoder, Any]:
    """The wrapped model and its tokenizer (see the module's docstring); `pixels`: what its images
    go through (see `pixels`)."""
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
    wrapped = HFDualEncoder(model, pretrained, pixels)
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
