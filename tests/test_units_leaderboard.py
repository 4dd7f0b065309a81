"""Unit tests of cifarflow.leaderboard: rows from the train and evaluate stages' files, the ranking
export selects with, and the one markdown table (no model, no TensorFlow)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cifarflow import evaluate as ev
from cifarflow import leaderboard as lb
from cifarflow.contract import DETAILS, METRICS, SUMMARY
from cifarflow.errors import InputError
from cifarflow.fileio import split_headline


def row(arch: str, params: int, val_accuracy: float, val_loss: float = 1.0) -> lb.Row:
    return lb.Row(arch, "lenet", "tiny", params, 3, 2, val_accuracy, (0.1, 0.9), val_loss, 0.5, (0.2, 0.8), 2.0, 1.0, (0.1, 0.05))


def test_rank_is_best_first_with_ties_to_fewer_params_then_name() -> None:
    rows = [row("b", 10, 0.8, 0.5), row("a", 10, 0.8, 0.4), row("c", 5, 0.8, 0.6), row("d", 1, 0.7, 0.1)]
    assert [r.arch for r in lb.rank(rows, "val_accuracy")] == ["c", "a", "b", "d"]
    assert [r.arch for r in lb.rank(rows, "val_loss")] == ["d", "a", "b", "c"]
    tie = [row("z", 1, 0.5, 0.3), row("y", 1, 0.5, 0.3)]
    assert [r.arch for r in lb.rank(tie, "val_loss")] == ["y", "z"]


def write_eval(root: Path, arch: str, val: tuple[list[int], list[int]], test: tuple[list[int], list[int]]) -> dict:
    """An evaluate output folder written the way evaluate does (scores, split into headline and details)."""

    def split_scores(predicted: list[int], labels: list[int]) -> dict:
        probs = np.eye(3)[predicted] * 0.8 + 0.2 / 3
        return ev.scores(probs, np.array(labels), ["a", "b", "c"])

    metrics = {
        "val": split_scores(*val),
        "test": split_scores(*test),
        "temperature": 1.5,
        "test_calibrated": {"ece": 0.01, "loss": 0.5, "brier": 0.2},
    }
    headline, details = split_headline(metrics, ev.HEADLINE)
    (root / "eval" / arch).mkdir(parents=True, exist_ok=True)
    (root / "eval" / arch / METRICS).write_text(json.dumps(headline))
    (root / "eval" / arch / DETAILS).write_text(json.dumps(details))
    return metrics


def write_summary(models: Path, arch: str, params: int, epochs: int) -> None:
    (models / arch).mkdir(parents=True)
    summary = {"params": params, "epochs": epochs, "best_epoch": epochs, "model": "lenet", "variant": "tiny"}
    (models / arch / SUMMARY).write_text(json.dumps(summary))


def test_rows_read_the_evaluate_and_train_outputs(tmp_path: Path) -> None:
    evals, models = tmp_path / "eval", tmp_path / "models"
    with pytest.raises(InputError, match=r"eval/lenet/details.json: not found; run the evaluate@lenet stage first$"):
        lb.rows(["lenet"], evals, models)
    good = write_eval(tmp_path, "lenet", ([0, 1, 2, 0], [0, 1, 2, 1]), ([0, 0], [0, 1]))
    with pytest.raises(InputError, match=r"models/lenet/summary.json: not found; run the train@lenet stage first$"):
        lb.rows(["lenet"], evals, models)
    write_summary(models, "lenet", 123, 4)
    write_eval(tmp_path, "big", ([0, 1, 2, 0], [0, 1, 2, 0]), ([0, 0], [0, 0]))
    write_summary(models, "big", 999, 2)
    rows = lb.rank(lb.rows(["lenet", "big"], evals, models), "val_accuracy")
    assert [r.arch for r in rows] == ["big", "lenet"]
    lenet = rows[1]
    assert (lenet.params, lenet.epochs, lenet.best_epoch, lenet.val_accuracy, lenet.test_accuracy) == (123, 4, 4, 0.75, 0.5)
    assert lenet.val_loss == good["val"]["loss"] and lenet.test_loss == good["test"]["loss"]
    assert lenet.val_ci95 == (good["val"]["ci95_low"], good["val"]["ci95_high"])
    assert lenet.test_ece == (good["test"]["ece"], 0.01) and lenet.temperature == 1.5
    assert lenet.val_ci95[0] < 0.75 < lenet.val_ci95[1]
    assert lenet.seed_reported_accuracy == 0.72 and rows[0].seed_note == "no seed"
    with pytest.raises(InputError, match=r"^archs is empty: nothing to rank"):
        lb.rows([], evals, models)


def test_the_one_table_renders_every_row_with_its_intervals() -> None:
    records = [row("a", 1234, 0.8).record(), {**row("b", 5, 0.7).record(), "mca": 0.5, "mca_ci95": (0.4, 0.6)}]
    lines = lb.markdown(records)
    assert lines[0].startswith("| arch | params | epochs (best) |") and len(lines) == 4
    assert lines[2] == (
        "| a | 1,234 | 3 (2) | 80.00% (10.00%–90.00%) | 1.0000 | 50.00% (20.00%–80.00%) | 0.100 → 0.050 (T = 1.00) | – | – |"
    )
    assert "| 50.00% (40.00%–60.00%) |" in lines[3]
    assert lb.artifact_table(records)[1]["mCA (95% CI)"] == "50.00% (40.00%–60.00%)"
