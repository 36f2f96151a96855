"""The grid probe: its similarity measures against hand-computed values, and a run end to end."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import load_script


def _probe():
    return load_script("benchmarks/itrd_probe.py")


def test_linear_cka_of_one_dimension_is_squared_correlation():
    p = _probe()
    x = torch.tensor([[1.0], [2.0], [4.0], [7.0]])
    y = torch.tensor([[2.0], [1.0], [5.0], [6.0]])
    # centred: x = (-2.5, -1.5, 0.5, 3.5), y = (-1.5, -2.5, 1.5, 2.5); sum xy = 3.75+3.75+0.75+8.75 = 17,
    # sum x^2 = 6.25+2.25+0.25+12.25 = 21, sum y^2 = 2.25+6.25+2.25+6.25 = 17  ->  r^2 = 289 / 357
    assert p.linear_cka(x, y) == pytest.approx(289 / 357, rel=1e-12)


def test_linear_cka_is_one_under_rotation_and_scale_and_symmetric():
    p = _probe()
    torch.manual_seed(0)
    a = torch.randn(50, 6)
    q, _ = torch.linalg.qr(torch.randn(6, 6))
    assert p.linear_cka(a, 3.0 * a @ q + 1.0) == pytest.approx(1.0, abs=1e-6)
    b = torch.randn(50, 4)
    assert p.linear_cka(a, b) == pytest.approx(p.linear_cka(b, a), rel=1e-9)
    assert 0.0 < p.linear_cka(a, b) < 1.0


def test_mean_corr_matches_the_definition():
    p = _probe()
    z = torch.tensor([[1.0, 0.0], [3.0, 2.0], [5.0, 4.0], [7.0, 2.0]])
    # identical features: each dimension gives sum(z~^2)/n = (n-1)/n = 3/4 (unbiased std, divide by n)
    assert p.mean_corr(z, z, eps=0.0) == pytest.approx(0.75, abs=1e-6)
    # negated second dimension: (3/4 + -3/4) / 2 = 0
    assert p.mean_corr(z, z * torch.tensor([1.0, -1.0]), eps=0.0) == pytest.approx(0.0, abs=1e-6)


def test_fit_projection_recovers_a_linear_map():
    p = _probe()
    torch.manual_seed(1)
    zs = torch.randn(400, 5)
    w = torch.randn(5, 3)
    b = torch.tensor([0.5, -1.0, 2.0])
    w_hat, b_hat = p.fit_projection(zs, zs @ w + b, ridge=0.0)
    assert torch.allclose(w_hat, w, atol=1e-4) and torch.allclose(b_hat, b, atol=1e-4)


def test_probe_of_the_teacher_against_itself():
    p = _probe()
    torch.manual_seed(2)
    logits, feat = torch.randn(64, 10), torch.randn(64, 8)
    y = logits.argmax(1)
    m = p.probe(logits, feat, logits, feat, y, batch=16)
    assert m["top1"] == 100.0 and m["agree"] == 100.0
    assert m["kd"] == pytest.approx(0.0, abs=1e-5)
    # L_gram of a feature with itself is not 0: with G the cosine Gram of a batch, (1/n^2) sum(G^2 - G^4)
    g = [torch.nn.functional.normalize(feat[i : i + 16], dim=1) for i in range(0, 64, 16)]
    g = [z @ z.t() for z in g]
    assert m["L_gram"] == pytest.approx(sum(float((x.pow(2) - x.pow(4)).sum()) / 256 for x in g) / 4, rel=1e-5)
    assert m["cka"] == pytest.approx(1.0, abs=1e-6)
    assert m["corr"] == pytest.approx(15 / 16, abs=1e-3)  # (n-1)/n with n = 16 per batch


def test_mcnemar_p_by_hand():
    p = _probe()
    assert p.mcnemar_p(0, 5) == pytest.approx(2 / 32)  # 2 * P(X <= 0), X ~ Bin(5, 1/2)
    assert p.mcnemar_p(1, 4) == pytest.approx(2 * 6 / 32)  # 2 * (1 + 5) / 32
    assert p.mcnemar_p(3, 3) == 1.0 and p.mcnemar_p(0, 0) == 1.0
    assert p.mcnemar_p(500, 620) == pytest.approx(p.mcnemar_p(620, 500)) and 0 < p.mcnemar_p(500, 620) < 1e-3


def test_paired_counts_images_each_way_per_seed():
    p = _probe()
    t, f = True, False
    ref = torch.tensor([t, t, f, f, t])
    row = torch.tensor([t, f, t, t, t])
    out = p.paired({"itrd": [(0, ref)], "kd": [(0, row), (1, row)]})
    assert out == {"kd": [{"seed": 0, "only_row": 2, "only_ref": 1, "diff_points": 20.0, "p": 1.0}]}  # seed 1: no itrd


@pytest.mark.slow
def test_probe_runs_on_a_finished_grid(tmp_path):
    grid = load_script("benchmarks/itrd_grid.py")
    runs = tmp_path / "runs"
    assert (
        grid.main(
            [
                "--dataset",
                "synthetic",
                "--limit-train",
                "64",
                "--limit-test",
                "32",
                "--width-mult",
                "0.25",
                "--teacher-epochs",
                "1",
                "--stage-epochs",
                "1",
                "--batch-size",
                "16",
                "--seeds",
                "0",
                "--runs",
                str(runs),
                "--out",
                str(tmp_path / "grid"),
                "--rows",
                "ce",
                "itrd",
                "--no-cost",
            ]
        )
        == 0
    )
    p = _probe()
    assert (
        p.main(
            [
                "--runs",
                str(runs),
                "--dataset",
                "synthetic",
                "--limit-test",
                "32",
                "--batch-size",
                "16",
                "--out",
                str(tmp_path / "probe"),
            ]
        )
        == 0
    )
    out = json.loads((tmp_path / "probe.json").read_text())
    assert set(out["rows"]) == {
        "teacher weights binarised, untrained (W1A1)",
        "ce / stage1 (W32A1)",
        "ce / stage2 (W1A1)",
        "itrd / stage1 (W32A1)",
        "itrd / stage2 (W1A1)",
    }
    assert out["rows"]["ce / stage2 (W1A1)"]["n"] == 1 and out["test_images"] == 32
    (pair,) = out["paired_vs_itrd"]["ce"]
    assert pair["seed"] == 0 and 0 <= pair["only_row"] <= 32 and 0.0 <= pair["p"] <= 1.0
    assert "| ce / stage2 (W1A1) | 1 |" in (tmp_path / "probe.md").read_text()


def test_probe_without_a_grid_is_one_clear_error(tmp_path, capsys):
    assert _probe().main(["--runs", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no finished teacher") and "itrd_grid.py" in err
