"""Training curves as a PNG (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Union


def plot_curves(history: List[Dict[str, Any]], path: Union[str, Path], title: str = "") -> Path:
    """Test/train top-1 and the loss terms against epoch, one colour per stage; epochs run on."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    stages: List[str] = []
    for r in history:
        if r["stage"] not in stages:
            stages.append(r["stage"])
    offset = 0
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for si, name in enumerate(stages):
        rows = [r for r in history if r["stage"] == name]
        c = colours[si % len(colours)]
        xs = [offset + r["epoch"] for r in rows]
        test = [(offset + r["epoch"], r["test_top1"]) for r in rows if "test_top1" in r]
        if test:
            ax_acc.plot(*zip(*test), "-o", color=c, ms=3, label=f"{name} test")
        ax_acc.plot(xs, [r["train_top1"] for r in rows], "--", color=c, alpha=0.6, label=f"{name} train")
        terms = sorted({k for r in rows for k in r["train"]})
        for k in terms:
            style = "-" if k == "loss" else ":"
            ax_loss.plot(xs, [r["train"].get(k, float("nan")) for r in rows], style, color=c,
                         label=f"{name} {k}" if k != "loss" else f"{name} total")
        if si:
            ax_acc.axvline(offset + 0.5, color="grey", lw=0.5)
            ax_loss.axvline(offset + 0.5, color="grey", lw=0.5)
        offset = xs[-1] if xs else offset
    ax_acc.set(xlabel="epoch (all stages)", ylabel="top-1 (%)", title="accuracy")
    ax_loss.set(xlabel="epoch (all stages)", ylabel="train loss (epoch mean)", title="loss terms")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
