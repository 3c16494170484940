"""Built-in towers: a small ViT (or CNN) and a small text transformer joined into a CLIP-like model.

The training loop needs only `encode_image(images (n, 3, S, S)) -> (n, E)`,
`encode_text(tokens (n, L) int64) -> (n, E)` (unnormalised; the loop normalises), and the
one-element parameters `logit_scale` (log of the multiplier; CLIP init log(1/0.07), SigLIP log(10);
clamped at log(100) after every step) and `logit_bias` (SigLIP, init -10), of shape (1,) because
FSDP2's fully_shard refuses 0-dim parameters (0-dim checkpoints still load). Any module with those
members (e.g. an open_clip model, 0-dim parameters included) can be trained by
`megabatch_train.run.loop.train(cfg, model=...)`.

With `center` (by default for SigLIP: `ModelConfig.centred`) each tower's embedding has its batch
mean subtracted before the loop normalises it (`Center`: BatchNorm's centring without its scaling).
Without it SigLIP's towers collapse in short runs (health.py says why).

Both towers are pre-norm transformers. The ViT (fixed 2-D sin-cos positions) mean-pools its patch
tokens; the text tower reads the output at <cls> (position 0) and masks <pad> out of attention.
`--image-tower cnn` replaces the ViT with `ConvTower`, a small CNN (0.59M parameters at the default
vision_width 64) that learns far more per step on small images (README "Why 32k?").
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config.sections import ModelConfig
from ..data.tokenizer import PAD


class Block(nn.Module):
    """Pre-norm transformer block on (n, T, width) with an optional (n, 1, 1, T) bool key mask."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, key_mask: Optional[Tensor] = None) -> Tensor:
        n, t, w = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(n, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        p = self.dropout if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=p)
        x = x + self.drop(self.out(a.transpose(1, 2).reshape(n, t, w)))
        return x + self.drop(self.mlp(self.norm2(x)))


def sincos_2d(grid: int, width: int) -> Tensor:
    """(1, grid*grid, width) fixed 2-D sine-cosine position embeddings (MAE's), row-major patches.

    Their unit scale matches the patch embeddings'; a small learned table (std 0.02) is drowned by
    the content and a mean-pooled ViT then learns where things are very slowly.
    """
    if width % 4:
        raise ValueError(f"vision_width must be a multiple of 4 for 2-D sin-cos embeddings, got {width}")
    freqs = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float32) / (width // 4))
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32),
                            indexing="ij")
    parts = [f(c.reshape(-1, 1) * freqs) for c in (ys, xs) for f in (torch.sin, torch.cos)]
    return torch.cat(parts, dim=1)[None]


class VisionTower(nn.Module):
    """ViT: (n, 3, S, S) -> (n, embed_dim)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        w = cfg.vision_width
        self.patch = nn.Conv2d(3, w, cfg.patch_size, stride=cfg.patch_size)
        self.register_buffer("pos", sincos_2d(cfg.image_size // cfg.patch_size, w))
        self.blocks = nn.ModuleList(Block(w, cfg.vision_heads, cfg.dropout) for _ in range(cfg.vision_depth))
        self.norm = nn.LayerNorm(w)
        self.proj = nn.Linear(w, cfg.embed_dim, bias=False)

    def forward(self, images: Tensor) -> Tensor:
        x = self.patch(images).flatten(2).transpose(1, 2) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.proj(self.norm(x.mean(1)))


def _conv(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
    """3x3 conv, GroupNorm (per sample: no batch statistics, so GradCache's two passes, DDP ranks and
    evaluation all see the same function), GELU."""
    return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.GroupNorm(8, c_out), nn.GELU()]


class ConvTower(nn.Module):
    """Small CNN: (n, 3, S, S) -> (n, embed_dim), any S >= 8.

    With w = vision_width: a stem conv to w/2 channels at full resolution, then three stages that
    halve the resolution and double the width (w, 2w, 4w), the first two with a second conv; global
    average pool, LayerNorm, linear to embed_dim. 0.59M parameters at w = 64, embed_dim = 64.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        w = cfg.vision_width
        layers = _conv(3, w // 2, 1)
        layers += _conv(w // 2, w, 2) + _conv(w, w, 1)
        layers += _conv(w, 2 * w, 2) + _conv(2 * w, 2 * w, 1)
        layers += _conv(2 * w, 4 * w, 2)
        self.features = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(4 * w)
        self.proj = nn.Linear(4 * w, cfg.embed_dim, bias=False)

    def forward(self, images: Tensor) -> Tensor:
        return self.proj(self.norm(self.features(images).mean((2, 3))))


class TextTower(nn.Module):
    """Text transformer: (n, L) token ids -> (n, embed_dim), pooled at <cls>."""

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        w = cfg.text_width
        self.embed = nn.Embedding(vocab_size, w)
        self.pos = nn.Parameter(torch.randn(1, cfg.context_length, w) * 0.02)
        self.blocks = nn.ModuleList(Block(w, cfg.text_heads, cfg.dropout) for _ in range(cfg.text_depth))
        self.norm = nn.LayerNorm(w)
        self.proj = nn.Linear(w, cfg.embed_dim, bias=False)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens) + self.pos[:, : tokens.shape[1]]
        key_mask = (tokens != PAD)[:, None, None, :]
        for block in self.blocks:
            x = block(x, key_mask)
        return self.proj(self.norm(x[:, 0]))


class Center(nn.Module):
    """Subtract the batch mean (training; gradients flow through it) or a running mean (eval), as
    BatchNorm1d(affine=False) centres, without dividing by the spread. Under GradCache the batch is
    the micro-batch, the same in both of its passes. A batch of one uses the running mean."""

    def __init__(self, dim: int, momentum: float = 0.1):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("running_mean", torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        if self.training and len(x) > 1:
            mean = x.mean(0)
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach().float(), self.momentum)
            return x - mean
        return x - self.running_mean.to(x.dtype)


class ContrastiveModel(nn.Module):
    """A CLIP-like pair of towers with a learnable temperature (and SigLIP bias)."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, loss: str = "clip"):
        super().__init__()
        self.visual = ConvTower(cfg) if cfg.image_tower == "cnn" else VisionTower(cfg)
        self.text = TextTower(cfg, vocab_size) if cfg.text_tower == "builtin" else _minilm(cfg)
        _add_scales(self, cfg, loss)
        self.visual.apply(_init)
        if cfg.text_tower == "builtin":
            self.text.apply(_init)

    def encode_image(self, images: Tensor) -> Tensor:
        """(n, 3, S, S) float -> (n, embed_dim), unnormalised (and centred, with model.center)."""
        return self.image_center(self.visual(images))

    def encode_text(self, tokens: Tensor) -> Tensor:
        """(n, L) int64 -> (n, embed_dim), unnormalised (and centred, with model.center)."""
        return self.text_center(self.text(tokens))


class TextPairModel(nn.Module):
    """Text-text pairs (--data wordnet): a definition on the query side, where images go, and a name on
    the caption side. One text trunk serves both sides (MiniLM, locked or trained, or the built-in text
    tower) and each side has its own linear head: the trunk's weights are shared because the zero-shot
    model is one encoder for both kinds of text; the heads let the two sides differ, at the cost of a
    matrix each. Both heads start equal, so the fresh model ranks as a random projection of the trunk.
    The loop calls encode_image (the query side) and encode_text as for image-text pairs."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, loss: str = "clip"):
        super().__init__()
        if cfg.text_tower == "builtin":
            self.trunk: nn.Module = TextTower(cfg, vocab_size)
            self.trunk.apply(_init)
            width = cfg.embed_dim
        else:
            from .minilm import WIDTH, MiniLMText

            self.trunk, width = MiniLMText(None, cfg.lock_text, cfg.train_layers), WIDTH
        self.query_head = nn.Linear(width, cfg.embed_dim, bias=False)
        self.name_head = nn.Linear(width, cfg.embed_dim, bias=False)
        nn.init.normal_(self.query_head.weight, std=width ** -0.5)
        with torch.no_grad():
            self.name_head.weight.copy_(self.query_head.weight)
        _add_scales(self, cfg, loss)

    def _features(self, tokens: Tensor, head: nn.Linear) -> Tensor:
        return head(self.trunk(tokens).to(head.weight.dtype))

    def encode_image(self, tokens: Tensor) -> Tensor:
        """The query side: (n, L) int64 definitions -> (n, embed_dim), unnormalised (centred with center)."""
        return self.image_center(self._features(tokens, self.query_head))

    def encode_text(self, tokens: Tensor) -> Tensor:
        """The caption side: (n, L) int64 names -> (n, embed_dim), unnormalised (centred with center)."""
        return self.text_center(self._features(tokens, self.name_head))


def _add_scales(model: nn.Module, cfg: ModelConfig, loss: str) -> None:
    """The learnable temperature, SigLIP's bias, and each side's centring (cfg.centred) of a two-sided model."""
    init_scale = math.log(10.0) if loss == "siglip" else math.log(1 / 0.07)
    model.logit_scale = nn.Parameter(torch.full((1,), init_scale))  # (1,), not 0-dim: FSDP2 shards it
    model.logit_bias = nn.Parameter(torch.full((1,), -10.0), requires_grad=loss == "siglip")
    center = cfg.centred(loss)
    model.image_center = Center(cfg.embed_dim) if center else nn.Identity()
    model.text_center = Center(cfg.embed_dim) if center else nn.Identity()


def _minilm(cfg: ModelConfig) -> nn.Module:
    from .minilm import MiniLMText

    return MiniLMText(cfg.embed_dim, cfg.lock_text, cfg.train_layers)


def _init(m: nn.Module) -> None:
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.trunc_normal_(m.weight, std=0.02)
    if isinstance(m, nn.Linear) and m.bias is not None:
        nn.init.zeros_(m.bias)
