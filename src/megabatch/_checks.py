"""Argument validation for the public losses.

Every check reads only shapes, dtypes and devices: nothing here synchronises with the device or
looks at values (a NaN feature gives a NaN loss, as documented).
"""
from __future__ import annotations

import numbers
from typing import Optional

import torch

from ._numerics import compute_dtype

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
DIRECTION_NAMES = ("both", "image_to_text", "text_to_image")


def check_features(image_features: object, text_features: object, *, allow_empty: bool = False) -> None:
    """Shapes, dtypes and devices of the two feature blocks: (b, D) images and (n, D) texts, b and n
    independent. `allow_empty` lets a distributed strategy check the *global* batch itself, on every
    rank at once (a raise here would leave the others hanging)."""
    for name, t in (("image_features", image_features), ("text_features", text_features)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape (batch, dim), got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D (batch, dim), got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
        if t.shape[0] == 0 and not allow_empty:
            raise ValueError(f"{name} is an empty batch (shape {tuple(t.shape)}); need at least one row")
        if t.shape[1] == 0:
            raise ValueError(f"{name} has feature dim 0 (shape {tuple(t.shape)})")
    assert isinstance(image_features, torch.Tensor) and isinstance(text_features, torch.Tensor)
    if image_features.shape[1] != text_features.shape[1]:
        raise ValueError(
            f"image_features and text_features must have the same feature dim, got "
            f"{image_features.shape[1]} and {text_features.shape[1]}"
        )
    if image_features.dtype != text_features.dtype:
        raise TypeError(
            f"image_features and text_features must share a dtype, got {image_features.dtype} "
            f"and {text_features.dtype}"
        )
    if image_features.device != text_features.device:
        raise ValueError(
            f"image_features and text_features must be on the same device, got "
            f"{image_features.device} and {text_features.device}"
        )


def check_ids(image_ids: object, text_ids: object, image_features: torch.Tensor, text_features: torch.Tensor) -> bool:
    """Both ids or neither; each an int64 vector with one entry per row of its features, on their
    device. Returns whether ids are given."""
    if image_ids is None and text_ids is None:
        return False
    if image_ids is None or text_ids is None:
        missing = "image_ids" if image_ids is None else "text_ids"
        raise ValueError(f"give both image_ids and text_ids or neither; {missing} is missing")
    for name, ids, feats in (("image_ids", image_ids, image_features), ("text_ids", text_ids, text_features)):
        if not isinstance(ids, torch.Tensor):
            raise ValueError(f"{name} must be an int64 torch.Tensor of shape ({feats.shape[0]},), got {type(ids).__name__}")
        if ids.dtype != torch.int64:
            raise ValueError(f"{name} must be int64, got {ids.dtype}")
        if ids.shape != (feats.shape[0],):
            which = "image_features" if name == "image_ids" else "text_features"
            raise ValueError(f"{name} must have shape ({feats.shape[0]},) (one id per row of {which}), got {tuple(ids.shape)}")
        if ids.device != feats.device:
            raise ValueError(f"{name} is on {ids.device} but the features are on {feats.device}")
    return True


def check_directions(directions: object) -> None:
    if not isinstance(directions, str) or directions not in DIRECTION_NAMES:
        raise ValueError(f"directions must be one of {DIRECTION_NAMES}, got {directions!r}")


def _type_name(value: object) -> str:
    """`value`'s type as a user would write it (float, numpy.float32), and an array's shape."""
    cls = type(value)
    module = cls.__module__.split(".")[0]
    name = cls.__name__ if module == "builtins" else f"{module}.{cls.__name__}"
    shape = getattr(value, "shape", None)
    return name if shape is None else f"{name} of shape {tuple(shape)}"


def _real_array(value: object) -> Optional[torch.Tensor]:
    """A 0-dim numpy array of a real dtype as a tensor, else None. numpy itself is not imported
    (megabatch does not need it); under torch.compile dynamo hands numpy scalars over as such arrays."""
    if type(value).__name__ != "ndarray" or getattr(value, "shape", None) != ():
        return None
    t = torch.as_tensor(value)
    return None if t.dtype == torch.bool or t.is_complex() else t


def real_number(value: object) -> Optional[float]:
    """`value` as a Python float if it is a real number of any kind (float, int, numpy.float32,
    numpy.int64, a 0-dim numpy array of such), else None. Booleans are not numbers here."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    array = _real_array(value)
    return None if array is None else float(array)


def as_scalar(name: str, value: object, like: torch.Tensor) -> torch.Tensor:
    """Return `value` as a 0-dim or 1-element tensor on `like`'s device. A real number of any kind
    (float, int, numpy scalar) becomes a constant in the compute dtype; a tensor is used as given."""
    if not isinstance(value, torch.Tensor):
        dtype = compute_dtype(like.dtype)
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return torch.tensor(float(value), dtype=dtype, device=like.device)
        array = _real_array(value)
        if array is None:
            raise TypeError(f"{name} must be a float (any real number: int, numpy.float32, ...) or a 0-dim "
                            f"floating tensor, got {_type_name(value)}")
        return array.to(dtype=dtype, device=like.device, copy=True)  # not the caller's buffer
    if value.numel() != 1 or value.dim() > 1:
        raise ValueError(f"{name} must be a scalar (0-dim tensor), got shape {tuple(value.shape)}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor, got {value.dtype}")
    if value.device != like.device:
        raise ValueError(f"{name} is on {value.device} but the features are on {like.device}")
    return value


def optional_ids(ids: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Ids as the kernels read them (contiguous), or None."""
    return None if ids is None else ids.contiguous()
