"""Unit tests of cifarflow.export's selection, McNemar test and blessing (no model, no TensorFlow)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cifarflow import export as ex
from cifarflow.errors import InputError


def entry(arch: str, params: int, val_accuracy: float, val_loss: float = 1.0) -> ex.Entry:
    return ex.Entry(arch, params, 3, val_accuracy, [0.1, 0.9], val_loss, 0.5, [0.2, 0.8], 2.0)


def test_rank_is_best_first_with_ties_to_fewer_params_then_name() -> None:
    rows = [entry("b", 10, 0.8, 0.5), entry("a", 10, 0.8, 0.4), entry("c", 5, 0.8, 0.6), entry("d", 1, 0.7, 0.1)]
    assert [r.arch for r in ex.rank(rows, "val_accuracy")] == ["c", "a", "b", "d"]
    assert [r.arch for r in ex.rank(rows, "val_loss")] == ["d", "a", "b", "c"]
    tie = [entry("z", 1, 0.5, 0.3), entry("y", 1, 0.5, 0.3)]
    assert [r.arch for r in ex.rank(tie, "val_loss")] == ["y", "z"]


def write_eval(root: Path, arch: str, val: tuple[list[int], list[int]], test: tuple[list[int], list[int]]) -> dict:
    """An evaluate output folder written the way evaluate does (scores, split into headline and details)."""
    from cifarflow import evaluate as ev

    def split_scores(predicted: list[int], labels: list[int]) -> dict:
        probs = np.eye(3)[predicted] * 0.8 + 0.2 / 3
        return ev.scores(probs, np.array(labels), ["a", "b", "c"])

    metrics = {"val": split_scores(*val), "test": split_scores(*test)}
    headline, details = ev.split_metrics(metrics)
    (root / "eval" / arch).mkdir(parents=True, exist_ok=True)
    (root / "eval" / arch / ev.METRICS).write_text(json.dumps(headline))
    (root / "eval" / arch / ev.DETAILS).write_text(json.dumps(details))
    return metrics


def interval(split: dict) -> list[float]:
    return list(split["ci95"]) if "ci95" in split else [split["ci95_low"], split["ci95_high"]]


def test_selection_reads_evaluate_and_train_outputs_and_ranks_them(tmp_path: Path) -> None:
    evals, models = tmp_path / "eval", tmp_path / "models"
    with pytest.raises(InputError, match=r"eval/lenet/metrics.json: not found; run the evaluate@lenet stage first$"):
        ex.select(["lenet"], "val_accuracy", evals, models)
    good = write_eval(tmp_path, "lenet", ([0, 1, 2, 0], [0, 1, 2, 1]), ([0, 0], [0, 1]))
    with pytest.raises(InputError, match=r"models/lenet/summary.json: not found; run the train@lenet stage first$"):
        ex.select(["lenet"], "val_accuracy", evals, models)
    (models / "lenet").mkdir(parents=True)
    (models / "lenet" / "summary.json").write_text(json.dumps({"params": 123, "epochs": 4}))
    write_eval(tmp_path, "big", ([0, 1, 2, 0], [0, 1, 2, 0]), ([0, 0], [0, 0]))
    (models / "big").mkdir(parents=True)
    (models / "big" / "summary.json").write_text(json.dumps({"params": 999, "epochs": 2}))
    rows = ex.select(["lenet", "big"], "val_accuracy", evals, models)
    assert [r.arch for r in rows] == ["big", "lenet"]
    lenet = rows[1]
    assert (lenet.params, lenet.epochs, lenet.val_accuracy, lenet.test_accuracy) == (123, 4, 0.75, 0.5)
    assert lenet.val_loss == good["val"]["loss"] and lenet.test_loss == good["test"]["loss"]
    assert lenet.val_ci95 == interval(good["val"]) and lenet.test_ci95 == interval(good["test"])
    assert lenet.val_ci95[0] < 0.75 < lenet.val_ci95[1]
    assert [r.arch for r in ex.select(["lenet", "big"], "val_loss", evals, models)] == ["big", "lenet"]
    with pytest.raises(InputError, match=r"^archs is empty: nothing to export"):
        ex.select([], "val_accuracy", evals, models)


def test_mcnemar_uses_only_discordant_pairs() -> None:
    first = np.array([True] * 8 + [False] * 2 + [True] * 50 + [False] * 40)
    second = np.array([False] * 8 + [True] * 2 + [True] * 50 + [False] * 40)
    got = ex.mcnemar(first, second)
    assert got["only_winner_right"] == 8 and got["only_runner_up_right"] == 2
    assert got["p_value"] == pytest.approx(0.109375)  # 2·P(X <= 2), X ~ Binomial(10, 1/2)
    assert ex.mcnemar(second, first)["p_value"] == got["p_value"]
    same = ex.mcnemar(first, first)
    assert same == {"only_winner_right": 0, "only_runner_up_right": 0, "p_value": 1.0}
    tiny = ex.mcnemar(np.array([True] * 30), np.array([False] * 30))
    assert tiny["p_value"] == float(f"{2 * 0.5**30:.6g}") and tiny["p_value"] > 0


@pytest.mark.parametrize(
    ("accuracy", "champion", "blessed"),
    [(0.5, None, True), (0.4999, None, False), (0.6, 0.61, True), (0.6, 0.62, False), (0.62, 0.61, True), (0.6, 0.6, True)],
)
def test_bless_needs_the_threshold_and_the_champion_within_tolerance(
    accuracy: float, champion: float | None, blessed: bool
) -> None:
    ok, reasons = ex.bless(accuracy, champion, 0.5, 0.01 + 1e-12)
    assert ok is blessed
    assert len(reasons) == 2


def test_bless_reasons_say_which_check_passed() -> None:
    ok, reasons = ex.bless(0.6, None, 0.5, 0.01)
    assert ok and reasons == ["test accuracy 0.6000 >= export.min_accuracy 0.5", "no champion to compare with"]
    ok, reasons = ex.bless(0.4, 0.9, 0.5, 0.01)
    assert not ok and reasons == [
        "test accuracy 0.4000 < export.min_accuracy 0.5",
        "test accuracy 0.4000 is more than export.tolerance 0.01 of the champion's 0.9000 (re-scored on this test split)",
    ]
    ok, reasons = ex.bless(0.7, 0.705, 0.5, 0.01)
    assert (
        ok
        and reasons[1]
        == "test accuracy 0.7000 is within export.tolerance 0.01 of the champion's 0.7050 (re-scored on this test split)"
    )
    ok, _ = ex.bless(0.8, 0.7, 0.9, 0.0)
    assert not ok


def test_bless_at_exactly_the_tolerance_below_the_champion() -> None:
    ok, reasons = ex.bless(0.5, 0.75, 0.5, 0.25)  # 0.75 - 0.25 == 0.5 exactly
    assert ok and "is within export.tolerance 0.25" in reasons[1]
