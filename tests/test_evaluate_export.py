"""Evaluate, select, bless, export (with the serving check in a fresh process), promote,
predict and report: unit cases as tables, then the real stages on the smoke workspace."""

from __future__ import annotations

import hashlib
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import cli_env, run_in, set_params
from PIL import Image

from cifarflow import calibration, registry
from cifarflow.evaluate import (
    DETAILS,
    HEADLINE,
    METRICS,
    confusion,
    read_metrics,
    read_predictions,
    scores,
    split_metrics,
    wilson,
)
from cifarflow.export import Entry, Robustness, bless, mcnemar, rank, select

CLASSES = ["c0", "c1", "c2"]


@pytest.mark.parametrize(
    ("correct", "n", "low", "high"),
    [(0, 10, 0.0, 0.2775), (1, 10, 0.0179, 0.4042), (10, 10, 0.7225, 1.0), (50, 100, 0.4038, 0.5962)],
)
def test_wilson_interval_known_cases(correct: int, n: int, low: float, high: float) -> None:
    assert wilson(correct, n) == pytest.approx((low, high), abs=1e-4)


def closed_form_wilson(correct: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The project's former hand-written Wilson interval, the reference scipy's must match."""
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@pytest.mark.parametrize("n", [1, 2, 7, 50, 200, 5000, 10_000])
def test_wilson_is_scipys_and_matches_the_closed_form(n: int) -> None:
    for correct in sorted({0, 1, n // 3, n // 2, n - 1, n}):
        assert wilson(correct, n) == pytest.approx(closed_form_wilson(correct, n), abs=1e-12, rel=0)


def test_wilson_with_nothing_to_score() -> None:
    assert wilson(0, 0) == (0.0, 1.0)  # scipy's binomtest raises for n = 0


def test_scores_and_confusion_agree() -> None:
    labels = np.array([0, 0, 1, 1, 1, 2])
    probs = np.eye(3)[[0, 1, 1, 1, 2, 2]] * 0.9 + 0.1 / 3
    result = scores(probs, labels, CLASSES)
    matrix = confusion(labels, probs.argmax(1), 3)
    assert matrix.sum() == len(labels) and np.trace(matrix) == result["correct"] == 4
    for c, name in enumerate(CLASSES):
        assert result["per_class_accuracy"][name] == pytest.approx(matrix[c, c] / matrix[c].sum(), abs=1e-6)
    assert result["accuracy"] == pytest.approx(4 / 6, abs=1e-6) and result["n"] == 6
    headline, details = split_metrics({"arch": "a", "val": result})
    assert set(headline["val"]) == set(HEADLINE) and "per_class_accuracy" in details["val"]
    assert headline["arch"] == details["arch"] == "a"


def write_eval(evals: Path, models: Path, arch: str, val: float, test: float, params: int = 1000) -> None:
    """The files export selects from, as the evaluate and train stages write them."""
    metrics = {
        "arch": arch,
        **{
            split: {**scores_of(acc), "per_class_accuracy": {"c0": acc}, "correct": round(acc * 100)}
            for split, acc in (("val", val), ("test", test))
        },
    }
    headline, details = split_metrics(metrics)
    (evals / arch).mkdir(parents=True)
    (evals / arch / METRICS).write_text(json.dumps(headline))
    (evals / arch / DETAILS).write_text(json.dumps(details))
    (models / arch).mkdir(parents=True)
    (models / arch / "summary.json").write_text(json.dumps({"arch": arch, "params": params, "epochs": 3}))


def scores_of(accuracy: float) -> dict[str, float | int]:
    return {"accuracy": accuracy, "ci95_low": accuracy - 0.05, "ci95_high": accuracy + 0.05, "loss": 1 - accuracy, "n": 100}


def test_export_selects_the_best_on_val_from_the_evaluation_files(tmp_path: Path) -> None:
    """The winner on val is neither listed first nor the best on test: export must still pick it."""
    evals, models = tmp_path / "eval", tmp_path / "models"
    write_eval(evals, models, "lenet", val=0.60, test=0.62)  # listed first
    write_eval(evals, models, "resnet56", val=0.71, test=0.64)  # best on val
    write_eval(evals, models, "simple_cnn", val=0.65, test=0.80)  # best on test: never used to choose
    archs = ["lenet", "resnet56", "simple_cnn"]
    ranked = select(archs, "val_accuracy", evals, models)
    assert [r.arch for r in ranked] == ["resnet56", "simple_cnn", "lenet"]
    assert ranked[0].val_ci95 == pytest.approx([0.66, 0.76]) and ranked[0].test_accuracy == 0.64
    assert select(archs, "val_loss", evals, models)[0].arch == "resnet56"  # lower loss: 0.29
    assert read_metrics(evals / "resnet56")["val"]["per_class_accuracy"] == {"c0": 0.71}  # details merged back
    (evals / "lenet" / METRICS).unlink()
    with pytest.raises(Exception, match="run the evaluate@lenet stage first"):
        select(archs, "val_accuracy", evals, models)


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


@pytest.mark.parametrize(
    ("robust", "blessed", "fragment"),
    [
        (Robustness(0.50, min_mca=0.60), False, "mean corruption accuracy 0.5000 < export.min_corruption_accuracy 0.6"),
        (Robustness(0.50, min_mca=0.50), True, "0.5000 >= export.min_corruption_accuracy 0.5"),
        (
            Robustness(0.50, champion_mca=0.52, vs_champion=True),
            False,
            "more than export.tolerance 0.01 of the champion's 0.5200",
        ),
        (Robustness(0.50, champion_mca=0.51, vs_champion=True), True, "within export.tolerance 0.01 of the champion's 0.5100"),
        (Robustness(0.50, vs_champion=True), True, "no champion to compare robustness with"),
    ],
)
def test_robustness_gates(robust: Robustness, blessed: bool, fragment: str) -> None:
    ok, reasons = bless(0.6, None, 0.5, 0.01, robust)
    assert ok is blessed and any(fragment in r for r in reasons), reasons
    assert reasons[:2] == bless(0.6, None, 0.5, 0.01)[1] and len(reasons) == 3  # one reason of its own


def test_each_robustness_gate_blocks_on_its_own() -> None:
    both = Robustness(0.50, min_mca=0.60, champion_mca=0.40, vs_champion=True)  # fails the first, passes the second
    assert bless(0.6, None, 0.5, 0.01, both)[0] is False
    both = Robustness(0.50, min_mca=0.40, champion_mca=0.60, vs_champion=True)  # passes the first, fails the second
    assert bless(0.6, None, 0.5, 0.01, both)[0] is False
    assert bless(0.6, None, 0.5, 0.01, Robustness(0.5, vs_champion=True))[1][-1] == "no champion to compare robustness with"


def test_unset_robustness_gates_change_nothing() -> None:
    plain = bless(0.6, 0.6, 0.5, 0.01)
    assert bless(0.6, 0.6, 0.5, 0.01, Robustness(0.1)) == plain  # measured, no gate set
    assert bless(0.6, 0.6, 0.5, 0.01, Robustness(None, min_mca=0.9, vs_champion=True)) == plain  # nothing measured


@pytest.mark.slow
def test_evaluate_outputs(smoke_workspace: Path) -> None:
    metrics = json.loads((smoke_workspace / "data/eval/simple_cnn/metrics.json").read_text())
    counts = json.loads((smoke_workspace / "data/shards/manifest.json").read_text())["counts"]
    assert metrics["test"]["n"] == counts["test"] and metrics["val"]["n"] == counts["val"]
    low, high = metrics["test"]["ci95_low"], metrics["test"]["ci95_high"]
    assert low <= metrics["test"]["accuracy"] <= high
    assert set(metrics["test"]) == set(HEADLINE)  # the long tail is in details.json, not in the DVC metrics
    details = json.loads((smoke_workspace / "data/eval/simple_cnn" / DETAILS).read_text())
    assert len(details["test"]["per_class_accuracy"]) == 10 and details["test"]["correct"] <= counts["test"]
    rows = (smoke_workspace / "data/eval/simple_cnn/confusion_test.csv").read_text().splitlines()
    assert rows[0] == "actual,predicted" and len(rows) - 1 == counts["test"]
    header = (smoke_workspace / "data/eval/simple_cnn/predictions_test.csv").read_text().splitlines()[0]
    assert header.startswith("index,label,predicted,confidence,p_airplane")
    for png in ("confusion_test.png", "predictions_grid.png", "reliability.png"):
        assert (smoke_workspace / "data/eval/simple_cnn" / png).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_evaluate_calibrates_on_val_and_writes_the_calibrated_predictions(smoke_workspace: Path) -> None:
    folder = smoke_workspace / "data/eval/simple_cnn"
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["temperature"] != 1.0  # else the checks below could not tell raw from calibrated
    assert metrics["val_calibrated"]["loss"] < metrics["val"]["loss"]  # fitted on val NLL
    for split in ("val", "test"):
        labels, probs = read_predictions(folder / f"predictions_{split}.csv")
        # the CSVs (the serving reference) hold the calibrated probabilities, not the raw ones
        assert calibration.nll(probs, labels) == pytest.approx(metrics[f"{split}_calibrated"]["loss"], abs=2e-6)
        assert calibration.ece(probs, labels) == pytest.approx(metrics[f"{split}_calibrated"]["ece"], abs=2e-6)
        assert abs(calibration.nll(probs, labels) - metrics[split]["loss"]) > 1e-3
        assert metrics[split]["accuracy"] == round(float(np.mean(probs.argmax(1) == labels)), 6)  # argmax unchanged


@pytest.mark.slow
def test_export_card_and_serving_check(smoke_workspace: Path) -> None:
    card = json.loads((smoke_workspace / "data/export/model_card.json").read_text())
    # The winner recomputed from the evaluation and training files themselves: best val accuracy,
    # then fewer parameters, then the name (the smoke models often tie on val).
    archs = yaml.safe_load((smoke_workspace / "params.yaml").read_text())["archs"]
    val = {a: json.loads((smoke_workspace / "data/eval" / a / "metrics.json").read_text())["val"]["accuracy"] for a in archs}
    size = {a: json.loads((smoke_workspace / "data/models" / a / "summary.json").read_text())["params"] for a in archs}
    expected = sorted(archs, key=lambda a: (-val[a], size[a], a))
    assert card["arch"] == expected[0] and [r["arch"] for r in card["leaderboard"]] == expected
    assert len(card["leaderboard"]) == len(archs) == 6 and "per_class_accuracy" in card["test"]
    assert card["serving_check"]["argmax_disagreements"] == 0
    assert card["serving_check"]["max_probability_difference"] <= 1e-5
    winner = json.loads((smoke_workspace / "data/eval" / card["arch"] / "metrics.json").read_text())
    assert card["temperature"] == winner["temperature"] != 1.0  # what the serving check compared is calibrated
    assert card["test_calibrated"]["ece"] == winner["test_calibrated"]["ece"]
    assert (smoke_workspace / "data/export/reliability.png").read_bytes()[:4] == b"\x89PNG"
    assert f"T = {card['temperature']:.3f}" in (smoke_workspace / "data/export/MODEL_CARD.md").read_text()
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
    trained = {arch: model_state(workspace / "data/models" / arch) for arch in ("simple_cnn", "lenet")}
    locked = train_locks(workspace)
    done = run_in(workspace, "dvc", "repro", "report")
    assert "Running stage 'evaluate@simple_cnn'" in done.stdout
    assert not re.search(r"Running stage 'train@", done.stdout), done.stdout  # evaluation params retrain nothing
    assert {arch: model_state(workspace / "data/models" / arch) for arch in trained} == trained  # not even rewritten
    assert train_locks(workspace) == locked
    metrics = json.loads((workspace / "data/eval/simple_cnn/metrics.json").read_text())
    assert {"val_tta", "test_tta"} <= set(metrics)
    card = json.loads((workspace / "data/export/model_card.json").read_text())
    assert card["blessed"] is False and "< export.min_accuracy 0.99" in card["blessing_reasons"][0]
    assert card["serving_check"]["argmax_disagreements"] == 0  # the plain (calibrated) predictions stay the reference
    refused = run_in(workspace, "cifarflow", "promote", check=False)
    assert refused.returncode == 2 and "not blessed" in refused.stderr
    assert registry.current(workspace / "champion") is None


@pytest.mark.slow
def test_robustness_in_evaluate_card_and_a_gate_that_blocks(workspace: Path) -> None:
    metrics = json.loads((workspace / "data/eval/simple_cnn/metrics.json").read_text())
    robust = metrics["robustness"]
    assert set(robust) == {"mca", "ci95_low", "ci95_high", "relative_mca", "clean_accuracy", "n"}  # headline only
    grid = json.loads((workspace / "data/eval/simple_cnn/details.json").read_text())["robustness"]["grid"]
    cells = [v for row in grid.values() for v in row.values()]
    assert len(cells) == 4 * 2 and robust["mca"] == pytest.approx(np.mean(cells), abs=1e-6)
    assert robust["ci95_low"] <= robust["mca"] <= robust["ci95_high"]
    assert robust["relative_mca"] == pytest.approx(robust["mca"] / robust["clean_accuracy"], abs=1e-5)
    card = json.loads((workspace / "data/export/model_card.json").read_text())
    assert (
        card["robustness"]["mca"]
        == json.loads((workspace / "data/eval" / card["arch"] / "metrics.json").read_text())["robustness"]["mca"]
    )
    assert all(r["mca"] is not None for r in card["leaderboard"])
    assert not any("corruption" in r for r in card["blessing_reasons"])  # unset gates: not even mentioned

    set_params(workspace, **{"profiles.smoke.export.min_corruption_accuracy": 0.99})
    done = run_in(workspace, "dvc", "repro", "export")
    assert "Running stage 'export'" in done.stdout and "Running stage 'evaluate@" not in done.stdout
    card = json.loads((workspace / "data/export/model_card.json").read_text())
    assert card["blessed"] is False
    assert (
        f"mean corruption accuracy {card['robustness']['mca']:.4f} < export.min_corruption_accuracy 0.99"
        in card["blessing_reasons"]
    )


@pytest.mark.slow
def test_evaluate_with_a_wrong_benchmark_path_writes_nothing(smoke_workspace: Path, tmp_path: Path) -> None:
    done = run_in(
        smoke_workspace,
        *("cifarflow", "evaluate", "lenet", "--shards", "data/shards", "--model", "data/models/lenet"),
        *("--verdict", "data/validation/verdict.json", "--out", str(tmp_path / "eval"), "--corrupt", "data/corupt"),
        check=False,
    )
    assert done.returncode == 2 and "data/corupt/manifest.json: not found; run the corrupt stage first" in done.stderr
    assert not (tmp_path / "eval").exists()


@pytest.mark.slow
def test_robustness_against_the_champion_is_rescored_and_cached(workspace: Path) -> None:
    run_in(workspace, "cifarflow", "promote", "--force")  # synthetic data: only by force
    set_params(workspace, **{"profiles.smoke.export.robustness_vs_champion": True})
    run_in(workspace, "dvc", "repro", "export")
    card = json.loads((workspace / "data/export/model_card.json").read_text())
    # the champion is the same model: its mCA through the SavedModel is evaluate's through Keras
    assert card["champion"]["mca"] == pytest.approx(card["robustness"]["mca"], abs=0.02)
    assert any("within export.tolerance" in r and "re-scored on this benchmark" in r for r in card["blessing_reasons"])
    manifest = hashlib.sha256((workspace / "data/corrupt/manifest.json").read_bytes()).hexdigest()
    cache = workspace / "champion" / registry.SCORES / f"{card['champion']['weights_sha256'][:16]}-{manifest[:16]}.json"
    assert json.loads(cache.read_text())["mca"] == card["champion"]["mca"]
    # a champion more robust than the winner by more than the tolerance blocks the blessing; the
    # cached score stands for it (the same weights and benchmark are never scored twice)
    cache.write_text(json.dumps({"mca": 0.99}))
    run_in(workspace, "dvc", "repro", "-f", "export")
    card = json.loads((workspace / "data/export/model_card.json").read_text())
    assert card["blessed"] is False and card["champion"]["mca"] == 0.99
    assert any("more than export.tolerance 0.01 of the champion's 0.9900" in r for r in card["blessing_reasons"])


def model_state(folder: Path) -> dict[str, tuple[str, int]]:
    """{file: (sha256, mtime in ns)} of a train stage's outputs."""
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def train_locks(workspace: Path) -> dict[str, object]:
    """The train@simple_cnn and train@lenet entries of dvc.lock."""
    stages = yaml.safe_load((workspace / "dvc.lock").read_text())["stages"]
    return {name: stages[name] for name in ("train@simple_cnn", "train@lenet")}


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
    assert [r["arch"] for r in report["rows"]] == [
        "simple_cnn",
        "lenet",
        "lenet_mixup",
        "resnet56",
        "densenet121",
        "whitened_vgg",
    ]
    lenet = next(r for r in report["rows"] if r["arch"] == "lenet")
    assert lenet["seed_reported_accuracy"] == 0.72 and lenet["params"] == 7994
    metrics = json.loads((smoke_workspace / "data/eval/lenet/metrics.json").read_text())
    assert lenet["mca"] == metrics["robustness"]["mca"] and lenet["temperature"] == metrics["temperature"]
    assert lenet["test_ece"] == [metrics["test"]["ece"], metrics["test_calibrated"]["ece"]]
    markdown = (smoke_workspace / "data/reports/leaderboard.md").read_text()
    assert "| lenet | 7,994 |" in markdown and "run info" in markdown
    robust = metrics["robustness"]
    assert f"{100 * robust['mca']:.2f}% ({100 * robust['ci95_low']:.2f}%–{100 * robust['ci95_high']:.2f}%)" in markdown
    link = re.search(r"\[dvc_plots/index\.html\]\(([^)]+)\)", markdown)
    assert link, markdown  # relative to the leaderboard's folder; `dvc plots show` writes in the project
    leaderboard_dir = smoke_workspace / "data/reports"
    assert (leaderboard_dir / link.group(1)).resolve() == (smoke_workspace / "dvc_plots/index.html").resolve()
    shown = json.dumps(json.loads(run_in(smoke_workspace, "dvc", "metrics", "show", "--json").stdout))
    assert "data/eval/simple_cnn/metrics.json" in shown and "ci95_low" in shown
    assert "per_class_accuracy" not in shown and "details.json" not in shown  # the long tail is not a DVC metric
    plots = run_in(smoke_workspace, "dvc", "plots", "show", "-o", str(tmp_path / "plots"))
    html = (tmp_path / "plots" / "index.html").read_text()
    assert "accuracy" in html and "loss" in html, plots.stdout
