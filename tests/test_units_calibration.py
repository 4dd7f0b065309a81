"""Unit tests of cifarflow.calibration: ECE on known cases and against a plain per-bin loop,
NLL and Brier by hand, the temperature fit, and the numpy and TensorFlow formulas agreeing."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_same_png_later

from cifarflow import calibration as cal


def top_label(confidences: list[float], correct: list[bool], classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """(probs, labels) whose max probability is each confidence, on class 0, right or wrong as told."""
    probs = np.array([[c, *[(1 - c) / (classes - 1)] * (classes - 1)] for c in confidences])
    labels = np.array([0 if ok else 1 for ok in correct])
    return probs, labels


def ece_by_loop(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """The textbook definition, one bin at a time, edges (k/bins, (k+1)/bins]."""
    confidence, correct, total = probs.max(1), probs.argmax(1) == labels, 0.0
    for k in range(bins):
        inside = (confidence > k / bins) & (confidence <= (k + 1) / bins)
        if inside.any():
            total += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return total


def test_ece_of_a_known_toy_case() -> None:
    # four at 0.9, three right (gap 0.15); two at 0.6, one right (gap 0.1): 4/6 * 0.15 + 2/6 * 0.1
    probs, labels = top_label([0.9] * 4 + [0.6] * 2, [True, True, True, False, True, False])
    assert cal.ece(probs, labels) == pytest.approx(4 / 6 * 0.15 + 2 / 6 * 0.1, abs=1e-12)


def test_ece_pools_gaps_within_a_bin_not_across_bins() -> None:
    # 0.50 and 0.52 share the bin (7/15, 8/15]: one right, one wrong, gap |0.5 - 0.51|
    same_bin = top_label([0.50, 0.52], [True, False])
    assert cal.ece(*same_bin) == pytest.approx(0.01, abs=1e-12)
    # 0.50 and 0.54 do not (0.54 > 8/15): each bin keeps its own gap
    two_bins = top_label([0.50, 0.54], [True, False])
    assert cal.ece(*two_bins) == pytest.approx((0.5 + 0.54) / 2, abs=1e-12)


def test_ece_edges_are_right_closed_and_a_certain_prediction_is_in_the_last_bin() -> None:
    assert cal.ece(*top_label([1.0], [True])) == 0.0 and cal.ece(*top_label([1.0], [False])) == 1.0
    counts = cal.reliability(*top_label([1.0, 14 / 15 + 1e-9, 0.5], [True] * 3))[2]
    assert counts[14] == 2 and counts[7] == 1 and counts.sum() == 3
    # float32 rows may sum a hair above 1: such a confidence still falls in the last bin
    over = np.array([[1.0000001, 0.0]], np.float32)
    assert cal.reliability(over, np.array([0]))[2].tolist() == [0] * 14 + [1] and cal.ece(over, np.array([0])) < 1e-6


def test_reliability_reports_each_bins_mean_confidence_and_accuracy() -> None:
    probs, labels = top_label([0.88, 0.9, 0.92, 0.5], [True, True, False, False])
    confidence, accuracy, count = cal.reliability(probs, labels)
    assert count[13] == 3 and confidence[13] == pytest.approx(0.9) and accuracy[13] == pytest.approx(2 / 3)
    assert count[7] == 1 and confidence[7] == pytest.approx(0.5) and accuracy[7] == 0.0
    assert np.isnan(confidence[0]) and np.isnan(accuracy[0]) and count.sum() == 4


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ece_agrees_with_the_per_bin_loop(seed: int) -> None:
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, (500, 10))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = rng.integers(0, 10, 500)
    assert cal.ece(probs, labels) == pytest.approx(ece_by_loop(probs, labels), abs=1e-12)
    assert cal.ece(np.zeros((0, 10)), np.zeros(0, np.int64)) == 0.0


def test_nll_and_brier_by_hand() -> None:
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.0, 0.0, 1.0]])
    labels = np.array([0, 2, 2])
    assert cal.nll(probs, labels) == pytest.approx(-(np.log(0.7) + np.log(0.1) + 0) / 3)
    assert cal.brier(probs, labels) == pytest.approx(((0.09 + 0.04 + 0.01) + (0.01 + 0.64 + 0.81) + 0) / 3)
    # a zero probability of the true class is finite (float32's smallest normal), not inf
    assert np.isfinite(cal.nll(np.array([[1.0, 0.0]]), np.array([1])))
    one = np.array([[0.8, 0.2]])
    assert cal.brier(one, np.array([1])) == pytest.approx(0.64 + 0.64) and cal.nll(one, np.array([1])) == pytest.approx(
        -np.log(0.2)
    )
    empty = (np.zeros((0, 3)), np.zeros(0, np.int64))
    assert cal.nll(*empty) == 0.0 and cal.brier(*empty) == 0.0 and cal.ece(*empty) == 0.0


def overconfident(n: int, temperature: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from softmax(z) and probabilities softmax(temperature * z): a model whose
    log-probabilities are `temperature` times too sharp, so the best fitted T is about that."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, (n, 10))
    true = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    labels = np.array([rng.choice(10, p=row) for row in true])
    sharp = np.exp(temperature * z) / np.exp(temperature * z).sum(1, keepdims=True)
    return sharp.astype(np.float32), labels


def test_temperature_fit_recovers_the_sharpening_lowers_nll_and_keeps_argmax() -> None:
    probs, labels = overconfident(20_000, 2.5)
    t = cal.fit_temperature(probs, labels)
    assert t == pytest.approx(2.5, rel=0.05) and t == round(t, 6)
    fixed = cal.calibrated(probs, t)
    assert cal.nll(fixed, labels) < cal.nll(probs, labels) - 0.1
    assert cal.ece(fixed, labels) < cal.ece(probs, labels) / 3
    assert (fixed.argmax(1) == probs.argmax(1)).all()
    # the fit is a minimum: a little hotter or colder is worse
    assert cal.nll(cal.calibrated(probs, t * 1.1), labels) > cal.nll(fixed, labels)
    assert cal.nll(cal.calibrated(probs, t / 1.1), labels) > cal.nll(fixed, labels)


def test_temperature_of_calibrated_or_empty_data_is_about_one() -> None:
    probs, labels = overconfident(20_000, 1.0, seed=1)
    assert cal.fit_temperature(probs, labels) == pytest.approx(1.0, rel=0.05)
    assert cal.fit_temperature(np.zeros((0, 10)), np.zeros(0, np.int64)) == 1.0
    # one confident mistake is enough to fit on: the hottest temperature allowed softens it most
    assert cal.fit_temperature(np.array([[0.9, 0.1]]), np.array([1])) == pytest.approx(np.exp(cal.LOG_T_BOUNDS[1]), rel=1e-3)
    under, labels = overconfident(20_000, 0.5, seed=2)  # underconfident: T < 1 sharpens
    assert cal.fit_temperature(under, labels) == pytest.approx(0.5, rel=0.05)


def test_calibrated_is_softmax_of_log_probs_over_t() -> None:
    probs, _ = overconfident(64, 3.0)
    probs[0] = np.eye(10)[3]  # zeros: their logs stay finite
    for t in (0.5, 1.0, 1.7):
        want = np.exp(np.log(np.maximum(probs.astype(np.float64), cal.TINY)) / t)
        want /= want.sum(1, keepdims=True)
        got = cal.calibrated(probs, t)
        assert got.dtype == np.float32 and np.abs(got - want).max() < 1e-6
    assert np.abs(cal.calibrated(probs, 1.0) - probs).max() < 1e-6


def test_calibrated_tf_is_the_numpy_formula() -> None:
    """The serving graph's version (TensorFlow: deselected in mutation runs, whose forked workers hang in it)."""
    import tensorflow as tf

    probs, _ = overconfident(64, 3.0)
    probs[0] = np.eye(10)[3]
    for t in (0.5, 1.0, 1.7):
        assert np.abs(cal.calibrated_tf(tf.constant(probs), t).numpy() - cal.calibrated(probs, t)).max() < 1e-6


def test_reliability_png_is_deterministic() -> None:
    probs, labels = overconfident(300, 2.0)
    curves = {"raw": (probs, labels), "T": (cal.calibrated(probs, 2.0), labels)}
    assert_same_png_later(lambda: cal.reliability_png(curves, "toy"))
