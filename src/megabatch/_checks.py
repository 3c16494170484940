"""Argument validation for the public losses.

Every check reads only shapes, dtypes and devices: nothing here synchronises with the device or
looks at values (a NaN feature gives a NaN loss, as documented).
"""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype: float64 for float64 inputs, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_features(image_features: object, text_features: object, *, allow_empty: bool = False) -> None:
    """Shapes, dtypes and devices of the feature pair. `allow_empty` lets a distributed strategy
    report an empty batch itself, on every rank at once (a raise here would leave the others hanging)."""
    for name, t in (("image_features", image_features), ("text_features", text_features)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape (batch, dim), got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D (batch, dim), got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
        if t.shape[0] == 0 and not allow_empty:
            raise ValueError(f"{name} is an empty batch (shape {tuple(t.shape)}); need at least one pair")
        if t.shape[1] == 0:
            raise ValueError(f"{name} has feature dim 0 (shape {tuple(t.shape)})")
    assert isinstance(image_features, torch.Tensor) and isinstance(text_features, torch.Tensor)
    if image_features.shape[0] != text_features.shape[0]:
        raise ValueError(
            f"image_features and text_features must hold the same number of pairs, got "
            f"{image_features.shape[0]} and {text_features.shape[0]}"
        )
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


def as_scalar(name: str, value: object, like: torch.Tensor) -> torch.Tensor:
    """Return `value` as a 0-dim or 1-element tensor on `like`'s device (floats become constants)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
        raise TypeError(f"{name} must be a float or a 0-dim floating tensor, got {type(value).__name__}")
    if not isinstance(value, torch.Tensor):
        return torch.tensor(float(value), dtype=compute_dtype(like.dtype), device=like.device)
    if value.numel() != 1 or value.dim() > 1:
        raise ValueError(f"{name} must be a scalar (0-dim tensor), got shape {tuple(value.shape)}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor, got {value.dtype}")
    if value.device != like.device:
        raise ValueError(f"{name} is on {value.device} but the features are on {like.device}")
    return value
