"""curves.png: training loss, temperature (logit scale) and held-out evaluation against steps.

Drawn with matplotlib's Agg backend (no display); imported lazily so training never needs it
until the end of a run.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_curves(metrics: list[dict[str, Any]], evals: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    steps = [m["step"] for m in metrics]
    axes[0].plot(steps, [m["loss"] for m in metrics], color="tab:blue")
    axes[0].set(title="training loss", xlabel="step")
    axes[1].plot(steps, [m["logit_scale"] for m in metrics], color="tab:orange", label="logit scale")
    if metrics and "logit_bias" in metrics[0]:
        twin = axes[1].twinx()
        twin.plot(steps, [m["logit_bias"] for m in metrics], color="tab:gray", ls="--", label="logit bias")
        twin.set_ylabel("logit bias")
    axes[1].set(title="temperature (logit scale = 1/T)", xlabel="step")
    ax = axes[2]
    labels = {"zero_shot_top1": "zero-shot top-1", "i2t_r1": "image->text R@1", "t2i_r1": "text->image R@1",
              "i2t_r5": "image->text R@5"}
    keys = [k for k in labels if evals and k in evals[-1]]
    for key in keys:
        line = ax.plot([e["step"] for e in evals], [e[key] for e in evals], marker="o", label=labels[key])[0]
        chance = evals[-1].get("chance", {}).get(key)
        if chance is not None:
            ax.axhline(chance, color=line.get_color(), ls=":", lw=1)
    ax.set(title="held-out eval (dotted: chance)" if keys else "no evaluation data", xlabel="step", ylim=(0, 1))
    if keys:
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
