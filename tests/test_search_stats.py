"""kendall_tau (scipy's tau-b, infinities ranked as extremes, never NaN) and As-ViT's combined rank."""
import math

import numpy as np
import pytest
from scipy import stats as sps

from asvit_kernels.search.stats import combined_rank, kendall_tau

INF = math.inf


def test_matches_scipy_tau_b_with_ties():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 5, 30).astype(float)  # many ties
    y = x + rng.normal(0, 2, 30)
    y[:6] = y[0]
    expected = sps.kendalltau(x, y).statistic
    assert kendall_tau(x.tolist(), y.tolist()) == pytest.approx(expected, abs=1e-12)
    assert 0 < expected < 1


def test_perfect_and_reversed_orders():
    acc = [0.1, 0.4, 0.2, 0.9]
    assert kendall_tau([1, 4, 2, 9], acc) == pytest.approx(1.0)
    assert kendall_tau([-1, -4, -2, -9], acc) == pytest.approx(-1.0)


def test_infinite_kappa_is_the_worst_rank():
    kappa = [3.0, INF, 10.0, 1.0, INF]
    acc = [0.6, 0.1, 0.5, 0.8, 0.2]
    neg = [-k for k in kappa]
    tau = kendall_tau(neg, acc)
    # the same order with the infinities replaced by a huge finite kappa
    finite = [-(k if math.isfinite(k) else 1e300) for k in kappa]
    assert tau == pytest.approx(sps.kendalltau(finite, acc).statistic, abs=1e-12)
    assert math.isfinite(tau) and tau > 0.8
    assert kendall_tau(kappa, acc) == pytest.approx(-tau)
    assert kendall_tau([INF, -INF, 0.0], [3, 1, 2]) == pytest.approx(1.0)


def test_constant_input_gives_zero_not_nan():
    assert kendall_tau([INF, INF, INF], [0.1, 0.2, 0.3]) == 0.0
    assert kendall_tau([1.0, 2.0, 3.0], [0.5, 0.5, 0.5]) == 0.0


@pytest.mark.parametrize("x, y, match", [
    ([1, 2, 3], [1, 2], "3 items but accuracies has 2"),
    ([1], [1], "at least 2"),
    ([1, math.nan], [1, 2], "NaN"),
    ([1, 2], [math.nan, 2], "NaN"),
    ([[1, 2]], [[1, 2]], "1-D"),
])
def test_kendall_errors(x, y, match):
    with pytest.raises(ValueError, match=match):
        kendall_tau(x, y)


def test_combined_rank_sums_kappa_ascending_and_le_descending():
    kappas = [10.0, 2.0, 5.0, 1.0]
    les = [4.0, 1.0, 3.0, 2.0]
    # kappa ranks 4 2 3 1; L^E ranks (descending) 1 4 2 3
    np.testing.assert_array_equal(combined_rank(kappas, les), [5, 6, 5, 4])


def test_combined_rank_ties_and_non_finite():
    r = combined_rank([INF, 1.0, INF, math.nan], [2.0, -INF, math.nan, 5.0])
    # kappa: 1.0 first, then three worst tied (inf, inf, nan->inf) -> 1, 3, 3, 3 with 2,3,4 averaged
    # L^E descending: 5 first, 2 second, then -inf and nan->-inf tied at 3.5
    np.testing.assert_array_equal(r, [3 + 2, 1 + 3.5, 3 + 3.5, 3 + 1])
    assert r.dtype == np.float64


def test_combined_rank_errors():
    with pytest.raises(ValueError, match="2 items"):
        combined_rank([1, 2], [1])
    with pytest.raises(ValueError, match="at least one"):
        combined_rank([], [])
