"""Confidence calibration: how far a model's probabilities are from its accuracy, and temperature
scaling (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017) to bring them closer.

The models end in a softmax (whitened_vgg averages its test-time views' logits before it), so the
temperature divides the log-probabilities: softmax(log p / T) equals softmax(z / T) for the logits
z behind p, because log p and z differ by one constant per row. One temperature is fitted on val
NLL; it changes no argmax. `calibrated` (numpy) and `calibrated_tf` (the serving graph) are the
same formula, so that served probabilities equal evaluated ones.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cifarflow.figures import figure, png

BINS = 15  # equal-width confidence bins, as in Guo et al.
TINY = np.finfo(np.float32).tiny  # log of a probability that underflowed to 0 stays finite
LOG_T_BOUNDS = (-4.0, 4.0)  # T in [0.018, 55]: far beyond any temperature a sane model needs


def _binned(probs: np.ndarray, labels: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per confidence bin ((0, 1/bins], ..., ((bins-1)/bins, 1]): (count, sum of confidences, correct)."""
    confidence = probs.max(axis=1).astype(np.float64)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    which = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    return np.bincount(which, minlength=bins), np.bincount(which, confidence, bins), np.bincount(which, correct, bins)


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = BINS) -> float:
    """Expected calibration error, top-label: each example's confidence (its max probability)
    falls into one of `bins` equal-width bins; ECE is the mean over bins of |accuracy - mean
    confidence| weighted by the bin's share of the examples."""
    if len(labels) == 0:
        return 0.0
    _, confidence, correct = _binned(probs, labels, bins)
    return float(np.abs(correct - confidence).sum() / len(labels))


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class."""
    if len(labels) == 0:
        return 0.0
    return float(-np.mean(np.log(np.maximum(probs[np.arange(len(labels)), labels].astype(np.float64), TINY))))


def brier(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean over examples of the squared distance between the probabilities and the one-hot label
    (summed over classes: 0 is perfect, 2 the worst)."""
    if len(labels) == 0:
        return 0.0
    onehot = np.eye(probs.shape[1])[labels]
    return float(np.mean(np.sum((probs.astype(np.float64) - onehot) ** 2, axis=1)))


def calibrated(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T) in float32, row by row, as the serving graph computes it."""
    logits = np.log(np.maximum(probs.astype(np.float32), TINY)) / np.float32(temperature)
    logits -= logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def calibrated_tf(probs: Any, temperature: float) -> Any:
    """`calibrated`, as TensorFlow ops for the serving signature."""
    import tensorflow as tf

    return tf.nn.softmax(tf.math.log(tf.maximum(probs, TINY)) / tf.constant(temperature, probs.dtype), axis=-1)


def fit_temperature(probs: np.ndarray, labels: np.ndarray) -> float:
    """The temperature minimising NLL of `calibrated(probs, T)` on these (val) examples, searched
    over log T (bounded, deterministic), rounded to 6 places; 1.0 when there is nothing to fit on."""
    if len(labels) == 0:
        return 1.0
    from scipy.optimize import minimize_scalar

    log_p = np.log(np.maximum(probs.astype(np.float64), TINY))
    rows = np.arange(len(labels))

    def loss(log_t: float) -> float:
        z = log_p / np.exp(log_t)
        z -= z.max(axis=1, keepdims=True)
        return float(np.mean(np.log(np.exp(z).sum(axis=1)) - z[rows, labels]))

    # NLL is convex in 1/T (a log-sum-exp of affine functions minus a linear one), so unimodal in
    # log T: the bounded search finds the best temperature, never one worse than T = 1
    found = minimize_scalar(loss, bounds=LOG_T_BOUNDS, method="bounded", options={"xatol": 1e-6})
    return round(float(np.exp(found.x)), 6)


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = BINS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per bin: (mean confidence, accuracy, count); NaN where a bin is empty."""
    count, confidence, correct = _binned(probs, labels, bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return confidence / count, correct / count, count


def reliability_png(curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str) -> bytes:
    """A reliability diagram: accuracy against mean confidence per bin, one line per entry of
    `curves` (legend name -> (probs, labels)), with its ECE in the legend."""
    fig = figure((5, 5))
    ax = fig.add_axes((0.13, 0.12, 0.82, 0.8))
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="perfect calibration")
    for name, (probs, labels) in curves.items():
        confidence, accuracy, count = reliability(probs, labels)
        shown = count > 0
        ax.plot(confidence[shown], accuracy[shown], marker="o", markersize=3, label=f"{name}: ECE {ece(probs, labels):.3f}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel(f"confidence (max probability), {BINS} equal-width bins")
    ax.set_ylabel("accuracy in the bin")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    return png(fig)
