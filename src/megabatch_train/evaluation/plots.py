"""curves.png: training loss, temperature (logit scale) and held-out evaluation against steps.

Drawn with matplotlib's Agg backend (no display); imported lazily so training never needs it
until the end of a run, and a run without it still ends well: a warning says curves.png was not
drawn (metrics.jsonl holds every number it would show). Every axis shows plain numbers (no offset
or scientific notation); the evaluation panel spans the whole run in steps and 0-100%, labels each
point with its value, and names the final value and chance in the legend, so one evaluation reads
as well as many.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from .report import percent

_EVAL_LABELS = {"zero_shot_top1": "zero-shot top-1", "i2t_r1": "image->text R@1", "t2i_r1": "text->image R@1",
                "i2t_r5": "image->text R@5"}


def _plain(ax: Any) -> None:
    from matplotlib.ticker import ScalarFormatter

    for axis in (ax.xaxis, ax.yaxis):
        fmt = ScalarFormatter(useOffset=False)
        fmt.set_scientific(False)
        axis.set_major_formatter(fmt)


def plot_curves(metrics: list[dict[str, Any]], evals: list[dict[str, Any]], path: Path, title: str) -> bool:
    """Draw curves.png; a failure (matplotlib missing or broken, the folder unwritable) is a warning, not the
    end of a run whose weights and metrics are saved. Returns whether it was drawn."""
    try:
        import matplotlib  # noqa: F401 - only to name the extra when it is missing
    except ImportError as e:
        warnings.warn(f"{path.name} not drawn: matplotlib is not installed ({e}); pip install 'megabatch[train]' "
                      "brings it. metrics.jsonl and eval.json hold the numbers", RuntimeWarning, stacklevel=2)
        return False
    try:
        _draw(metrics, evals, path, title)
        return True
    except Exception as e:  # noqa: BLE001 - any plotting error: the run's results stand without the picture
        warnings.warn(f"{path} was not drawn: {type(e).__name__}: {e}", stacklevel=2)
        return False


def _draw(metrics: list[dict[str, Any]], evals: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    steps = [m["step"] for m in metrics]
    last = max(steps + [e["step"] for e in evals] + [1])
    marker = "o" if len(steps) < 3 else None
    axes[0].plot(steps, [m["loss"] for m in metrics], color="tab:blue", marker=marker)
    axes[0].set(title="training loss", xlabel="step")
    axes[1].plot(steps, [m["logit_scale"] for m in metrics], color="tab:orange", marker=marker, label="logit scale")
    axes[1].set(title="temperature (logit scale = 1/T)", xlabel="step")
    if metrics and "logit_bias" in metrics[0]:
        twin = axes[1].twinx()
        twin.plot(steps, [m["logit_bias"] for m in metrics], color="tab:gray", ls="--", marker=marker)
        twin.set_ylabel("logit bias (dashed)")
        _plain(twin)
    ax = axes[2]
    keys = [k for k in _EVAL_LABELS if evals and k in evals[-1]]
    for key in keys:
        xs, ys = [e["step"] for e in evals], [100 * e[key] for e in evals]
        chance = evals[-1].get("chance", {}).get(key)
        label = f"{_EVAL_LABELS[key]}: {percent(evals[-1][key])}"
        if chance is not None:
            label += f" (chance {percent(chance)})"
        line = ax.plot(xs, ys, marker="o", label=label)[0]
        if chance is not None:
            ax.axhline(100 * chance, color=line.get_color(), ls=":", lw=1)
        if len(evals) <= 3:
            for x, y in zip(xs, ys):
                ax.annotate(f"{y:.3g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7,
                            color=line.get_color())
    title_eval = f"held-out eval, {evals[-1].get('n_images', '?')} pairs (dotted: chance)" if keys else \
        "no evaluation data"
    ax.set(title=title_eval, xlabel="step", ylabel="%", ylim=(0, 100))
    if keys:
        ax.legend(fontsize=7, loc="best")
    for a in axes:
        a.set_xlim(0, last * 1.04)
        _plain(a)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
