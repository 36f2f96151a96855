"""curves.png: what is drawn (by hand), one colour per loss term, symlog, markers, the schedule panel;
and the one-line note when matplotlib is missing."""

from __future__ import annotations

import sys

import pytest

from bnn_distill import plots

HISTORY = [
    {
        "stage": "teacher",
        "epoch": 1,
        "lr": 0.1,
        "train": {"ce": 2.0, "loss": 2.0},
        "train_top1": 30.0,
        "test_top1": 40.0,
    },
    {
        "stage": "teacher",
        "epoch": 2,
        "lr": 0.05,
        "train": {"ce": 1.0, "loss": 1.0},
        "train_top1": 50.0,
        "val_top1": 55.0,
        "test_top1": 60.0,
    },
    {
        "stage": "stage1",
        "epoch": 1,
        "lr": 0.002,
        "train": {"ce": 0.9, "itrd_corr": -3.0, "itrd_mi": 0.004, "loss": -5.1},
        "train_top1": 52.0,
        "test_top1": 58.0,
    },
    {
        "stage": "stage2",
        "epoch": 1,
        "lr": 0.001,
        "tau": 0.99,
        "train": {"ce": 0.8, "itrd_corr": -3.2, "itrd_mi": 0.003, "loss": -5.6},
        "train_top1": 53.0,
        "test_top1": 57.0,
    },
]


def test_curve_data_by_hand():
    d = plots.curve_data(HISTORY)
    assert [s["name"] for s in d["stages"]] == ["teacher", "stage1", "stage2"]
    assert [s["start"] for s in d["stages"]] == [0.5, 2.5, 3.5]  # epochs run on: 1, 2 | 3 | 4
    t, s1, s2 = d["stages"]
    assert t["acc"] == {"test": [(1, 40.0), (2, 60.0)], "val": [(2, 55.0)], "train": [(1, 30.0), (2, 50.0)]}
    assert s1["loss"] == {"ce": [(3, 0.9)], "itrd_corr": [(3, -3.0)], "itrd_mi": [(3, 0.004)], "loss": [(3, -5.1)]}
    assert s2["lr"] == [(4, 0.001)] and s2["tau"] == [(4, 0.99)] and t["tau"] == []
    # one colour per term over all stages, all different; the total is black
    assert d["colours"] == {
        "ce": plots.TERM_COLOURS[0],
        "itrd_corr": plots.TERM_COLOURS[1],
        "itrd_mi": plots.TERM_COLOURS[2],
        "loss": "black",
    }
    assert plots._linthresh([2.0, -3.0, 0.004, 0.0]) == pytest.approx(0.0004)


def test_curves_figure_colours_symlog_markers_and_schedule(tmp_path):
    fig, (acc, loss, lr, tau) = plots.curves_figure(HISTORY, "t")
    assert loss.get_yscale() == "symlog" and lr.get_yscale() == "log" and tau is not None
    by_colour = {}
    for line in loss.get_lines():
        if line.get_color() == "grey":  # a stage boundary
            continue
        if line.get_xydata().size:
            by_colour.setdefault(line.get_color(), set()).update(float(x) for x, _ in line.get_xydata())
        assert line.get_marker() not in (None, "None", "")  # 1-epoch stages show as points
    assert len(by_colour) == 4  # ce, itrd_corr, itrd_mi, total
    assert by_colour[plots.TERM_COLOURS[1]] == {3.0, 4.0}  # itrd_corr: same colour in stage1 and stage2
    assert [tuple(p) for p in tau.get_lines()[0].get_xydata()] == [(4.0, 0.99)]
    assert {t.get_text() for t in loss.get_legend().get_texts()} == {"ce", "itrd_corr", "itrd_mi", "total"}
    plots.pyplot().close(fig)
    out = plots.plot_curves(HISTORY, tmp_path / "curves.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not list(tmp_path.glob(".*tmp*"))


def test_without_matplotlib_plotting_says_so_in_one_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(ImportError) as e:  # the trainer catches ImportError and logs one line
        plots.plot_curves(HISTORY, tmp_path / "curves.png")
    assert isinstance(e.value, plots.PlotsUnavailable)
    assert "bnn-distill[plots]" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "curves.png").exists()
