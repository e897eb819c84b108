"""Bootstrap metrics against scikit-learn and against known truth."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binom, norm
from sklearn.metrics import roc_auc_score

from mil.errors import OptionError
from mil.evaluate.metrics import auc_ci, bootstrap_indices, curve_bands, paired_auc_test, resampled_auc, threshold_metrics


def scores(n_pos, n_neg, d, rng):
    y = np.r_[np.ones(n_pos, int), np.zeros(n_neg, int)]
    return y, np.r_[rng.normal(d, 1, n_pos), rng.normal(0, 1, n_neg)]


def test_auc_and_interval_match_sklearn_and_are_reproducible():
    y, p = scores(30, 50, 1.0, np.random.default_rng(0))
    a = auc_ci(y, p, n_boot=300, seed=4)
    assert a["auc"] == pytest.approx(roc_auc_score(y, p))
    assert a["ci_low"] < a["auc"] < a["ci_high"] and a["ci_high"] - a["ci_low"] < 0.4
    assert auc_ci(y, p, n_boot=300, seed=4) == a and auc_ci(y, p, n_boot=300, seed=5) != a


def test_resamples_are_stratified():
    y = np.r_[np.ones(7, int), np.zeros(20, int)]
    idx = bootstrap_indices(y, 50, 0)  # (50, 27)
    assert idx.shape == (50, 27) and (y[idx].sum(1) == 7).all()


def test_resampled_auc_is_roc_auc_score_of_each_resample():
    """The rank-sum AUC of all resamples at once equals scikit-learn's, ties included (scores rounded to 0.1)."""
    rng = np.random.default_rng(2)
    y, p = scores(13, 21, 0.8, rng)
    y, p = rng.permutation(y), np.round(p, 1)  # labels in no particular order; many ties
    idx = bootstrap_indices(y, 40, 1)  # (40, 34)
    expected = [roc_auc_score(y[i], p[i]) for i in idx]
    np.testing.assert_allclose(resampled_auc(y, p, idx), expected, rtol=0, atol=1e-12)


def test_threshold_metrics_by_hand():
    y = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    yhat = [1, 1, 1, 0, 1, 0, 0, 0, 0, 0]  # TP 3, FN 1, FP 1, TN 5
    m = threshold_metrics(y, yhat)
    assert m["sensitivity"] == pytest.approx(3 / 4) and m["specificity"] == pytest.approx(5 / 6)
    assert m["balanced_accuracy"] == pytest.approx((3 / 4 + 5 / 6) / 2)
    assert m["f1"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 1)) and m["accuracy"] == pytest.approx(0.8)


def test_paired_test_sees_a_real_difference_and_no_difference():
    rng = np.random.default_rng(1)
    y, weak = scores(60, 60, 0.3, rng)
    strong = weak + 2.0 * y  # the same slides, far better separated
    t = paired_auc_test(y, weak, strong, n_boot=500, seed=0)
    assert t["diff"] > 0.2 and t["ci_low"] > 0 and t["p_value"] < 0.01
    same = paired_auc_test(y, weak, weak, n_boot=200, seed=0)
    assert same["diff"] == 0 and same["p_value"] == 1.0


def test_curve_bands_enclose_the_curve():
    y, p = scores(40, 40, 1.5, np.random.default_rng(2))
    c = curve_bands(y, p, n_boot=200, seed=0)
    tpr = np.interp(c["grid"], c["fpr"], c["tpr"])
    inside = (c["tpr_low"] <= tpr + 1e-9) & (tpr <= c["tpr_high"] + 1e-9)
    assert inside.mean() > 0.9 and (c["tpr_low"] <= c["tpr_high"]).all()


@pytest.mark.parametrize(
    "y, p, match", [([1, 1, 1], [0.1, 0.2, 0.3], "both classes"), ([0, 2], [0.1, 0.2], "labels 0/1"), ([0, 1], [0.1, np.nan], "finite")]
)
def test_bad_predictions_are_refused(y, p, match):
    with pytest.raises(OptionError, match=match):
        auc_ci(y, p, n_boot=10)


def delong_se(y: np.ndarray, p: np.ndarray) -> float:
    """DeLong et al. (1988) standard error of the AUC, from the placement values of each class."""
    x, z = p[y == 1], p[y == 0]
    psi = (x[:, None] > z[None, :]) + 0.5 * (x[:, None] == z[None, :])  # (n1, n0)
    return float(np.sqrt(psi.mean(1).var(ddof=1) / len(x) + psi.mean(0).var(ddof=1) / len(z)))


@pytest.mark.slow
def test_interval_covers_the_true_auc_about_95_percent_of_the_time():
    """Binormal scores with known AUC Φ(d/√2): the 95 % interval should hold it in ~95 % of repetitions, and be
    about as wide as the normal-approximation interval AUC ± 1.96·SE (DeLong SE), not wider.

    With nominal coverage 0.95 the number of hits in 100 repetitions is Binomial(100, 0.95), so [88, 99] fails a
    correct interval with probability P(X ≤ 87) + P(X = 100) ≈ 0.1 % + 0.6 %; an interval that always covers
    (e.g. [0, 1]) gives 100 and fails; an 80 % interval (mean ≈ 80 hits) fails too. The width ratio catches an interval too wide to miss
    (the percentile bootstrap and DeLong agree within a few % at n = 100; measured mean ratio 0.98)."""
    d = 1.0
    true_auc = norm.cdf(d / np.sqrt(2))
    rng = np.random.default_rng(0)
    reps = 100
    hits, ratios = 0, []
    for r in range(reps):
        y, p = scores(50, 50, d, rng)
        a = auc_ci(y, p, n_boot=400, seed=r)
        hits += a["ci_low"] <= true_auc <= a["ci_high"]
        ratios.append((a["ci_high"] - a["ci_low"]) / (2 * norm.ppf(0.975) * delong_se(y, p)))
    assert binom.cdf(87, reps, 0.95) + binom.pmf(reps, reps, 0.95) < 0.01  # the band's false-alarm rate
    assert 88 <= hits <= reps - 1, hits
    assert 0.85 <= np.mean(ratios) <= 1.15 and max(ratios) < 1.5, (np.mean(ratios), max(ratios))


def test_delong_se_of_the_width_check_matches_hanley_mcneil():
    """The reference SE used above, checked on its own: for binormal scores it agrees with Hanley & McNeil (1982)."""
    y, p = scores(400, 400, 1.0, np.random.default_rng(3))
    auc = roc_auc_score(y, p)
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    hm = np.sqrt((auc * (1 - auc) + 399 * (q1 - auc**2) + 399 * (q2 - auc**2)) / (400 * 400))
    assert delong_se(y, p) == pytest.approx(hm, rel=0.15)
