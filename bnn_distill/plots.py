"""Training curves as a PNG (matplotlib, headless; optional: ``pip install 'bnn-distill[plots]'``).

Three panels over the epochs of all stages run on (a grey line and the stage's name at each
stage's start):

* accuracy: test, validation and train top-1, one colour per split;
* loss terms: one colour per term (the same term has the same colour in every stage), the total
  in black, on a symlog axis so that terms of very different size (and ITRD's negative
  correlation term) are all visible; markers at every epoch, so a 1-epoch stage shows;
* schedule: the learning rate (log axis) and, where recorded, tau of the ReCU clamp (second axis).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Sequence, Union

#: matplotlib's tab10 without grey, then more; the total loss is black.
TERM_COLOURS = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#bcbd22",
    "#17becf",
    "#393b79",
    "#637939",
    "#8c6d31",
)
SPLIT_COLOURS = {"test": "#1f77b4", "val": "#ff7f0e", "train": "#2ca02c"}
TOTAL = "loss"


class PlotsUnavailable(ImportError):
    """matplotlib is not installed: plots are skipped (the numbers are in the JSON/JSONL files)."""


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend, or :class:`PlotsUnavailable` with a one-line hint."""
    try:
        import matplotlib
    except ImportError:
        raise PlotsUnavailable("matplotlib is not installed (pip install 'bnn-distill[plots]')") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def curve_data(history: List[Dict[str, Any]]) -> Dict[str, Any]:
    """What :func:`plot_curves` draws: x positions run on across stages (stage k's epoch e is at
    ``offset_k + e``, ``offset_k`` the last x of the stage before), per stage its start and the
    series ``{name: [(x, y), ...]}`` of ``acc`` (test/val/train), ``loss`` (every term, ``loss`` the
    total), ``lr`` and ``tau``; and one colour per loss term over all stages."""
    stages: List[str] = []
    for r in history:
        if r["stage"] not in stages:
            stages.append(r["stage"])
    out: Dict[str, Any] = {"stages": [], "colours": {}}
    terms: List[str] = []
    offset = 0
    for name in stages:
        rows = [r for r in history if r["stage"] == name]
        xs = [offset + r["epoch"] for r in rows]
        st: Dict[str, Any] = {"name": name, "start": offset + 0.5, "acc": {}, "loss": {}}
        for split, key in (("test", "test_top1"), ("val", "val_top1"), ("train", "train_top1")):
            pts = [(x, r[key]) for x, r in zip(xs, rows) if key in r]
            if pts:
                st["acc"][split] = pts
        for k in sorted({k for r in rows for k in r.get("train", {})}, key=lambda k: (k == TOTAL, k)):
            st["loss"][k] = [(x, r["train"][k]) for x, r in zip(xs, rows) if k in r.get("train", {})]
            if k != TOTAL and k not in terms:
                terms.append(k)
        st["lr"] = [(x, r["lr"]) for x, r in zip(xs, rows) if "lr" in r]
        st["tau"] = [(x, r["tau"]) for x, r in zip(xs, rows) if "tau" in r]
        out["stages"].append(st)
        offset = xs[-1] if xs else offset
    out["colours"] = {k: TERM_COLOURS[i % len(TERM_COLOURS)] for i, k in enumerate(terms)}
    out["colours"][TOTAL] = "black"
    return out


def _linthresh(values: Sequence[float]) -> float:
    """The symlog axis' linear range: a decade below the smallest non-zero |value| (at most 1)."""
    small = [abs(v) for v in values if v == v and v != 0]
    return min(1.0, 0.1 * min(small)) if small else 1.0


def curves_figure(history: List[Dict[str, Any]], title: str = ""):
    """The figure of :func:`plot_curves`; returns ``(fig, (ax_acc, ax_loss, ax_lr, ax_tau or None))``."""
    plt = pyplot()
    data = curve_data(history)
    fig, (ax_acc, ax_loss, ax_lr) = plt.subplots(1, 3, figsize=(15, 4.2))
    ax_tau = None
    once = _label_once()
    all_loss: List[float] = []
    for si, st in enumerate(data["stages"]):
        ax_tau = _plot_stage(st, data["colours"], ax_acc, ax_loss, ax_lr, ax_tau, once, all_loss)
        _mark_stage(st, si, (ax_acc, ax_loss, ax_lr))
    _finish_axes(fig, data, ax_acc, ax_loss, ax_lr, ax_tau, all_loss, title)
    return fig, (ax_acc, ax_loss, ax_lr, ax_tau)


def _label_once():
    """``once(key, label)``: ``label`` the first time for ``key``, then ``'_nolegend_'``."""
    labelled: set = set()

    def once(key: str, label: str) -> str:
        if key in labelled:
            return "_nolegend_"
        labelled.add(key)
        return label

    return once


def _plot_stage(st, colours, ax_acc, ax_loss, ax_lr, ax_tau, once, all_loss: List[float]):
    """One stage's accuracy, loss, lr and tau lines (its losses added to ``all_loss``); returns the
    tau axis (made on the first stage that recorded tau)."""
    for split, pts in st["acc"].items():
        ax_acc.plot(
            *zip(*pts),
            "-" if split != "train" else "--",
            marker="o",
            ms=3.5,
            color=SPLIT_COLOURS[split],
            label=once(f"acc:{split}", f"{split} top-1"),
        )
    for k, pts in st["loss"].items():
        all_loss += [y for _, y in pts]
        ax_loss.plot(
            *zip(*pts),
            "--" if k == TOTAL else "-",
            marker="s" if k == TOTAL else "o",
            ms=3.5,
            lw=1.2,
            color=colours[k],
            label=once(f"loss:{k}", "total" if k == TOTAL else k),
        )
    if st["lr"]:
        ax_lr.plot(*zip(*st["lr"]), "-", marker="o", ms=3.5, color="#1f77b4", label=once("lr", "learning rate"))
    if st["tau"]:
        if ax_tau is None:
            ax_tau = ax_lr.twinx()
        ax_tau.plot(*zip(*st["tau"]), "-", marker="^", ms=4, color="#d62728", label=once("tau", "tau (ReCU)"))
    return ax_tau


def _mark_stage(st, si: int, axes) -> None:
    """A grey line at the stage's start (but the first's) and its name, on each of ``axes``."""
    for ax in axes:
        if si:
            ax.axvline(st["start"], color="grey", lw=0.6)
        ax.annotate(
            st["name"],
            (st["start"], 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(2, -10),
            textcoords="offset points",
            fontsize=7,
            color="grey",
        )


def _finish_axes(fig, data, ax_acc, ax_loss, ax_lr, ax_tau, all_loss: List[float], title: str) -> None:
    """Scales, labels, grids, limits and legends of the three panels; the title; the layout."""
    ax_acc.set(xlabel="epoch (all stages)", ylabel="top-1 (%)", title="accuracy")
    ax_loss.set_yscale("symlog", linthresh=_linthresh(all_loss))
    if all_loss and min(all_loss) >= 0:
        ax_loss.set_ylim(bottom=0)  # no empty negative half
    ax_loss.set(xlabel="epoch (all stages)", ylabel="train loss, epoch mean (symlog)", title="loss terms")
    if any(st["lr"] for st in data["stages"]):
        lrs = [y for st in data["stages"] for _, y in st["lr"]]
        if min(lrs) > 0:
            ax_lr.set_yscale("log")
    ax_lr.set(xlabel="epoch (all stages)", ylabel="learning rate (end of epoch)", title="schedule")
    handles, labels = ax_lr.get_legend_handles_labels()
    if ax_tau is not None:
        ax_tau.set_ylabel("tau", color="#d62728")
        h2, l2 = ax_tau.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    for ax in (ax_acc, ax_loss, ax_lr):
        ax.grid(alpha=0.3)
        if data["stages"]:
            ax.set_xlim(left=0.4)  # the first stage's name shows too
    ax_acc.legend(fontsize=7)
    ax_loss.legend(fontsize=7)
    if handles:
        ax_lr.legend(handles, labels, fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()


def plot_curves(history: List[Dict[str, Any]], path: Union[str, Path], title: str = "") -> Path:
    """Write the curves (see the module docstring) to ``path`` atomically; raises
    :class:`PlotsUnavailable` (an ImportError) without matplotlib."""
    import io

    from .checkpoint import atomic_write_bytes

    fig, _ = curves_figure(history, title)
    plt = pyplot()
    path = Path(path)
    buf = io.BytesIO()  # rendered in memory, then written by the atomic writer (its one-line disk errors)
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path
