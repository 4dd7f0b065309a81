"""Evaluate, select, bless, export (with the serving check in a fresh process), promote,
predict and report: unit cases as tables, then the real stages on the smoke workspace."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import cli_env, run_in, set_params, verdict_reasons
from PIL import Image

from cifarflow import calibration, numerics, registry
from cifarflow.contract import DETAILS, read_metrics
from cifarflow.evaluate import HEADLINE, read_predictions

CLASSES = ["c0", "c1", "c2"]


@pytest.mark.slow
def test_evaluate_outputs(smoke_workspace: Path) -> None:
    headline = json.loads((smoke_workspace / "data/eval/simple_cnn/metrics.json").read_text())
    assert {k: sorted(v) for k, v in headline.items()} == {k: sorted(v) for k, v in HEADLINE.items()}  # a few numbers
    assert all(isinstance(x, float) for block in headline.values() for x in block.values())
    metrics = read_metrics(smoke_workspace / "data/eval", "simple_cnn")  # with details.json's long tail
    counts = json.loads((smoke_workspace / "data/shards/manifest.json").read_text())["counts"]
    assert metrics["test"]["n"] == counts["test"] and metrics["val"]["n"] == counts["val"]
    low, high = metrics["test"]["ci95_low"], metrics["test"]["ci95_high"]
    assert low <= metrics["test"]["accuracy"] <= high
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
    metrics = read_metrics(smoke_workspace / "data/eval", "simple_cnn")
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
    winner = read_metrics(smoke_workspace / "data/eval", card["arch"])
    assert card["temperature"] == winner["temperature"] != 1.0  # what the serving check compared is calibrated
    assert card["test_calibrated"]["ece"] == winner["test_calibrated"]["ece"]
    assert (smoke_workspace / "data/export/reliability.png").read_bytes()[:4] == b"\x89PNG"
    assert f"T = {card['temperature']:.3f}" in (smoke_workspace / "data/export/MODEL_CARD.md").read_text()
    assert card["comparison"]["runner_up"] == card["leaderboard"][1]["arch"]
    assert {"data_manifest_sha256", "settings_sha256", "provenance", "versions", "verdict"} <= set(card)
    # generated data is never blessed, and the card says so where it says why
    assert card["verdict"]["blessed"] is False and any("synthetic data" in r for r in verdict_reasons(card, failed_only=True))
    assert "seconds" not in json.dumps(card) and "hardware" not in card
    trained = json.loads((smoke_workspace / f"data/models/{card['arch']}/summary.json").read_text())["numerics"]
    assert card["trained_on"] == trained and trained["cpu"]["isa"]  # the host kind that decided the weights
    assert f"trained on: {numerics.describe(trained)}" in (smoke_workspace / "data/export/MODEL_CARD.md").read_text()
    assert json.loads((smoke_workspace / "data/export/labels.json").read_text())[:2] == ["airplane", "automobile"]
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
def test_the_served_digest_is_the_weights_not_the_load(smoke_workspace: Path, tmp_path: Path) -> None:
    """Keras draws dropout's seed states afresh at every load_model: two exports of one model.keras,
    loaded after different random draws, serve the same digest (they did not: the fan-out's parent
    and one machine exported the same weights under two served digests)."""
    import keras

    from cifarflow.export import save_serving_model
    from cifarflow.models.registry import load_model
    from cifarflow.serving import served_digests

    model_file = smoke_workspace / "data/models/simple_cnn/model.keras"  # simple_cnn has three Dropout layers
    for seed in (1, 2):
        keras.utils.set_random_seed(seed)
        (tmp_path / str(seed)).mkdir()
        (tmp_path / str(seed) / "labels.json").write_text("[]")
        save_serving_model(load_model(model_file), "center", 1.0, tmp_path / str(seed) / "saved_model")
    assert served_digests(tmp_path / "1") == served_digests(tmp_path / "2")


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
    metrics = read_metrics(workspace / "data/eval", "simple_cnn")
    assert {"val_tta", "test_tta"} <= set(metrics)
    card = json.loads((workspace / "data/export/model_card.json").read_text())
    assert card["verdict"]["blessed"] is False and any("< export.min_accuracy 0.99" in r for r in verdict_reasons(card, True))
    assert card["serving_check"]["argmax_disagreements"] == 0  # the plain (calibrated) predictions stay the reference
    refused = run_in(workspace, "cifarflow", "promote", check=False)
    assert refused.returncode == 2 and "< export.min_accuracy 0.99" in refused.stderr
    assert registry.current(workspace / "champion") is None


@pytest.mark.slow
def test_robustness_in_evaluate_card_and_a_gate_that_blocks(workspace: Path) -> None:
    assert json.loads((workspace / "data/eval/simple_cnn/metrics.json").read_text())["robustness"] == {
        "mca": pytest.approx(read_metrics(workspace / "data/eval", "simple_cnn")["robustness"]["mca"])
    }  # the DVC metric: the mCA only
    robust = read_metrics(workspace / "data/eval", "simple_cnn")["robustness"]
    assert set(robust) == {"mca", "ci95_low", "ci95_high", "relative_mca", "clean_accuracy", "n", "resamples", "grid"}
    grid = robust["grid"]
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
    assert not any("corruption" in r for r in verdict_reasons(card))  # unset gates: not even mentioned

    set_params(workspace, **{"profiles.smoke.export.min_corruption_accuracy": 0.99})
    done = run_in(workspace, "dvc", "repro", "export")
    assert "Running stage 'export'" in done.stdout and "Running stage 'evaluate@" not in done.stdout
    card = json.loads((workspace / "data/export/model_card.json").read_text())
    assert card["verdict"]["blessed"] is False
    assert f"mean corruption accuracy {card['robustness']['mca']:.4f} < export.min_corruption_accuracy 0.99" in verdict_reasons(
        card, failed_only=True
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
    champion = card["verdict"]["champion"]
    assert champion["mca"] == pytest.approx(card["robustness"]["mca"], abs=0.02)
    assert any("within export.tolerance" in r and "re-scored on this benchmark" in r for r in verdict_reasons(card))
    manifest = hashlib.sha256((workspace / "data/corrupt/manifest.json").read_bytes()).hexdigest()
    cache = workspace / "champion" / registry.SCORES / f"{champion['weights_sha256'][:16]}-{manifest[:16]}.json"
    assert json.loads(cache.read_text())["mca"] == champion["mca"]
    # a champion more robust than the winner by more than the tolerance blocks the blessing; the
    # cached score stands for it (the same weights and benchmark are never scored twice)
    cache.write_text(json.dumps({"mca": 0.99}))
    run_in(workspace, "dvc", "repro", "--force", "--single-item", "export")  # export alone, not its upstream
    card = json.loads((workspace / "data/export/model_card.json").read_text())
    assert card["verdict"]["blessed"] is False and card["verdict"]["champion"]["mca"] == 0.99
    assert any("more than export.tolerance 0.01 below the champion" in r and "0.9900" in r for r in verdict_reasons(card, True))


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
    assert "trained and tested on generated data" in done.stderr  # the smoke export: its labels mean nothing for photos
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
    metrics = read_metrics(smoke_workspace / "data/eval", "lenet")
    assert lenet["mca"] == metrics["robustness"]["mca"] and lenet["temperature"] == metrics["temperature"]
    assert lenet["test_ece"] == [metrics["test"]["ece"], metrics["test_calibrated"]["ece"]]
    markdown = (smoke_workspace / "data/reports/leaderboard.md").read_text()
    assert "| lenet | 7,994 |" in markdown and "run info" in markdown
    robust = metrics["robustness"]
    assert f"{100 * robust['mca']:.2f}% ({100 * robust['ci95_low']:.2f}%–{100 * robust['ci95_high']:.2f}%)" in markdown
    assert (
        "[curves.png](curves.png)" in markdown
        and (leaderboard_dir := smoke_workspace / "data/reports").joinpath("curves.png").read_bytes()[:4] == b"\x89PNG"
    )  # the curves offline: dvc's HTML needs a CDN
    link = re.search(r"\[dvc_plots/index\.html\]\(([^)]+)\)", markdown)
    assert link, markdown  # relative to the leaderboard's folder; `dvc plots show` writes in the project
    assert (leaderboard_dir / link.group(1)).resolve() == (smoke_workspace / "dvc_plots/index.html").resolve()
    shown = json.dumps(json.loads(run_in(smoke_workspace, "dvc", "metrics", "show", "--json").stdout))
    assert "data/eval/simple_cnn/metrics.json" in shown and "ci95_low" in shown
    assert "per_class_accuracy" not in shown and "details.json" not in shown  # the long tail is not a DVC metric
    assert "leaderboard.json" not in shown and "weights_sha256" not in shown and "variant" not in shown
    table = run_in(smoke_workspace, "dvc", "metrics", "show").stdout.splitlines()
    columns = table[0].split()[1:]
    assert len(columns) <= 14 and max(map(len, table)) < 400, table[0]  # few numbers: readable in a terminal
    plots = run_in(smoke_workspace, "dvc", "plots", "show", "-o", str(tmp_path / "plots"))
    html = (tmp_path / "plots" / "index.html").read_text()
    assert "accuracy" in html and "loss" in html, plots.stdout


@pytest.mark.slow
def test_the_champion_is_the_model_its_card_claims(workspace: Path, tmp_path: Path) -> None:
    """Another model's saved_model/ swapped into an export: before, promote took it (the card's arch and
    digest listed, the swapped model served). Now promote and predict check what the export serves
    against served.json and the card, and refuse a swapped, added or removed file, naming it, even
    under --force (which overrides the verdict, here that of generated data, never the integrity)."""
    from cifarflow.export import save_serving_model
    from cifarflow.models.registry import load_model

    export = workspace / "data" / "export"
    card = json.loads((export / "model_card.json").read_text())
    other = next(a for a in ("lenet", "simple_cnn") if a != card["arch"])
    save_serving_model(load_model(workspace / "data/models" / other / "model.keras"), "minmax", 1.0, tmp_path / "other")
    pristine = tmp_path / "pristine"
    shutil.copytree(export, pristine)
    image = tmp_path / "a.png"
    Image.new("RGB", (32, 32)).save(image)

    def refused(expected: str) -> None:
        promoted = run_in(workspace, "cifarflow", "promote", "--force", check=False)
        assert promoted.returncode == 2 and expected in promoted.stderr, promoted.stderr[-2000:]
        predicted = run_in(workspace, "cifarflow", "predict", str(image), "--model", str(export), check=False)
        assert predicted.returncode == 2 and expected in predicted.stderr, predicted.stderr[-2000:]
        assert registry.current(workspace / "champion") is None

    shutil.rmtree(export / "saved_model")
    shutil.copytree(tmp_path / "other", export / "saved_model")  # another model's SavedModel, whole
    refused("its sha256 differs from served.json's")
    shutil.rmtree(export)
    shutil.copytree(pristine, export)
    (export / "saved_model" / "assets").mkdir(exist_ok=True)
    (export / "saved_model" / "assets" / "extra.bin").write_bytes(b"x")
    refused("saved_model/assets/extra.bin: not listed in served.json")
    shutil.rmtree(export)
    shutil.copytree(pristine, export)
    (export / "labels.json").unlink()
    refused("labels.json")
    shutil.rmtree(export)
    shutil.copytree(pristine, export)
    promoted = run_in(workspace, "cifarflow", "promote", "--force")
    assert "promoted" in promoted.stdout
    champion = registry.current(workspace / "champion")
    assert champion.facts["weights_sha256"] == card["weights_sha256"]
    listing = run_in(workspace, "cifarflow", "promote", "--list").stdout
    assert f"project {card['provenance']['project']['commit'][:12]}" in listing
