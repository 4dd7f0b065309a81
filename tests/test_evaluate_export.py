"""Evaluate, select, bless, export (with the serving check in a fresh process), promote,
predict and report: unit cases as tables, then the real stages on the smoke workspace."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import cli_env, run_in, set_params
from PIL import Image

from cifarflow import registry
from cifarflow.evaluate import confusion, scores, wilson
from cifarflow.export import Entry, bless, mcnemar, rank

CLASSES = ["c0", "c1", "c2"]


@pytest.mark.parametrize(
    ("correct", "n", "low", "high"),
    [(0, 10, 0.0, 0.2775), (1, 10, 0.0179, 0.4042), (10, 10, 0.7225, 1.0), (50, 100, 0.4038, 0.5962)],
)
def test_wilson_interval_known_cases(correct: int, n: int, low: float, high: float) -> None:
    assert wilson(correct, n) == pytest.approx((low, high), abs=1e-4)


def test_scores_and_confusion_agree() -> None:
    labels = np.array([0, 0, 1, 1, 1, 2])
    probs = np.eye(3)[[0, 1, 1, 1, 2, 2]] * 0.9 + 0.1 / 3
    result = scores(probs, labels, CLASSES)
    matrix = confusion(labels, probs.argmax(1), 3)
    assert matrix.sum() == len(labels) and np.trace(matrix) == result["correct"] == 4
    for c, name in enumerate(CLASSES):
        assert result["per_class_accuracy"][name] == pytest.approx(matrix[c, c] / matrix[c].sum(), abs=1e-6)
    assert result["accuracy"] == pytest.approx(4 / 6, abs=1e-6) and result["n"] == 6


def entry(arch: str, val: float, params: int, loss: float = 1.0) -> Entry:
    return Entry(arch, params, 1, val, [0, 1], loss, val, [0, 1], loss)


@pytest.mark.parametrize(
    ("entries", "metric", "winner"),
    [
        ([entry("a", 0.7, 100), entry("b", 0.8, 100)], "val_accuracy", "b"),
        ([entry("a", 0.8, 200), entry("b", 0.8, 100)], "val_accuracy", "b"),  # tie: fewer parameters
        ([entry("a", 0.8, 100), entry("b", 0.8, 100)], "val_accuracy", "a"),  # full tie: by name
        ([entry("a", 0.9, 1, loss=0.5), entry("b", 0.7, 1, loss=0.4)], "val_loss", "b"),  # lower loss wins
    ],
)
def test_selection(entries: list[Entry], metric: str, winner: str) -> None:
    assert rank(entries, metric)[0].arch == winner


def test_mcnemar_counts_discordant_pairs_only() -> None:
    first = np.array([True] * 10 + [False] * 2 + [True] * 50 + [False] * 5)
    second = np.array([False] * 10 + [True] * 2 + [True] * 50 + [False] * 5)
    result = mcnemar(first, second)
    assert (result["only_winner_right"], result["only_runner_up_right"]) == (10, 2)
    assert result["p_value"] == pytest.approx(0.03857, abs=1e-4)  # exact binomial, two-sided
    assert mcnemar(first, first)["p_value"] == 1.0


@pytest.mark.parametrize(
    ("accuracy", "champion", "blessed", "fragment"),
    [
        (0.60, None, True, "no champion"),
        (0.40, None, False, "< export.min_accuracy"),
        (0.60, 0.605, True, "within export.tolerance"),
        (0.60, 0.70, False, "more than export.tolerance"),
        (0.80, 0.70, True, "within"),
    ],
)
def test_blessing(accuracy: float, champion: float | None, blessed: bool, fragment: str) -> None:
    verdict, reasons = bless(accuracy, champion, min_accuracy=0.5, tolerance=0.01)
    assert verdict is blessed and any(fragment in r for r in reasons)


# --- the real stages, on the session's smoke workspace ------------------------------------------


@pytest.mark.slow
def test_evaluate_outputs(smoke_workspace: Path) -> None:
    metrics = json.loads((smoke_workspace / "data/eval/simple_cnn/metrics.json").read_text())
    counts = json.loads((smoke_workspace / "data/shards/manifest.json").read_text())["counts"]
    assert metrics["test"]["n"] == counts["test"] and metrics["val"]["n"] == counts["val"]
    low, high = metrics["test"]["ci95"]
    assert low <= metrics["test"]["accuracy"] <= high
    rows = (smoke_workspace / "data/eval/simple_cnn/confusion_test.csv").read_text().splitlines()
    assert rows[0] == "actual,predicted" and len(rows) - 1 == counts["test"]
    header = (smoke_workspace / "data/eval/simple_cnn/predictions_test.csv").read_text().splitlines()[0]
    assert header.startswith("index,label,predicted,confidence,p_airplane")
    for png in ("confusion_test.png", "predictions_grid.png"):
        assert (smoke_workspace / "data/eval/simple_cnn" / png).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_export_card_and_serving_check(smoke_workspace: Path) -> None:
    card = json.loads((smoke_workspace / "data/export/model_card.json").read_text())
    assert card["arch"] in card["why"] or card["leaderboard"][0]["arch"] == card["arch"]
    assert card["serving_check"]["argmax_disagreements"] == 0
    assert card["serving_check"]["max_probability_difference"] <= 1e-5
    assert card["comparison"]["runner_up"] == card["leaderboard"][1]["arch"]
    assert {"data_manifest_sha256", "params_sha256", "git_commit", "versions", "blessing_reasons"} <= set(card)
    assert "seconds" not in json.dumps(card) and "hardware" not in card
    assert (smoke_workspace / "data/export/labels.txt").read_text().split()[0] == "airplane"
    assert "# Model card" in (smoke_workspace / "data/export/MODEL_CARD.md").read_text()
    assert json.loads((smoke_workspace / "data/runinfo/export.json").read_text())["arch"] == card["arch"]


@pytest.mark.slow
def test_saved_model_takes_raw_uint8_without_project_code(smoke_workspace: Path) -> None:
    code = (
        "import sys, numpy as np, tensorflow as tf\n"
        "serve = tf.saved_model.load(sys.argv[1]).signatures['serving_default']\n"
        "out = list(serve(images=tf.zeros([3, 32, 32, 3], tf.uint8)).values())[0].numpy()\n"
        "assert out.shape == (3, 10) and np.allclose(out.sum(1), 1, atol=1e-5)\n"
        "assert not [m for m in sys.modules if m.startswith('cifarflow')]\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(smoke_workspace / "data/export/saved_model")], capture_output=True, text=True, cwd="/"
    )
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.slow
def test_tta_and_forced_unblessed_export(workspace: Path) -> None:
    set_params(workspace, archs=["simple_cnn", "lenet"], **{"evaluate.tta": True, "profiles.smoke.export.min_accuracy": 0.99})
    done = run_in(workspace, "dvc", "repro", "report")
    assert "Running stage 'evaluate@simple_cnn'" in done.stdout and "train@" not in done.stdout.replace("'train@", "")
    metrics = json.loads((workspace / "data/eval/simple_cnn/metrics.json").read_text())
    assert {"val_tta", "test_tta"} <= set(metrics)
    card = json.loads((workspace / "data/export/model_card.json").read_text())
    assert card["blessed"] is False and "< export.min_accuracy 0.99" in card["blessing_reasons"][0]
    assert card["serving_check"]["argmax_disagreements"] == 0  # the plain predictions stay the reference
    refused = run_in(workspace, "cifarflow", "promote", check=False)
    assert refused.returncode == 2 and "not blessed" in refused.stderr
    assert registry.current(workspace / "champion") is None


@pytest.mark.slow
def test_predict_good_oversized_and_corrupt_files(smoke_workspace: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)).save(tmp_path / "big.jpg")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    cmd = [
        sys.executable,
        "-m",
        "cifarflow",
        "--params",
        str(smoke_workspace / "params.yaml"),
        "predict",
        str(tmp_path),
        "--model",
        str(smoke_workspace / "data/export"),
        "--format",
        "json",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env=cli_env())
    assert done.returncode == 1
    results = json.loads(done.stdout)
    assert [Path(r["path"]).name for r in results] == ["a.png", "big.jpg"]
    assert all(len(r["top3"]) == 3 and 0 <= r["confidence"] <= 1 for r in results)
    assert "broken.png: not a readable image" in done.stderr and "resized to 32x32" in done.stderr
    table = subprocess.run(cmd[:-2], capture_output=True, text=True, env=cli_env())
    assert table.stdout.splitlines()[0].split()[:3] == ["path", "label", "conf"]


@pytest.mark.slow
def test_predict_real_jpegs(smoke_workspace: Path) -> None:
    import os

    real = os.environ.get("CIFARFLOW_REAL_DATA")
    sample = Path(real or "/nonexistent") / "cifar10-jpeg-sample"
    if not sample.is_dir():
        pytest.skip("real data not available: set CIFARFLOW_REAL_DATA to ../shared/data to run")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "cifarflow",
            "predict",
            str(sample),
            "--model",
            str(smoke_workspace / "data/export"),
            "--format",
            "csv",
        ],
        capture_output=True,
        text=True,
        env=cli_env(),
        cwd=smoke_workspace,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(done.stdout.splitlines()) == 1 + 500


@pytest.mark.slow
def test_report_metrics_and_plots(smoke_workspace: Path, tmp_path: Path) -> None:
    report = json.loads((smoke_workspace / "data/reports/leaderboard.json").read_text())
    assert [r["arch"] for r in report["rows"]] == ["simple_cnn", "lenet", "lenet_mixup", "resnet56", "densenet121"]
    lenet = next(r for r in report["rows"] if r["arch"] == "lenet")
    assert lenet["seed_reported_accuracy"] == 0.72 and lenet["params"] == 7994
    markdown = (smoke_workspace / "data/reports/leaderboard.md").read_text()
    assert "| lenet | 7,994 |" in markdown and "run info" in markdown and "dvc_plots/index.html" in markdown
    shown = json.loads(run_in(smoke_workspace, "dvc", "metrics", "show", "--json").stdout)
    assert "data/eval/simple_cnn/metrics.json" in json.dumps(shown)
    plots = run_in(smoke_workspace, "dvc", "plots", "show", "-o", str(tmp_path / "plots"))
    html = (tmp_path / "plots" / "index.html").read_text()
    assert "accuracy" in html and "loss" in html, plots.stdout
