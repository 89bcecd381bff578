"""tether.algo.masked: hand-computed cases and naive-loop equivalence."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.algo import explained_variance, masked_mean, masked_sum, masked_var, masked_whiten

PROPERTY = settings(max_examples=50, deadline=None)

X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
M = torch.tensor([[True, True, False], [True, False, False]])  # real values: 1, 2, 4


@st.composite
def batch_and_mask(draw, allow_holes=True):
    """(x, mask) float64 of shape (B, R); mask a True prefix per row or arbitrary."""
    b, r = draw(st.integers(1, 4)), draw(st.integers(1, 6))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(b, r, generator=gen, dtype=torch.float64) * draw(st.sampled_from([0.1, 1.0, 30.0]))
    if allow_holes and draw(st.booleans()):
        mask = torch.rand(b, r, generator=gen) < 0.6
    else:
        lengths = torch.tensor(draw(st.lists(st.integers(0, r), min_size=b, max_size=b)))
        mask = torch.arange(r)[None, :] < lengths[:, None]
    return x, mask


def real_values(x, mask):
    return [float(v) for v, m in zip(x.flatten().tolist(), mask.flatten().tolist()) if m]


# ---------------------------------------------------------------- hand-computed


def test_masked_sum_hand_computed():
    assert masked_sum(X, M).item() == 7.0  # 1 + 2 + 4
    assert masked_sum(X, M, dim=1).tolist() == [3.0, 4.0]  # row sums 1+2, 4
    assert masked_sum(X, M, dim=0).tolist() == [5.0, 2.0, 0.0]  # column sums 1+4, 2, none


def test_masked_sum_accepts_01_int_mask():
    assert masked_sum(X, M.long()).item() == 7.0
    assert masked_sum(X, M.float()).item() == 7.0


def test_masked_mean_hand_computed():
    assert masked_mean(X, M).item() == pytest.approx(7.0 / 3.0)
    assert masked_mean(X, M, dim=1).tolist() == [1.5, 4.0]
    assert masked_mean(X, M, dim=0).tolist() == [2.5, 2.0, 0.0]  # empty column -> 0, not NaN


def test_masked_mean_empty_mask_is_zero_not_nan():
    empty = torch.zeros_like(M)
    assert masked_mean(X, empty).item() == 0.0
    assert masked_mean(X, empty, dim=1).tolist() == [0.0, 0.0]


def test_masked_var_hand_computed():
    # values 1, 2, 4: mean 7/3; squared deviations 16/9 + 1/9 + 25/9 = 42/9
    assert masked_var(X, M).item() == pytest.approx(42 / 9 / 3)  # biased: 14/9
    assert masked_var(X, M, unbiased=True).item() == pytest.approx(42 / 9 / 2)  # 7/3
    one = torch.tensor([[True, False, False], [False, False, False]])
    assert masked_var(X, one).item() == 0.0
    assert masked_var(X, one, unbiased=True).item() == 0.0  # N - 1 = 0: 0, not NaN
    assert masked_var(X, torch.zeros_like(M)).item() == 0.0


def test_masked_whiten_hand_computed():
    x = torch.tensor([[1.0, 3.0, 5.0, 100.0]])
    m = torch.tensor([[1, 1, 1, 0]])
    # mean 3, biased var (4 + 0 + 4) / 3 = 8/3 -> (-2, 0, 2) / sqrt(8/3) = -/+ sqrt(3/2)
    out = masked_whiten(x, m, eps=0.0)
    s = math.sqrt(1.5)
    assert out[0].tolist() == pytest.approx([-s, 0.0, s, 0.0])
    out = masked_whiten(x, m, shift_mean=False, eps=0.0)  # mean added back
    assert out[0].tolist() == pytest.approx([3 - s, 3.0, 3 + s, 0.0])
    # eps in the denominator: var 8/3 + eps
    out = masked_whiten(x, m, eps=1.0)
    assert out[0, 0].item() == pytest.approx(-2 / math.sqrt(8 / 3 + 1))


def test_explained_variance_hand_computed():
    m = torch.tensor([[1, 1, 1, 0]])
    returns = torch.tensor([[1.0, 2.0, 3.0, 50.0]])
    assert explained_variance(returns.clone(), returns, m).item() == pytest.approx(1.0)  # perfect critic
    # constant prediction at the mean: Var[R - V] = Var[R] -> 0
    assert explained_variance(torch.full_like(returns, 2.0), returns, m).item() == pytest.approx(0.0)
    # V = (1, 2, 2): R - V = (0, 0, 1), var 2/9; Var[R] = 2/3 -> 1 - 1/3
    values = torch.tensor([[1.0, 2.0, 2.0, -9.0]])
    assert explained_variance(values, returns, m).item() == pytest.approx(2 / 3)
    # V = (3, 2, 1): R - V = (-2, 0, 2), var 8/3 -> 1 - 4 = -3 (worse than a constant)
    values = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    assert explained_variance(values, returns, m).item() == pytest.approx(-3.0)


def test_explained_variance_degenerate_is_zero_not_nan():
    m = torch.tensor([[1, 1, 0]])
    const = torch.tensor([[2.0, 2.0, 7.0]])  # Var[R] == 0 over real tokens
    ev = explained_variance(torch.tensor([[0.0, 1.0, 0.0]]), const, m)
    assert ev.dim() == 0 and ev.item() == 0.0
    assert explained_variance(const, const, torch.zeros_like(m)).item() == 0.0
    assert not explained_variance(const.requires_grad_(), const, m).requires_grad


# ---------------------------------------------------------------- naive-loop equivalence


@PROPERTY
@given(batch_and_mask())
def test_masked_mean_var_match_naive_loop(xm):
    x, mask = xm
    vals = real_values(x, mask)
    n = len(vals)
    mean = sum(vals) / n if n else 0.0
    var = sum((v - mean) ** 2 for v in vals) / n if n else 0.0
    uvar = sum((v - mean) ** 2 for v in vals) / (n - 1) if n > 1 else 0.0
    assert masked_sum(x, mask).item() == pytest.approx(sum(vals), abs=1e-9)
    assert masked_mean(x, mask).item() == pytest.approx(mean, abs=1e-9)
    assert masked_var(x, mask).item() == pytest.approx(var, rel=1e-9, abs=1e-9)
    assert masked_var(x, mask, unbiased=True).item() == pytest.approx(uvar, rel=1e-9, abs=1e-9)
    for i in range(x.shape[0]):  # per-row reduction
        row = real_values(x[i : i + 1], mask[i : i + 1])
        expected = sum(row) / len(row) if row else 0.0
        assert masked_mean(x, mask, dim=1)[i].item() == pytest.approx(expected, abs=1e-9)


@PROPERTY
@given(batch_and_mask(), st.booleans())
def test_masked_whiten_matches_naive_loop(xm, shift_mean):
    x, mask = xm
    vals = real_values(x, mask)
    n = len(vals)
    mean = sum(vals) / n if n else 0.0
    var = sum((v - mean) ** 2 for v in vals) / n if n else 0.0
    out = masked_whiten(x, mask, shift_mean=shift_mean)
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            if mask[i, j]:
                expected = (x[i, j].item() - mean) / math.sqrt(var + 1e-8) + (0.0 if shift_mean else mean)
            else:
                expected = 0.0
            assert out[i, j].item() == pytest.approx(expected, rel=1e-7, abs=1e-7)
    if shift_mean and n > 1 and var > 1e-3:  # whitened real tokens: mean 0, biased std 1
        assert masked_mean(out, mask).item() == pytest.approx(0.0, abs=1e-9)
        assert masked_var(out, mask).item() == pytest.approx(var / (var + 1e-8), rel=1e-9)
