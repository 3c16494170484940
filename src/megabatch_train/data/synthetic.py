"""Embedded image-caption pairs with compositional structure, rendered with numpy (no download).

Each image shows `count` (1-4) copies of one `shape` (5) in one `colour` (8), placed in one of the
four quadrants (`position`); its caption names all four, e.g. "three red circles in the top left".
A model has to read every word to match: 5 x 8 x 4 x 4 = 640 descriptions. A fixed 20% of the
combinations (chosen by a seeded permutation that leaves every value of every attribute in
training) never appear in training; evaluation uses only those, so it measures compositional
generalisation, not memorisation. Zero-shot classification picks one of all 640 descriptions
for each held-out image; scoring each attribute of the pick shows which words the model reads.

Sample i of training batch `step` depends only on (seed, step, i): a rank renders its own slice of
the global batch and a world of 1 or 8 ranks sees the same global batch; resuming needs only the
step. Rendering is vectorised (about 50 ms for 4,096 images of 32 x 32 on one core).
Images come out as float32 (n, 3, S, S), normalised to roughly zero mean and unit variance; for a
pretrained Hugging Face model (`pixels`), drawn in [0, 1] at its processor's resize side, then
centre-cropped to S (`types.Pixels`).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from .types import EvalData, Pixels, ZeroShotTask

SHAPES = ("circle", "square", "triangle", "cross", "diamond")
PLURALS = ("circles", "squares", "triangles", "crosses", "diamonds")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 240),
    "yellow": (235, 215, 40),
    "cyan": (40, 210, 220),
    "magenta": (210, 50, 210),
    "white": (235, 235, 235),
    "orange": (245, 140, 30),
}
COUNTS = ("one", "two", "three", "four")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
ATTRIBUTES = {"shape": SHAPES, "colour": tuple(COLOURS), "count": COUNTS, "position": POSITIONS}
HELD_OUT_FRACTION = 0.2
_SPLIT_SEED = 20240611  # the split is part of the dataset's definition, not of a run's seed
_RGB = np.array(list(COLOURS.values()), dtype=np.float32)


def caption(shape: int, colour: int, count: int, position: int) -> str:
    """The caption of one combination (count is an index: 0 means one object)."""
    noun = SHAPES[shape] if count == 0 else PLURALS[shape]
    return f"{COUNTS[count]} {tuple(COLOURS)[colour]} {noun} in the {POSITIONS[position]}"


def all_combinations() -> np.ndarray:
    """(640, 4) int64 rows of (shape, colour, count, position)."""
    grids = np.meshgrid(*(np.arange(len(v)) for v in ATTRIBUTES.values()), indexing="ij")
    return np.stack([g.ravel() for g in grids], axis=1)


def split_combinations() -> tuple[np.ndarray, np.ndarray]:
    """(train_combos, held_out_combos): a fixed split in which every attribute value stays in training."""
    combos = all_combinations()
    order = np.random.default_rng(_SPLIT_SEED).permutation(len(combos))
    n_out = int(round(HELD_OUT_FRACTION * len(combos)))
    held = np.zeros(len(combos), dtype=bool)
    held[order[:n_out]] = True
    for col, values in enumerate(ATTRIBUTES.values()):  # never hold out every combo of one value
        for v in range(len(values)):
            assert (~held & (combos[:, col] == v)).any()
    return combos[~held], combos[held]


def vocabulary() -> list[str]:
    """Every word any caption uses."""
    words = {w for c in all_combinations() for w in caption(*c).split()}
    return sorted(words)


def _sprites(size: int) -> np.ndarray:
    """(5, size, size) bool masks of the shapes, drawn on [-1, 1]^2 at pixel centres."""
    t = (np.arange(size) + 0.5) / size * 2 - 1
    v, u = np.meshgrid(t, t, indexing="ij")  # v: down, u: right
    return np.stack(
        [
            u**2 + v**2 <= 1.0,
            (np.abs(u) <= 0.75) & (np.abs(v) <= 0.75),
            (v <= 0.9) & (np.abs(u) <= (v + 1.0) * 0.5),
            ((np.abs(u) <= 0.2) | (np.abs(v) <= 0.2)) & (np.abs(u) <= 0.85) & (np.abs(v) <= 0.85),
            np.abs(u) + np.abs(v) <= 1.0,
        ]
    )


def render(attrs: np.ndarray, cells: np.ndarray, jitter: np.ndarray, tint: np.ndarray, size: int,
           unit: bool = False) -> Tensor:
    """Draw images from per-sample parameters.

    Args:
        attrs: (n, 4) int (shape, colour, count, position).
        cells: (n, 4) int, a permutation of the quadrant's 2 x 2 cells; object k uses cells[:, k].
        jitter: (n, 4, 2) int in {0, 1}, each object's offset inside its cell.
        tint: (n, 4) float, background level then the object colour's per-channel jitter.
        size: image side, a multiple of 4 and at least 24 (sprites of 5 px or more stay distinct).
        unit: RGB in [0, 1] instead of roughly zero mean and unit variance.
    Returns:
        (n, 3, size, size) float32.
    """
    n, cell = attrs.shape[0], size // 4
    sprite = cell - 1
    masks = _sprites(sprite).reshape(5, -1)
    offsets = (np.arange(sprite)[:, None] * size + np.arange(sprite)[None, :]).reshape(-1)
    occupied = np.zeros(n * size * size, dtype=bool)
    qy, qx = (attrs[:, 3] // 2) * (size // 2), (attrs[:, 3] % 2) * (size // 2)
    for k in range(4):
        # Flat pixel indices of object k's sprite box, kept where the sprite is drawn.
        cy = qy + (cells[:, k] // 2) * cell + jitter[:, k, 0]
        cx = qx + (cells[:, k] % 2) * cell + jitter[:, k, 1]
        base = np.arange(n) * (size * size) + cy * size + cx
        keep = masks[attrs[:, 0]] & (attrs[:, 2] >= k)[:, None]
        occupied[(base[:, None] + offsets[None, :])[keep]] = True
    colour = np.clip(_RGB[attrs[:, 1]] + tint[:, 1:], 0, 255)
    shift, scale = (0.0, 255.0) if unit else (80.0, 80.0)
    colour = torch.from_numpy(((colour - shift) / scale).astype(np.float32))[:, :, None, None]
    ground = torch.from_numpy(((tint[:, :1] - shift) / scale).astype(np.float32))[:, :, None, None]
    mask = torch.from_numpy(occupied).view(n, 1, size, size)
    return torch.where(mask, colour, ground)


def sample(rng: np.random.Generator, combos: np.ndarray, n: int, size: int) -> tuple[np.ndarray, tuple]:
    """Draw n samples' parameters (all cheap integers/floats): the attrs and render() arguments."""
    attrs = combos[rng.integers(0, len(combos), n)]
    cells = np.argsort(rng.random((n, 4)), axis=1)
    jitter = rng.integers(0, 2, (n, 4, 2))  # a sprite is 1 px smaller than its cell
    tint = np.concatenate([rng.uniform(0, 50, (n, 1)), rng.uniform(-12, 12, (n, 3))], axis=1).astype(np.float32)
    return attrs, (cells, jitter, tint)


class SyntheticShapes:
    """Training stream and held-out evaluation set of the embedded dataset.

    Args:
        image_size: side of the square images (multiple of 4, >= 24).
        seed: the run's seed; batch `step` is drawn from a generator keyed by (seed, step).
        eval_per_combo: held-out images per unseen combination.
        pixels: a pretrained model's image processor (then drawn at its resize side, see the module docstring).
    """

    name = "synthetic"

    def __init__(self, image_size: int = 32, seed: int = 0, eval_per_combo: int = 8, *,
                 pixels: Optional[Pixels] = None):
        drawn = pixels.resize if pixels is not None else image_size
        if drawn % 4 or drawn < 24:
            raise ValueError(f"image_size must be a multiple of 4 and >= 24 for synthetic data, got {drawn}")
        self.image_size, self.seed, self.eval_per_combo, self.pixels = image_size, seed, eval_per_combo, pixels
        self._drawn = drawn
        self.train_combos, self.held_out_combos = split_combinations()
        self.vocabulary = vocabulary()

    def batch(self, step: int, size: int, start: int, stop: int) -> tuple[Tensor, list[str]]:
        """Samples [start, stop) of global training batch `step` (of `size`): images (stop-start, 3, S, S), captions."""
        rng = np.random.default_rng([self.seed, step])
        attrs, (cells, jitter, tint) = sample(rng, self.train_combos, size, self._drawn)
        sl = slice(start, stop)
        images = self._render(attrs[sl], cells[sl], jitter[sl], tint[sl])
        return images, [caption(*a) for a in attrs[sl]]

    def _render(self, *params: np.ndarray) -> Tensor:
        if self.pixels is None:
            return render(*params, self._drawn)
        return self.pixels.from_unit(render(*params, self._drawn, unit=True))

    def eval_set(self) -> EvalData:
        combos = np.repeat(self.held_out_combos, self.eval_per_combo, axis=0)
        rng = np.random.default_rng([self.seed, 2**31 - 1])
        _, (cells, jitter, tint) = sample(rng, combos, len(combos), self._drawn)
        images = self._render(combos, cells, jitter, tint)
        # Zero-shot: which of all 640 descriptions is it? (prompts = the captions themselves; the
        # true ones were never trained on.) Each attribute of the predicted description is scored too.
        everything = all_combinations()
        index = {tuple(c): i for i, c in enumerate(everything.tolist())}
        labels = np.array([index[tuple(c)] for c in combos.tolist()], dtype=np.int64)
        names = [caption(*c) for c in everything]
        attributes = {attr: everything[:, col].copy() for col, attr in enumerate(ATTRIBUTES)}
        tasks = [ZeroShotTask("description", names, [[n] for n in names], labels, attributes)]
        about = f"{len(combos)} images of the {len(self.held_out_combos)} combinations never seen in training"
        return EvalData(images, [caption(*c) for c in combos], tasks, about)
