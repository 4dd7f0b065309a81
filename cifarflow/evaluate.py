"""`cifarflow evaluate <arch>`: score the best checkpoint on val and test.

Confidences are calibrated by one temperature fitted on val NLL (cifarflow.calibration); the
export serves the calibrated probabilities. Writes, in `out/`: `metrics.json`, the DVC metrics,
a few numbers (HEADLINE) so that `dvc metrics show`, which puts every stage's metrics in one table,
stays readable: val accuracy, test accuracy with its 95% Wilson interval and loss, and the mCA.
`details.json` holds everything else, with the same keys: `temperature`; per split (`val`,
`test`) the example count, the raw probabilities' NLL (`loss`), ECE and Brier score, per-class
accuracy and correct counts; the calibrated probabilities' NLL, ECE and Brier as
`<split>_calibrated`; flip-TTA figures as `<split>_tta` when `evaluate.tta` is set; with the
corrupt stage's output (`--corrupt`), the rest of the corruption benchmark `robustness` (mCA's
bootstrap interval, relative mCA, clean accuracy on its images, the accuracy per corruption and
severity: cifarflow.robustness). `contract.read_metrics` gives both merged. `predictions_{val,test}.csv`
(calibrated per-class probabilities: the serving reference); `reliability.png` (raw and
calibrated, val and test); `corruption_heatmap.png` with the benchmark; `confusion_test.csv` (one row
per example, for `dvc plots`), `confusion_test.png` and `predictions_grid.png` (16 test images
with predicted label, calibrated score and true label).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np

from cifarflow import calibration, robustness
from cifarflow.contract import (
    CONFUSION_CSV,
    CONFUSION_PNG,
    DETAILS,
    GRID_PNG,
    HEATMAP,
    METRICS,
    MODEL,
    RELIABILITY,
    ROBUSTNESS,
    predictions,
)
from cifarflow.data.verdict import check_shards
from cifarflow.errors import InputError
from cifarflow.figures import figure, png
from cifarflow.fileio import split_headline, write_bytes_atomic, write_json_atomic
from cifarflow.openfile import open_regular
from cifarflow.settings import Params, Recipe

SPLITS = ("val", "test")
GRID = 16
# The fields of metrics.json per block, numbers only (`dvc metrics show` makes a column of each, for
# every architecture's file in one table); everything else goes to details.json.
HEADLINE = {
    "val": ("accuracy",),
    "test": ("accuracy", "ci95_low", "ci95_high", "loss"),
    ROBUSTNESS: ("mca",),
}


def wilson(correct: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion: sane at 0%, 100% and small n; (0, 1) when
    there is nothing to score (scipy raises for n = 0)."""
    if n == 0:
        return 0.0, 1.0
    from scipy.stats import binomtest

    ci = binomtest(correct, n).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def confidence_scores(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """How good the probabilities are, beyond their argmax: NLL (`loss`), ECE, Brier score."""
    return {
        "loss": round(calibration.nll(probs, labels), 6),
        "ece": round(calibration.ece(probs, labels), 6),
        "brier": round(calibration.brier(probs, labels), 6),
    }


def scores(probs: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Accuracy with its interval, the confidence scores, per-class accuracy and counts."""
    predicted = probs.argmax(axis=1)
    correct = predicted == labels
    low, high = wilson(int(correct.sum()), len(labels))
    per_class = {
        name: round(float(correct[labels == c].mean()), 6) if (labels == c).any() else None for c, name in enumerate(classes)
    }
    return {
        # None, not NaN, when there is nothing to score: NaN is not JSON and compares false with everything.
        "accuracy": round(float(correct.mean()), 6) if len(labels) else None,
        "ci95_low": round(low, 6),
        "ci95_high": round(high, 6),
        "correct": int(correct.sum()),
        "n": len(labels),
        **confidence_scores(probs, labels),
        "per_class_accuracy": per_class,
    }


def confusion(labels: np.ndarray, predicted: np.ndarray, n_classes: int) -> np.ndarray:
    """(true, predicted) counts."""
    matrix = np.zeros((n_classes, n_classes), np.int64)
    np.add.at(matrix, (labels, predicted), 1)
    return matrix


def predictions_csv(index: np.ndarray, labels: np.ndarray, probs: np.ndarray, classes: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["index", "label", "predicted", "confidence", *(f"p_{c}" for c in classes)])
    for i, label, row in zip(index.tolist(), labels.tolist(), probs, strict=True):
        writer.writerow([i, label, int(row.argmax()), f"{row.max():.9g}", *(f"{p:.9g}" for p in row)])
    return buffer.getvalue()


def read_predictions(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(labels, probabilities) from a predictions CSV."""
    with open_regular(path) as f:
        rows = list(csv.reader(io.TextIOWrapper(f, encoding="utf-8", newline="")))
    body = np.array(rows[1:], dtype=object)
    return body[:, 1].astype(np.int64), body[:, 4:].astype(np.float64)


def confusion_png(matrix: np.ndarray, classes: list[str], title: str) -> bytes:
    fig = figure((7, 6))
    ax = fig.add_axes((0.17, 0.17, 0.7, 0.75))
    image = ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, str(count), ha="center", va="center", fontsize=7, color="white" if count > matrix.max() / 2 else "black")
    fig.colorbar(image, cax=fig.add_axes((0.89, 0.17, 0.03, 0.75)))
    return png(fig)


def grid_png(images: np.ndarray, labels: np.ndarray, probs: np.ndarray, classes: list[str]) -> bytes:
    cols, rows = 8, 2
    fig = figure((2 * cols - 1, 3 * rows - 1))
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.02, top=0.87, wspace=0.1, hspace=0.6)  # room for 3-line titles
    for k in range(min(len(images), cols * rows)):
        ax = fig.add_subplot(rows, cols, k + 1)
        ax.axis("off")
        ax.imshow(images[k])
        ax.set_title(f"pred: {classes[probs[k].argmax()]}\nscore: {probs[k].max():.3}\ntrue: {classes[labels[k]]}", fontsize=8)
    return png(fig)


def predict(model: Any, pipeline: Any, tta: bool = False) -> np.ndarray:
    """Class probabilities (N, classes) float32 in example order; with `tta`, the mean over the
    image and its horizontal flip."""
    import tensorflow as tf

    parts = []
    for x, _ in pipeline.evaluation():
        probs = model(x, training=False)
        if tta:
            probs = (probs + model(tf.reverse(x, axis=[2]), training=False)) / 2
        parts.append(np.asarray(probs, np.float32))
    return np.concatenate(parts) if parts else np.empty((0, 0), np.float32)


def check_finite_outputs(probs: np.ndarray, model: Path, where: str) -> np.ndarray:
    """`probs` if every one is a finite number; an InputError naming the model otherwise (a NaN would
    become a NaN metric, a temperature fitted on NaN and a model card that says nothing)."""
    bad = ~np.isfinite(probs).all(axis=1)
    if bad.any():
        raise InputError(
            f"{model}: gives non-finite outputs (NaN or infinite) for {int(bad.sum())} of {len(probs)} {where} "
            "images; the model is broken: retrain it"
        )
    return probs


def load_benchmark(params: Params, corrupt_dir: Path, classes: list[str]) -> dict[str, Any]:
    """The corrupt stage's splits, checked (cifarflow.data.corrupt.load) and of these classes."""
    from cifarflow.data import corrupt

    corrupt_classes, splits = corrupt.load(corrupt_dir, params)
    if corrupt_classes != classes:
        raise InputError(f"{corrupt_dir}: made from shards with other classes ({corrupt_classes}); rerun the corrupt stage")
    return splits


def corruption_scores(params: Params, model: Any, recipe: Recipe, splits: dict[str, Any], classes: list[str]) -> dict[str, Any]:
    """The model on the corrupt stage's cells and on the same images clean: cifarflow.robustness.score."""
    from cifarflow.data import corrupt
    from cifarflow.data.inputs import InputPipeline

    def correct(split: str) -> np.ndarray:
        data = splits[split]
        pipeline = InputPipeline(data, recipe, len(classes), params.seed, params.evaluate.batch_size)
        return predict(model, pipeline).argmax(axis=1) == data.labels

    return robustness.score({c: correct(corrupt.cell(*c)) for c in corrupt.cells(params)}, correct(corrupt.CLEAN), params.seed)


def run(
    params: Params, arch: str, shards_dir: Path, model_dir: Path, out: Path, verdict: Path, corrupt_dir: Path | None = None
) -> dict[str, Any]:
    """Score `arch` on val and test of shards that the validate stage passed (`verdict`) and that are
    unchanged since, and on the corrupt stage's output (`corrupt_dir`) when given."""

    from cifarflow.data.inputs import InputPipeline, load_checked
    from cifarflow.models.registry import load_model

    recipe = params.recipe(arch)
    checked = check_shards(shards_dir, verdict, params.data.format, SPLITS)
    model_path = Path(model_dir) / MODEL
    if not model_path.is_file():
        raise InputError(f"{model_path}: not found; run the train@{arch} stage first")
    classes = checked.classes
    # checked before anything is written: a bad --corrupt leaves no half-written evaluation
    benchmark = None if corrupt_dir is None else load_benchmark(params, Path(corrupt_dir), classes)
    model = load_model(model_path)
    out = Path(out)
    metrics: dict[str, Any] = {"arch": arch}
    curves = {}
    for split in SPLITS:  # val first: it fits the temperature that test is calibrated with
        data = load_checked(checked, split)
        pipeline = InputPipeline(data, recipe, len(classes), params.seed, params.evaluate.batch_size)
        raw = check_finite_outputs(predict(model, pipeline), model_path, split)
        labels = data.labels.astype(np.int64)
        if split == "val":
            metrics["temperature"] = calibration.fit_temperature(raw, labels)
        probs = calibration.calibrated(raw, metrics["temperature"])  # what the export serves
        metrics[split] = scores(raw, labels, classes)
        metrics[f"{split}_calibrated"] = confidence_scores(probs, labels)
        curves |= {f"{split}, raw": (raw, labels), f"{split}, T = {metrics['temperature']:.3f}": (probs, labels)}
        if params.evaluate.tta:
            metrics[f"{split}_tta"] = scores(predict(model, pipeline, tta=True), labels, classes)
        write_bytes_atomic(out / predictions(split), predictions_csv(data.index, labels, probs, classes).encode())
        if split == "test":
            predicted = probs.argmax(axis=1)
            rows = "actual,predicted\n" + "".join(f"{classes[a]},{classes[p]}\n" for a, p in zip(labels, predicted, strict=True))
            write_bytes_atomic(out / CONFUSION_CSV, rows.encode())
            matrix = confusion(labels, predicted, len(classes))
            write_bytes_atomic(out / CONFUSION_PNG, confusion_png(matrix, classes, f"{arch}: test confusion"))
            pick = np.sort(np.random.default_rng(params.seed).choice(len(labels), min(GRID, len(labels)), replace=False))
            write_bytes_atomic(out / GRID_PNG, grid_png(data.images[pick], labels[pick], probs[pick], classes))
    write_bytes_atomic(out / RELIABILITY, calibration.reliability_png(curves, f"{arch}: reliability"))
    if benchmark is not None:
        metrics[ROBUSTNESS] = corruption_scores(params, model, recipe, benchmark, classes)
        title = f"{arch}: accuracy under corruption (mCA {metrics[ROBUSTNESS]['mca']:.1%})"
        write_bytes_atomic(out / HEATMAP, robustness.heatmap_png(metrics[ROBUSTNESS]["grid"], title))
    headline, details = split_headline(metrics, HEADLINE)
    write_json_atomic(out / DETAILS, details)
    write_json_atomic(out / METRICS, headline)
    return metrics
