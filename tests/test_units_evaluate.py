"""Unit tests of cifarflow.evaluate's statistics (no model, no TensorFlow): interval, scores, confusion,
the predictions CSV and the metrics files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from cifarflow import calibration
from cifarflow import evaluate as ev
from cifarflow.contract import DETAILS, METRICS, read_metrics
from cifarflow.errors import InputError
from cifarflow.fileio import split_headline


def interval(split: dict) -> list[float]:
    """The 95% interval of a split's scores (one list, or low and high fields)."""
    return list(split["ci95"]) if "ci95" in split else [split["ci95_low"], split["ci95_high"]]


def closed_form_wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


@pytest.mark.parametrize(("k", "n"), [(0, 1), (1, 1), (3, 10), (50, 100), (999, 1000)])
def test_wilson_is_the_95_percent_score_interval(k: int, n: int) -> None:
    low, high = ev.wilson(k, n)
    want = closed_form_wilson(k, n)
    assert low == pytest.approx(max(0.0, want[0]), abs=1e-9) and high == pytest.approx(min(1.0, want[1]), abs=1e-9)
    assert 0.0 <= low <= k / n <= high <= 1.0
    assert isinstance(low, float) and isinstance(high, float)


@pytest.mark.parametrize(
    ("correct", "n", "low", "high"),
    [(0, 10, 0.0, 0.2775), (1, 10, 0.0179, 0.4042), (10, 10, 0.7225, 1.0), (50, 100, 0.4038, 0.5962)],
)
def test_wilson_known_cases(correct: int, n: int, low: float, high: float) -> None:
    """Published values (Wilson 1927 / Newcombe 1998), independent of any formula written here."""
    assert ev.wilson(correct, n) == pytest.approx((low, high), abs=1e-4)


def test_wilson_of_nothing_is_the_whole_range() -> None:
    assert ev.wilson(0, 0) == (0.0, 1.0)


def test_scores_report_accuracy_interval_loss_and_per_class() -> None:
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.5, 0.4, 0.1], [0.0, 0.0, 1.0]])
    labels = np.array([0, 1, 1, 0])
    got = ev.scores(probs, labels, ["a", "b", "c"])
    assert got["accuracy"] == 0.5 and got["correct"] == 2 and got["n"] == 4
    low, high = ev.wilson(2, 4)
    assert interval(got) == [round(low, 6), round(high, 6)]
    want_loss = -np.mean(np.log([0.7, 0.8, 0.4, calibration.TINY]))  # a zero probability is clipped, not -inf
    assert got["loss"] == round(float(want_loss), 6)
    assert got["per_class_accuracy"] == {"a": 0.5, "b": 0.5, "c": None}
    assert got["accuracy"] == round(2 / 4, 6)


def test_scores_round_to_six_places_and_handle_empty_splits() -> None:
    probs = np.tile([[0.9, 0.1]], (3, 1))
    got = ev.scores(probs, np.array([0, 0, 1]), ["a", "b"])
    assert got["accuracy"] == 0.666667 and got["per_class_accuracy"] == {"a": 1.0, "b": 0.0}
    assert got["loss"] == round(float(-(2 * math.log(0.9) + math.log(0.1)) / 3), 6)
    empty = ev.scores(np.zeros((0, 2)), np.zeros(0, np.int64), ["a", "b"])
    assert (
        empty["loss"] == 0.0
        and empty["accuracy"] is None
        and empty["n"] == 0
        and interval(empty) == [0.0, 1.0]
        and empty["per_class_accuracy"] == {"a": None, "b": None}
    )


def test_confusion_counts_true_by_predicted() -> None:
    matrix = ev.confusion(np.array([0, 0, 1, 2, 2, 2]), np.array([0, 1, 1, 2, 2, 0]), 3)
    assert matrix.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]] and matrix.dtype == np.int64


def test_predictions_csv_round_trips(tmp_path: Path) -> None:
    probs = np.array([[0.25, 0.75], [0.9, 0.1]], np.float32)
    text = ev.predictions_csv(np.array([7, 3]), np.array([1, 1]), probs, ["cat", "dog"])
    lines = text.splitlines()
    assert lines[0] == "index,label,predicted,confidence,p_cat,p_dog"
    assert lines[1] == "7,1,1,0.75,0.25,0.75"
    assert lines[2].startswith("3,1,0,0.899999976,0.899999976,") and text.endswith("\n") and "\r" not in text
    (tmp_path / "p.csv").write_text(text)
    labels, back = ev.read_predictions(tmp_path / "p.csv")
    assert labels.tolist() == [1, 1] and labels.dtype == np.int64 and np.allclose(back, probs) and back.dtype == np.float64


def test_metrics_split_into_headline_and_details_and_merge_back(tmp_path: Path) -> None:
    scored = ev.scores(np.array([[0.9, 0.1], [0.2, 0.8]]), np.array([0, 0]), ["a", "b"])
    metrics = {"val": scored, "test": dict(scored), "tta": True, "temperature": 1.5}
    headline, details = split_headline(metrics, ev.HEADLINE)
    assert headline == {
        "val": {"accuracy": scored["accuracy"]},
        "test": {k: scored[k] for k in ("accuracy", "ci95_low", "ci95_high", "loss")},
    }  # a few numbers: `dvc metrics show` makes a column of each
    assert set(details["val"]) == set(scored) - {"accuracy"} and "per_class_accuracy" in details["val"]
    assert set(details["test"]) == set(scored) - {"accuracy", "ci95_low", "ci95_high", "loss"}
    assert (details["tta"], details["temperature"]) == (True, 1.5)
    assert split_headline({"epochs": 3, "arch": "x"}, {"epochs": ()}) == ({"epochs": 3}, {"arch": "x"})
    assert split_headline({"b": {"mca": 0.5}}, {"b": ("mca",)}) == ({"b": {"mca": 0.5}}, {})  # no empty block left
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / METRICS).write_text(json.dumps(headline))
    with pytest.raises(InputError, match=r"a/details.json: not found; run the evaluate@a stage first$"):
        read_metrics(tmp_path, "a")
    (tmp_path / "a" / DETAILS).write_text(json.dumps(details))
    assert read_metrics(tmp_path, "a") == json.loads(json.dumps(metrics))
    assert read_metrics(str(tmp_path), "a") == read_metrics(tmp_path, "a")


def test_predictions_csv_refuses_mismatched_columns() -> None:
    with pytest.raises(ValueError):
        ev.predictions_csv(np.array([1, 2]), np.array([0]), np.array([[0.5, 0.5], [0.5, 0.5]]), ["a", "b"])


def test_confidence_scores_are_nll_ece_brier_rounded_to_six_places() -> None:
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 2, (200, 10))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = rng.integers(0, 10, 200)
    got = ev.confidence_scores(probs, labels)
    exact = {
        "loss": calibration.nll(probs, labels),
        "ece": calibration.ece(probs, labels),
        "brier": calibration.brier(probs, labels),
    }
    assert got == {k: round(v, 6) for k, v in exact.items()}
    assert all(round(v, 6) != round(v, 7) for v in exact.values())  # the case tells 6 places from 7
