"""eval.metrics against sklearn, torchmetrics and straightforward NumPy re-derivations."""

import itertools
import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import brier_score_loss, roc_auc_score
from torchmetrics.functional.classification import binary_calibration_error

from vlcal_jax.eval import metrics, plots


def _random_cases(seed: int, n_cases: int):
    """Random (confidence, correct) batches: continuous, k/10 (verbalized), and 2-decimal (ties)."""
    rng = np.random.default_rng(seed)
    for case in range(n_cases):
        n = int(rng.integers(2, 300))
        kind = case % 3
        if kind == 0:
            confidence = rng.random(n)
        elif kind == 1:
            confidence = rng.integers(0, 11, n) / 10
        else:
            confidence = np.round(rng.random(n), 2)
        correct = rng.random(n) < confidence
        yield confidence, correct


def _paper_ece_loop(confidence, correct, n_bins=10):
    """The released evaluation loop, written out as it is in the authors' code."""
    bins = np.linspace(0, 1, n_bins + 1)
    ece, total = 0.0, len(confidence)
    for i in range(n_bins):
        start, end = bins[i], bins[i + 1]
        if i == n_bins - 1:
            idx = [j for j, val in enumerate(confidence) if start <= val <= end]
        else:
            idx = [j for j, val in enumerate(confidence) if start <= val < end]
        if not idx:
            continue
        avg_conf = np.mean([confidence[j] for j in idx])
        avg_acc = np.mean([float(correct[j]) for j in idx])
        ece += abs(avg_conf - avg_acc) * len(idx) / total
    return ece


def _torchmetrics_ece(confidence, correct, n_bins=10):
    return binary_calibration_error(
        torch.tensor(confidence, dtype=torch.float32), torch.tensor(np.asarray(correct, dtype=np.int64)), n_bins=n_bins
    ).item()


def test_auroc_and_brier_match_sklearn():
    for confidence, correct in _random_cases(0, 150):
        assert metrics.brier(confidence, correct) == pytest.approx(brier_score_loss(correct, confidence), abs=1e-9)
        if correct.all() or not correct.any():
            continue
        assert metrics.auroc(confidence, correct) == pytest.approx(roc_auc_score(correct, confidence), abs=1e-9)


def test_auroc_one_class_is_nan_with_warning():
    with pytest.warns(RuntimeWarning, match="undefined"):
        assert np.isnan(metrics.auroc([0.2, 0.9, 0.5], [1, 1, 1]))
    with pytest.warns(RuntimeWarning, match="undefined"):
        assert np.isnan(metrics.auroc([0.2, 0.9], [False, False]))


def test_auroc_hand_case_with_ties():
    # Positives 0.8, 0.5; negatives 0.5, 0.2: pairs (0.8>0.5, 0.8>0.2, 0.5=0.5 -> 1/2, 0.5>0.2) = 3.5 / 4.
    assert metrics.auroc([0.8, 0.5, 0.5, 0.2], [1, 1, 0, 0]) == 0.875


def test_ece_paper_convention_equals_released_loop_exactly():
    for confidence, correct in _random_cases(1, 300):
        assert metrics.ece(confidence, correct, convention="paper") == _paper_ece_loop(confidence, correct)
    for n_bins in (1, 3, 7, 15):
        confidence, correct = next(_random_cases(n_bins, 1))
        assert metrics.ece(confidence, correct, n_bins, "paper") == _paper_ece_loop(confidence, correct, n_bins)


def test_ece_torchmetrics_convention_equals_torchmetrics_exactly():
    for confidence, correct in _random_cases(2, 300):
        assert metrics.ece(confidence, correct, convention="torchmetrics") == _torchmetrics_ece(confidence, correct)
    rng = np.random.default_rng(3)
    for n_bins in (1, 2, 5, 15, 33, 100, 700):
        confidence = rng.integers(0, 101, 500) / 100
        correct = rng.random(500) < confidence
        assert metrics.ece(confidence, correct, n_bins, "torchmetrics") == _torchmetrics_ece(confidence, correct, n_bins)


def test_k_over_10_confidences_on_float_edges():
    # 0.3, 0.6, 0.7 fall below their float64 linspace edge ("paper") but not below the float32 one;
    # "paper" closes the last bin (0.9 and 1.0 together), torchmetrics gives 1.0 an extra bin.
    confidence = np.arange(11) / 10
    paper = metrics.reliability_data(confidence, np.ones(11), convention="paper")
    torchm = metrics.reliability_data(confidence, np.ones(11), convention="torchmetrics")
    assert paper.count.tolist() == [1, 1, 2, 0, 1, 2, 1, 0, 1, 2]
    assert torchm.count.tolist() == [1] * 11
    # All at 0.3, all correct: paper bins it in [0.2, 0.3), torchmetrics in [0.3, 0.4); ECE is 0.7 either way.
    assert metrics.reliability_data([0.3] * 4, [1] * 4, convention="paper").count[2] == 4
    assert metrics.reliability_data([0.3] * 4, [1] * 4, convention="torchmetrics").count[3] == 4


def test_ece_hand_case():
    # Bin [0.2, 0.3): 0.25 x2 wrong; bin [0.9, 1.0]: 0.95, 1.0 right. ECE = 0.5*0.25 + 0.5*|0.975 - 1| = 0.1375.
    assert metrics.ece([0.25, 0.25, 0.95, 1.0], [0, 0, 1, 1]) == pytest.approx(0.1375, abs=1e-15)


def test_aurc_without_ties_equals_cumulative_risk():
    rng = np.random.default_rng(4)
    confidence = rng.permutation(50) / 50
    correct = rng.random(50) < confidence
    order = np.argsort(-confidence)
    risks = np.cumsum(1 - correct[order]) / np.arange(1, 51)
    coverage, risk = metrics.risk_coverage(confidence, correct)
    np.testing.assert_allclose(risk, risks, rtol=0, atol=1e-12)
    np.testing.assert_allclose(coverage, np.arange(1, 51) / 50)
    assert metrics.aurc(confidence, correct) == pytest.approx(risks.mean(), abs=1e-12)


def test_aurc_with_ties_is_mean_over_orders_of_tied_answers():
    confidence = np.array([0.9, 0.9, 0.9, 0.5, 0.5, 0.1])
    correct = np.array([1, 0, 1, 0, 1, 0])
    values = []
    tie_groups = [np.flatnonzero(confidence == c) for c in (0.9, 0.5, 0.1)]
    for perms in itertools.product(*(itertools.permutations(g) for g in tie_groups)):
        order = np.concatenate(perms)
        values.append(np.mean(np.cumsum(1 - correct[order]) / np.arange(1, 7)))
    assert metrics.aurc(confidence, correct) == pytest.approx(np.mean(values), abs=1e-12)


def test_accuracy_and_input_errors():
    assert metrics.accuracy([True, False, True, True]) == 0.75
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        metrics.ece([0.5, 7.0], [1, 0])
    with pytest.raises(ValueError, match="entries"):
        metrics.brier([0.5, 0.5], [1])
    with pytest.raises(ValueError, match="not 0/1"):
        metrics.brier([0.5], [2])
    with pytest.raises(ValueError, match="not finite"):
        metrics.auroc([np.nan, 0.5], [1, 0])
    with pytest.raises(ValueError, match="convention"):
        metrics.ece([0.5], [1], convention="sklearn")


def test_reliability_diagram_writes_png(tmp_path):
    rng = np.random.default_rng(5)
    confidence = rng.integers(0, 11, 200) / 10
    correct = rng.random(200) < confidence
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for convention in ("paper", "torchmetrics"):
            path = tmp_path / "plots" / f"reliability_{convention}.png"
            ece = plots.reliability_diagram(confidence, correct, path, convention=convention, title="test")
            assert ece == metrics.ece(confidence, correct, convention=convention)
            data = path.read_bytes()
            assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) > 5_000


def test_bootstrap_intervals_equal_the_metrics_of_each_resample():
    # the vectorised intervals are the quantiles of ece() and sklearn's AUROC over the same resamples
    rng = np.random.default_rng(3)
    conf = rng.integers(0, 11, 300) / 10.0
    correct = rng.random(300) < conf
    out = metrics.bootstrap_intervals(conf, correct, n_resamples=200, seed=7)
    draws = np.random.default_rng(7).integers(0, 300, size=(200, 300))
    eces = [metrics.ece(conf[i], correct[i]) for i in draws]
    aurocs = [roc_auc_score(correct[i], conf[i]) for i in draws]
    np.testing.assert_allclose(out["ece"], np.quantile(eces, [0.025, 0.975]), rtol=0, atol=1e-12)
    np.testing.assert_allclose(out["auroc"], np.quantile(aurocs, [0.025, 0.975]), rtol=0, atol=1e-12)
    assert out["ece"][0] <= metrics.ece(conf, correct) <= out["ece"][1]
    assert out["auroc"][0] <= metrics.auroc(conf, correct) <= out["auroc"][1]
    assert metrics.bootstrap_intervals(conf, correct, n_resamples=200, seed=7) == out


def test_bootstrap_intervals_narrow_with_more_examples_and_skip_one_class_resamples():
    rng = np.random.default_rng(0)

    def width(n):
        conf = rng.random(n)
        low, high = metrics.bootstrap_intervals(conf, rng.random(n) < conf, n_resamples=300)["auroc"]
        return high - low

    assert width(2000) < 0.6 * width(100)
    out = metrics.bootstrap_intervals([0.9, 0.8, 0.7], [True, True, True], n_resamples=50)
    assert np.isnan(out["auroc"]).all() and np.isfinite(out["ece"]).all()
