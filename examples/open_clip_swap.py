"""open_clip's training step with megabatch's loss: the one-line change.

    python examples/open_clip_swap.py           # or under torchrun: the loss then spans every rank

open_clip's models return {"image_features", "text_features", "logit_scale"} (features normalised,
the scale already exp()-ed; SigLIP models add "logit_bias"), and its losses take those keywords.
megabatch.ClipLoss / SigLipLoss take the same ones, so only the loss's construction changes. `import
open_clip` needs torchvision (not installable beside the CPU torch used here), so `OpenClipLike`
stands in for `open_clip.create_model(...)`: the same encode_image / encode_text / logit_scale and
the same forward output.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import megabatch as mb


class OpenClipLike(nn.Module):
    """open_clip.CLIP's interface: encode_image, encode_text, logit_scale (a log), forward -> dict."""

    def __init__(self, dim: int = 32, vocab: int = 100):
        super().__init__()
        self.visual = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 64), nn.GELU(), nn.Linear(64, dim))
        self.token_embedding = nn.EmbeddingBag(vocab, dim)
        self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        x = self.visual(image)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        x = self.token_embedding(text)
        return F.normalize(x, dim=-1) if normalize else x

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"image_features": self.encode_image(image, normalize=True),
                "text_features": self.encode_text(text, normalize=True),
                "logit_scale": self.logit_scale.exp()}


def main() -> None:
    torch.manual_seed(0)
    model = OpenClipLike()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images, texts = torch.randn(64, 3, 16, 16), torch.randint(0, 100, (64, 8))

    # loss_fn = open_clip.ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size)
    loss_fn = mb.ClipLoss()  # exact over every rank under torchrun; no b x B logits
    for step in range(3):
        model_out = model(images, texts)
        losses = loss_fn(**model_out, output_dict=True)  # {"contrastive_loss": ...}, as open_clip's
        total = sum(losses.values())
        total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # as open_clip's train loop does
        print(f"step {step}: loss {total.item():.4f}")


if __name__ == "__main__":
    main()
