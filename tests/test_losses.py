"""Tests of the distillation losses (bnn_distill.losses) against hand-worked numbers and the
identities in /work/shared/ITRD.md. All CPU, well under a second each."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bnn_distill.errors import RecipeError
from bnn_distill.losses import LOSSES, Criterion, LossInputs, Term, itrd_correlation, itrd_mutual_information, kd_loss


def _t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


# --------------------------------------------------------------------------- correlation loss

# n = 3 samples, d = 2 features, worked on paper (unbiased std, then divide by n):
#
#   column 0: z_s = [1, 2, 3]   mean 2, deviations [-1, 0, 1], var = 2/2 = 1     -> [-1, 0, 1]
#             z_t = [0, 0, 3]   mean 1, deviations [-1, -1, 2], var = 6/2 = 3    -> [-1, -1, 2]/sqrt(3)
#             v_0 = (1/3) * (1 + 0 + 2)/sqrt(3) = 1/sqrt(3) = 0.5773503
#   column 1: z_s = [2, 0, -2]  mean 0, deviations [2, 0, -2], var = 8/2 = 4     -> [1, 0, -1]
#             z_t = [1, 2, 3]                                                  -> [-1, 0, 1]
#             v_1 = (1/3) * (-1 + 0 - 1) = -2/3
#
#   alpha = 1:   sum |v - 1|^2 = (1 - 1/sqrt3)^2 + (5/3)^2 = 37/9 - 2/sqrt3 = 2.9564116
#                L = log2(2.9564116) = 1.5638
#   alpha = 1.5: sum |v - 1|^3 = 0.4226497^3 + 125/27 = 0.0754991 + 4.6296296 = 4.7051287
#                L = log2(4.7051287) = 2.2342
HAND_ZS = [[1.0, 2.0], [2.0, 0.0], [3.0, -2.0]]
HAND_ZT = [[0.0, 1.0], [0.0, 2.0], [3.0, 3.0]]
HAND_V = (1 / math.sqrt(3), -2 / 3)


@pytest.mark.parametrize(
    "alpha, expected",
    [
        (1.0, math.log2(37 / 9 - 2 / math.sqrt(3))),
        (1.5, math.log2(4.7051287)),
        (1.01, math.log2(sum(abs(v - 1) ** 2.02 for v in HAND_V))),
    ],
)
def test_correlation_hand_example(alpha, expected):
    got = itrd_correlation(_t(HAND_ZS), _t(HAND_ZT), alpha=alpha, eps=0.0)
    assert got.item() == pytest.approx(expected, abs=1e-5)


def test_correlation_hand_example_default_eps_is_close_but_not_exact():
    # eps = 1e-5 only shrinks the standardised columns by ~eps/var; the value stays within 1e-4.
    exact = itrd_correlation(_t(HAND_ZS), _t(HAND_ZT), alpha=1.0, eps=0.0).item()
    default = itrd_correlation(_t(HAND_ZS), _t(HAND_ZT), alpha=1.0).item()
    assert default == pytest.approx(exact, abs=1e-4)
    assert default != exact


def test_correlation_swaps_symmetrically():
    # v_i is symmetric in student/teacher, so the loss is too.
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(16, 5, generator=g), torch.randn(16, 5, generator=g)
    assert itrd_correlation(a, b).item() == pytest.approx(itrd_correlation(b, a).item(), abs=1e-6)


@pytest.mark.parametrize("n, d", [(2, 1), (4, 3), (32, 7)])
def test_correlation_identical_inputs_give_v_n_minus_1_over_n(n, d):
    # z_s == z_t: v_i = (1/n) * sum_b z~^2 = (n-1)/n exactly (unbiased std, divide by n), so
    # L = log2(d * (1/n)^(2 alpha)).
    g = torch.Generator().manual_seed(n)
    z = torch.randn(n, d, generator=g, dtype=torch.float64)
    for alpha in (1.0, 1.01, 1.5, 2.0):
        got = itrd_correlation(z, z.clone(), alpha=alpha, eps=0.0).item()
        assert got == pytest.approx(math.log2(d * (1 / n) ** (2 * alpha)), abs=1e-4)


def test_correlation_v_never_exceeds_n_minus_1_over_n():
    # |v_i| <= (n-1)/n (Cauchy-Schwarz), so each term is >= (1/n)^(2 alpha): the loss is bounded
    # below by log2(d / n^(2 alpha)), reached for perfectly correlated columns.
    g = torch.Generator().manual_seed(1)
    n, d, alpha = 8, 4, 1.01
    bound = math.log2(d * (1 / n) ** (2 * alpha))
    for _ in range(20):
        a = torch.randn(n, d, generator=g)
        b = 3.0 * a + 0.5 * torch.randn(n, d, generator=g) + 2.0
        assert itrd_correlation(a, b, alpha=alpha, eps=0.0).item() >= bound - 1e-4
    # A positive affine map of each teacher column is perfect correlation: the bound exactly.
    a = torch.randn(n, d, generator=g, dtype=torch.float64)
    b = a * torch.tensor([0.5, 2.0, 7.0, 1.0], dtype=torch.float64) - 3.0
    assert itrd_correlation(a, b, alpha=alpha, eps=0.0).item() == pytest.approx(bound, abs=1e-6)


def test_correlation_constant_column_nan_with_eps_zero():
    z_s = _t([[1.0, 5.0], [2.0, 5.0], [4.0, 5.0]])  # column 1 constant
    z_t = _t([[0.0, 1.0], [1.0, 3.0], [1.0, 2.0]])
    assert torch.isnan(itrd_correlation(z_s, z_t, eps=0.0))


def test_correlation_constant_column_finite_with_default_eps():
    g = torch.Generator().manual_seed(2)
    z_s = torch.randn(8, 3, generator=g)
    z_s[:, 1] = 0.7  # a dead binary channel
    z_t = torch.randn(8, 3, generator=g)
    z_s.requires_grad_(True)
    z_t.requires_grad_(True)
    loss = itrd_correlation(z_s, z_t)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(z_s.grad).all() and torch.isfinite(z_t.grad).all()
    # The constant column standardises to 0, so v = 0 and it adds exactly |0 - 1|^(2a) = 1.
    with torch.no_grad():
        rest = itrd_correlation(z_s[:, [0, 2]], z_t[:, [0, 2]])
    assert 2 ** loss.item() - 2 ** rest.item() == pytest.approx(1.0, abs=1e-4)


def test_correlation_rejects_shape_mismatch():
    with pytest.raises(ValueError):
        itrd_correlation(torch.zeros(4, 3), torch.zeros(4, 2))


# --------------------------------------------------------------------------- mutual information


def _gram_closed_form(z_s: torch.Tensor, z_t: torch.Tensor) -> float:
    """(1/n^2) sum_ij G_s^2 (1 - G_t^2), written with explicit loops over cosines in float64."""
    zs, zt = z_s.double(), z_t.double()
    n = zs.shape[0]
    total = 0.0
    for i in range(n):
        for j in range(n):
            cs = float(zs[i] @ zs[j]) / float(zs[i].norm() * zs[j].norm())
            ct = float(zt[i] @ zt[j]) / float(zt[i].norm() * zt[j].norm())
            total += cs * cs * (1 - ct * ct)
    return total / n**2


def test_gram_hand_example_2x2():
    # Zs^ rows: [1, 0], [1, 1]/sqrt2 -> G_s = [[1, 1/sqrt2], [1/sqrt2, 1]]; teacher rows orthogonal,
    # G_t = I. Diagonal terms vanish (1 - 1 = 0); each off-diagonal term is (1/2)(1 - 0).
    # L = (1/4) * 2 * (1/2) = 0.25.
    got = itrd_mutual_information(_t([[1.0, 0.0], [1.0, 1.0]]), _t([[1.0, 0.0], [0.0, 1.0]]))
    assert got.item() == pytest.approx(0.25, abs=1e-6)


def test_gram_hand_example_3x2():
    # Student rows [1,0], [0,1], [1,1]: off-diagonal cosines (0,1)=0, (0,2)=(1,2)=1/sqrt2.
    # Teacher rows [1,0], [1,0], [0,1]: off-diagonal cosines (0,1)=1, (0,2)=(1,2)=0.
    # ||A||^2 = (3 + 2*(0 + 1/2 + 1/2)) / 9 = 5/9;  G_st = I so ||B||^2 = 3/9;  L = 2/9.
    got = itrd_mutual_information(_t([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), _t([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
    assert got.item() == pytest.approx(2 / 9, abs=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_gram_closed_form_identity(seed):
    g = torch.Generator().manual_seed(seed)
    n, d_s, d_t = 6 + seed, 3 + seed, 5
    z_s = torch.randn(n, d_s, generator=g, dtype=torch.float64)
    z_t = torch.randn(n, d_t, generator=g, dtype=torch.float64)
    got = itrd_mutual_information(z_s, z_t)
    # The library computes in fp32 (ITRD.md), so compare at fp32 precision.
    assert got.item() == pytest.approx(_gram_closed_form(z_s, z_t), abs=1e-6)
    assert got.item() >= 0.0


def test_gram_nonnegative_on_many_random_cases():
    g = torch.Generator().manual_seed(10)
    for _ in range(50):
        n = int(torch.randint(2, 12, (1,), generator=g))
        z_s = torch.randn(n, 4, generator=g)
        z_t = torch.randn(n, 3, generator=g)
        assert itrd_mutual_information(z_s, z_t).item() >= -1e-7


def test_gram_zero_when_teacher_rows_parallel():
    # All teacher rows positive multiples of one vector: G_t = all ones, so B == A and L = 0.
    g = torch.Generator().manual_seed(3)
    z_s = torch.randn(7, 4, generator=g)
    z_t = torch.rand(7, 1, generator=g).add(0.1) * torch.tensor([[1.0, -2.0, 3.0]])
    assert itrd_mutual_information(z_s, z_t).item() == pytest.approx(0.0, abs=1e-6)
    # Anti-parallel rows too (G_t^2 is still all ones).
    z_t[::2] *= -1
    assert itrd_mutual_information(z_s, z_t).item() == pytest.approx(0.0, abs=1e-6)


def test_gram_zero_when_student_rows_orthogonal():
    # G_s = I: only diagonal terms survive and those have 1 - G_t[i,i]^2 = 0.
    g = torch.Generator().manual_seed(4)
    z_s = torch.diag(torch.tensor([1.0, 2.0, 0.5, 3.0]))
    z_t = torch.randn(4, 6, generator=g)
    assert itrd_mutual_information(z_s, z_t).item() == pytest.approx(0.0, abs=1e-6)


def test_gram_positive_when_teacher_separates_what_student_merges():
    # Student rows all parallel (G_s = ones), teacher rows orthogonal: L = (n^2 - n) / n^2.
    n = 4
    z_s = torch.ones(n, 3)
    z_t = torch.eye(n)
    assert itrd_mutual_information(z_s, z_t).item() == pytest.approx((n * n - n) / n**2, abs=1e-6)


def test_gram_invariances():
    g = torch.Generator().manual_seed(5)
    z_s, z_t = torch.randn(9, 5, generator=g), torch.randn(9, 4, generator=g)
    base = itrd_mutual_information(z_s, z_t).item()
    scale_s = torch.rand(9, 1, generator=g) * 10 + 0.01
    scale_t = torch.rand(9, 1, generator=g) * 10 + 0.01
    assert itrd_mutual_information(z_s * scale_s, z_t * scale_t).item() == pytest.approx(base, abs=1e-6)
    perm = torch.randperm(9, generator=g)
    assert itrd_mutual_information(z_s[perm], z_t[perm]).item() == pytest.approx(base, abs=1e-6)
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=g))  # orthogonal feature rotation
    assert itrd_mutual_information(z_s @ q, z_t).item() == pytest.approx(base, abs=1e-6)


def test_gram_rejects_batch_mismatch():
    with pytest.raises(ValueError):
        itrd_mutual_information(torch.zeros(4, 3), torch.zeros(5, 3))


# --------------------------------------------------------------------------- KD


def test_kd_hand_example():
    # T = 4, teacher logits [4 ln3, 0] -> p_t = softmax([ln3, 0]) = [3/4, 1/4]; student [0, 0] ->
    # p_s = [1/2, 1/2]. KL(p_t || p_s) = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.3040988 - 0.1732868
    # = 0.1308120; times T^2 = 16 -> 2.0929924.
    s = torch.tensor([[0.0, 0.0]])
    t = torch.tensor([[4 * math.log(3.0), 0.0]])
    assert kd_loss(s, t, temperature=4.0).item() == pytest.approx(2.0929924, abs=1e-5)
    # batchmean: a batch of two copies has the same value.
    assert kd_loss(s.repeat(2, 1), t.repeat(2, 1), 4.0).item() == pytest.approx(2.0929924, abs=1e-5)
    # T = 1: logits [ln3, 0] vs [0, 0] give the bare KL.
    assert kd_loss(s, torch.tensor([[math.log(3.0), 0.0]]), 1.0).item() == pytest.approx(0.1308120, abs=1e-6)


def test_kd_zero_for_equal_logits_and_positive_otherwise():
    g = torch.Generator().manual_seed(6)
    z = torch.randn(5, 10, generator=g)
    assert kd_loss(z, z.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(z, z + 3.0).item() == pytest.approx(0.0, abs=1e-6)  # shift-invariant softmax
    assert kd_loss(z, torch.randn(5, 10, generator=g)).item() > 0.0


# --------------------------------------------------------------------------- Criterion


def _inputs(n=8, d_s=6, d_t=6, classes=5, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return LossInputs(
        logits=torch.randn(n, classes, generator=g).to(dtype).requires_grad_(True),
        labels=torch.randint(0, classes, (n,), generator=g),
        teacher_logits=torch.randn(n, classes, generator=g).to(dtype),
        feat=torch.randn(n, d_s, generator=g).to(dtype).requires_grad_(True),
        teacher_feat=torch.randn(n, d_t, generator=g).to(dtype),
    )


ALL_TERMS = [
    Term("ce", 1.0, {}),
    Term("kd", 0.5, {"temperature": 2.0}),
    Term("itrd_corr", 2.0, {"alpha": 1.5}),
    Term("itrd_mi", 0.25, {}),
]


def test_registry_names():
    assert {"ce", "kd", "itrd_corr", "itrd_mi"} <= set(LOSSES)


def test_criterion_terms_and_weighted_sum():
    torch.manual_seed(0)
    crit = Criterion(ALL_TERMS, student_dim=6, teacher_dim=10)
    x = _inputs(d_s=6, d_t=10)
    out = crit(x)
    assert set(out) == {"ce", "kd", "itrd_corr", "itrd_mi", "loss"}
    expected = {
        "ce": F.cross_entropy(x.logits, x.labels),
        "kd": kd_loss(x.logits, x.teacher_logits, 2.0),
        "itrd_corr": itrd_correlation(crit.embed(x.feat), x.teacher_feat, alpha=1.5),
        "itrd_mi": itrd_mutual_information(crit.embed(x.feat), x.teacher_feat),
    }
    for k, v in expected.items():
        assert out[k].item() == pytest.approx(v.item(), abs=1e-5), k
    total = 1.0 * out["ce"] + 0.5 * out["kd"] + 2.0 * out["itrd_corr"] + 0.25 * out["itrd_mi"]
    assert out["loss"].item() == pytest.approx(total.item(), abs=1e-5)
    out["loss"].backward()
    assert crit.embed.weight.grad is not None and crit.embed.weight.grad.abs().sum() > 0


def test_criterion_ce_only_has_no_embed():
    crit = Criterion([Term("ce", 1.0, {"label_smoothing": 0.1})])
    assert crit.embed is None and not crit.needs_teacher and not crit.needs_features
    x = _inputs()
    out = crit(x)
    assert set(out) == {"ce", "loss"}
    ref = F.cross_entropy(x.logits, x.labels, label_smoothing=0.1)
    assert out["loss"].item() == pytest.approx(ref.item(), abs=1e-6)


def test_itrd_mi_uses_embed_only_when_dims_differ():
    torch.manual_seed(1)
    same = Criterion([Term("itrd_mi", 1.0, {})], student_dim=6, teacher_dim=6)
    x = _inputs(d_s=6, d_t=6)
    out = same(x)
    assert out["itrd_mi"].item() == pytest.approx(itrd_mutual_information(x.feat, x.teacher_feat).item(), abs=1e-6)
    out["loss"].backward()
    assert same.embed.weight.grad is None and same.embed.bias.grad is None
    assert x.feat.grad is not None

    diff = Criterion([Term("itrd_mi", 1.0, {})], student_dim=6, teacher_dim=4)
    x = _inputs(d_s=6, d_t=4)
    diff(x)["loss"].backward()
    assert diff.embed.weight.grad is not None and diff.embed.weight.grad.abs().sum() > 0


def test_itrd_corr_always_projects():
    torch.manual_seed(2)
    crit = Criterion([Term("itrd_corr", 1.0, {})], student_dim=6, teacher_dim=6)
    x = _inputs(d_s=6, d_t=6)
    out = crit(x)
    projected = itrd_correlation(crit.embed(x.feat), x.teacher_feat).item()
    unprojected = itrd_correlation(x.feat, x.teacher_feat).item()
    assert out["itrd_corr"].item() == pytest.approx(projected, abs=1e-6)
    assert abs(projected - unprojected) > 1e-3
    out["loss"].backward()
    assert crit.embed.weight.grad is not None and crit.embed.weight.grad.abs().sum() > 0


def test_criterion_fp32_under_bf16_autocast():
    torch.manual_seed(3)
    crit = Criterion(ALL_TERMS, student_dim=6, teacher_dim=10)
    x = _inputs(n=16, d_s=6, d_t=10, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = crit(x)
    for k, v in out.items():
        assert v.dtype == torch.float32, k
    # Same numbers as with fp32 copies of the bf16 inputs and no autocast: the projection ran
    # in fp32 too (a bf16 Linear would be off by ~1e-2 relative).
    x32 = LossInputs(x.logits.float(), x.labels, x.teacher_logits.float(), x.feat.float(), x.teacher_feat.float())
    ref = crit(x32)
    for k in out:
        assert out[k].item() == pytest.approx(ref[k].item(), rel=1e-5, abs=1e-6), k


def test_unknown_loss_name_did_you_mean():
    with pytest.raises(RecipeError, match=r"did you mean 'itrd_corr'"):
        Criterion([Term("itrd_cor", 1.0, {})], 4, 4)


def test_unknown_loss_param_did_you_mean():
    with pytest.raises(RecipeError, match=r"did you mean 'temperature'"):
        Criterion([Term("kd", 1.0, {"temprature": 2.0})])
    with pytest.raises(RecipeError, match=r"has no parameter 'alpha'"):
        Criterion([Term("itrd_mi", 1.0, {"alpha": 2.0})], 4, 4)


def test_non_numeric_loss_param_rejected():
    with pytest.raises(RecipeError):
        Criterion([Term("kd", 1.0, {"temperature": "4"})])
    with pytest.raises(RecipeError):
        Criterion([Term("kd", 1.0, {"temperature": True})])


def test_itrd_criterion_has_the_paper_weights():
    from bnn_distill.losses import Criterion, LossInputs, itrd_correlation, itrd_mutual_information

    torch.manual_seed(0)
    crit = Criterion.itrd(6, 4)
    assert [(t.name, t.weight) for t in crit.terms] == [("ce", 1.0), ("itrd_corr", 2.0), ("itrd_mi", 1.0)]
    logits, labels = torch.randn(8, 3), torch.randint(0, 3, (8,))
    z_s, z_t = torch.randn(8, 6), torch.randn(8, 4)
    out = crit(LossInputs(logits, labels, None, z_s, z_t))
    proj = crit.embed(z_s)
    expected = (
        torch.nn.functional.cross_entropy(logits, labels)
        + 2.0 * itrd_correlation(proj, z_t)
        + itrd_mutual_information(proj, z_t)
    )
    assert torch.allclose(out["loss"], expected)
