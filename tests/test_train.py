"""The trainer: outputs, bit-identical weights run to run, both shard formats, schedules, errors."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cli_env, make_params, train_params, write_params

from cifarflow.data import validate
from cifarflow.training.schedule import LearningRate
from cifarflow.training.trainer import train


@pytest.fixture(scope="module")
def verdict(tiny_shards: Path) -> Path:
    """train() requires the validate stage's verdict: validate the session's tiny shards (once)."""
    path = tiny_shards.parent / "validation" / "verdict.json"
    validate.run(make_params(), tiny_shards, path.parent / "metrics.json", path.parent / "report.md", path)
    return path


def test_outputs_and_determinism(tiny_shards: Path, verdict: Path, tmp_path: Path) -> None:
    params = train_params(schedule={"kind": "exponential", "decay": 0.5})
    first = train(params, "lenet", tiny_shards, tmp_path / "a", tmp_path / "run_a", tmp_path / "ck_a", verdict)
    second = train(params, "lenet", tiny_shards, tmp_path / "b", tmp_path / "run_b", tmp_path / "ck_b", verdict)
    assert first["weights_sha256"] == second["weights_sha256"], "same params, same weights"
    assert (tmp_path / "a/weights.sha256").read_text().strip() == first["weights_sha256"]
    rows = list(csv.DictReader((tmp_path / "a/history.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    assert [float(r["lr"]) for r in rows] == [0.002, 0.001]
    assert (tmp_path / "a/history.csv").read_bytes() == (tmp_path / "b/history.csv").read_bytes()
    assert (tmp_path / "a/summary.json").read_bytes() == (tmp_path / "b/summary.json").read_bytes()
    info = json.loads((tmp_path / "run_a/run.json").read_text())
    assert info["train_images_per_second"] > 0 and info["versions"]["keras"].startswith("3.")
    assert list((tmp_path / "run_a/tensorboard").rglob("*tfevents*")), "TensorBoard logs go to the run-info side"
    assert not list((tmp_path / "a").glob("*tfevents*"))


def test_both_formats_train_identically(tiny_shards: Path, verdict: Path, tmp_path: Path) -> None:
    raw = train_params(epochs=1, augmentation="crop_flip", normalization="standardize").model_dump()
    digests = []
    for fmt in ("parquet", "tfrecord"):
        raw["data"]["format"] = fmt
        params = type(train_params()).model_validate(raw)
        digests.append(
            train(params, "lenet", tiny_shards, tmp_path / fmt, tmp_path / f"run_{fmt}", tmp_path / f"ck_{fmt}", verdict)[
                "weights_sha256"
            ]
        )
    assert digests[0] == digests[1]


def test_mixup_and_plateau_recipes_train(tiny_shards: Path, verdict: Path, tmp_path: Path) -> None:
    params = train_params(
        mixup={"alpha": 1.0, "warmup": 1}, monitor="val_loss", schedule={"kind": "plateau", "patience": 0, "factor": 0.5}
    )
    summary = train(params, "lenet", tiny_shards, tmp_path / "m", tmp_path / "run", tmp_path / "ck", verdict)
    assert summary["monitor"] == "val_loss" and summary["best_epoch"] in (0, 1)


def test_plateau_schedule() -> None:
    recipe = train_params(
        schedule={"kind": "plateau", "monitor": "val_loss", "patience": 2, "factor": 0.1, "min_lr": 1e-5}
    ).train["lenet"]
    lr = LearningRate(recipe)
    rates = []
    for loss in [1.0, 0.9, 0.95, 0.93, 0.92, 0.91, 0.95, 0.99]:
        rates.append(lr.rate(0))
        lr.update({"val_loss": loss})
    assert rates == [0.002, 0.002, 0.002, 0.002, 0.0002, 0.0002, 2e-05, 2e-05]
    restored = LearningRate(recipe, lr.to_dict())
    assert restored.rate(9) == lr.rate(9) and restored.state == lr.state


def test_step_schedule_scales_with_batch() -> None:
    recipe = train_params(
        batch_size=64,
        optimizer={"name": "sgd", "learning_rate": 0.1, "lr_reference_batch": 128, "momentum": 0.9},
        schedule={"kind": "step", "boundaries": [30, 45], "multipliers": [0.1, 0.01]},
    ).train["lenet"]
    lr = LearningRate(recipe)
    assert [lr.rate(e) for e in (0, 29, 30, 44, 45, 59)] == pytest.approx([0.05, 0.05, 0.005, 0.005, 0.0005, 0.0005])


def cli(tmp_path: Path, raw: dict, *args: str) -> subprocess.CompletedProcess[str]:
    params = write_params(tmp_path, raw)
    return subprocess.run(
        [sys.executable, "-m", "cifarflow", "--params", str(params), *args], env=cli_env(), capture_output=True, text=True
    )


def test_bad_arch_and_bad_recipe_exit_2(tmp_path: Path) -> None:
    raw = train_params().model_dump(mode="json")
    done = cli(
        tmp_path, raw, "train", "lenett", "--shards", "x", "--out", "y", "--runinfo", "z", "--checkpoints", "c", "--verdict", "v"
    )
    assert done.returncode == 2 and "unknown arch 'lenett': did you mean lenet?" in done.stderr
    raw["train"]["lenet"]["batch_size"] = 0
    done = cli(
        tmp_path, raw, "train", "lenet", "--shards", "x", "--out", "y", "--runinfo", "z", "--checkpoints", "c", "--verdict", "v"
    )
    assert done.returncode == 2 and "train.lenet.batch_size" in done.stderr
    raw["train"]["lenet"]["batch_size"] = 8
    raw["train"]["lenet"]["optimizer"]["nmae"] = "adam"
    done = cli(tmp_path, raw, "params", "--check")
    assert done.returncode == 2 and "unknown key 'train.lenet.optimizer.nmae'; did you mean name?" in done.stderr
    raw["train"]["lenet"]["optimizer"].pop("nmae")
    raw["archs"] = ["lenet", "vgg"]
    done = cli(tmp_path, raw, "params", "--check")
    assert done.returncode == 2 and "archs ['vgg'] have no recipe" in done.stderr
