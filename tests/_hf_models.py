"""Tiny random Hugging Face dual encoders for the integration tests (no download, float64-able).

`build(kind)` makes a CLIPModel / SiglipModel / Siglip2Model with two-layer towers of width 16 and
sets logit_scale / logit_bias to non-trivial values (SigLIP's init leaves both at 0). `batch(kind, n,
seed)` draws matching inputs with padded, uneven-length texts (attention_mask), and `reference(model,
batch)` is Hugging Face's own loss: forward(..., return_loss=True) on the whole batch.
"""
from __future__ import annotations

import math

import torch

VOCAB, WIDTH, TEXT_LEN, IMAGE, PATCH = 40, 16, 7, 8, 4
KINDS = ("clip", "siglip", "siglip2")


def _tower() -> dict:
    return dict(hidden_size=WIDTH, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2)


def config(kind: str):
    import transformers as tf

    text = dict(_tower(), vocab_size=VOCAB, max_position_embeddings=TEXT_LEN,
                bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 1, pad_token_id=0)
    if kind == "clip":
        return tf.CLIPConfig(text_config=text, vision_config=dict(_tower(), image_size=IMAGE, patch_size=PATCH),
                             projection_dim=12)
    if kind == "siglip":
        return tf.SiglipConfig(text_config=text, vision_config=dict(_tower(), image_size=IMAGE, patch_size=PATCH))
    if kind == "siglip2":
        return tf.Siglip2Config(text_config=text, vision_config=dict(_tower(), num_patches=4, patch_size=PATCH))
    raise ValueError(kind)


def build(kind: str, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(seed)
    cls = {"clip": tf.CLIPModel, "siglip": tf.SiglipModel, "siglip2": tf.Siglip2Model}[kind]
    model = cls(config(kind)).to(dtype)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(10.0) if kind != "clip" else math.log(1 / 0.07))
        if hasattr(model, "logit_bias"):
            model.logit_bias.fill_(-2.5)
    return model


def batch(kind: str, n: int, seed: int, dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, TEXT_LEN + 1, (n,), generator=g)
    ids = torch.randint(1, VOCAB - 2, (n, TEXT_LEN), generator=g)
    mask = (torch.arange(TEXT_LEN)[None, :] < lengths[:, None]).long()
    ids = torch.where(mask.bool(), ids, torch.zeros_like(ids))
    ids[torch.arange(n), lengths - 1] = VOCAB - 1  # eos, where CLIP's text tower pools
    out: dict[str, torch.Tensor] = {"input_ids": ids}
    if kind == "clip":
        out["attention_mask"] = mask  # SigLIP's text tower takes no mask in HF's examples (padding="max_length")
    if kind == "siglip2":
        patches = (IMAGE // PATCH) ** 2
        out["pixel_values"] = torch.randn(n, patches, 3 * PATCH * PATCH, generator=g).to(dtype)
        out["pixel_attention_mask"] = torch.ones(n, patches, dtype=torch.long)
        out["spatial_shapes"] = torch.tensor([[IMAGE // PATCH, IMAGE // PATCH]] * n)
    else:
        out["pixel_values"] = torch.randn(n, 3, IMAGE, IMAGE, generator=g).to(dtype)
    return out


def rows(inputs: dict[str, torch.Tensor], a: int, b: int) -> dict[str, torch.Tensor]:
    return {k: v[a:b] for k, v in inputs.items()}


def reference(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Hugging Face's loss on the whole batch and every parameter's gradient (the model is left clean)."""
    model.zero_grad(set_to_none=True)
    loss = model(**inputs, return_loss=True).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def grads_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
