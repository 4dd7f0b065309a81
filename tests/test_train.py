"""The trainer: outputs, bit-identical weights run to run, both shard formats, schedules, errors."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import cli_env, train_params, write_params

from cifarflow import resolved
from cifarflow.errors import ConfigError
from cifarflow.settings import resolve
from cifarflow.training import resume
from cifarflow.training.schedule import LearningRate
from cifarflow.training.trainer import Epoch, record_epoch, train


def test_outputs_and_determinism(tiny_shards: Path, verdict: Path, tmp_path: Path) -> None:
    params = train_params(schedule={"kind": "exponential", "decay": 0.5})
    first = train(params, "lenet", tiny_shards, tmp_path / "a", tmp_path / "run_a", tmp_path / "ck_a", verdict)
    second = train(params, "lenet", tiny_shards, tmp_path / "b", tmp_path / "run_b", tmp_path / "ck_b", verdict)
    assert first["weights_sha256"] == second["weights_sha256"], "same params, same weights"
    assert (tmp_path / "a/weights.sha256").read_text().strip() == first["weights_sha256"]
    rows = list(csv.DictReader((tmp_path / "a/history.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2], "counted from 1, as the log counts"
    assert [float(r["lr"]) for r in rows] == [0.002, 0.001]
    assert (tmp_path / "a/history.csv").read_bytes() == (tmp_path / "b/history.csv").read_bytes()
    assert (tmp_path / "a/summary.json").read_bytes() == (tmp_path / "b/summary.json").read_bytes()
    info = json.loads((tmp_path / "run_a/run.json").read_text())
    assert info["train_images_per_second"] > 0 and info["numerics"]["versions"]["keras"].startswith("3.")
    assert info["numerics"] == first["numerics"]  # the summary's record of the host, the run info's too
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
    """The plateau rule must fire: a learning rate of 1e-9 cannot move any val prediction's argmax,
    so val_accuracy does not improve after epoch 0 and (patience 0) the rate halves for epoch 2."""
    params = train_params(
        epochs=3,
        optimizer={"name": "adam", "learning_rate": 1e-9},
        mixup={"alpha": 1.0, "warmup": 1},
        monitor="val_loss",
        schedule={"kind": "plateau", "monitor": "val_accuracy", "patience": 0, "factor": 0.5, "min_lr": 0},
    )
    summary = train(params, "lenet", tiny_shards, tmp_path / "m", tmp_path / "run", tmp_path / "ck", verdict)
    assert summary["monitor"] == "val_loss" and summary["best_epoch"] in (1, 2, 3)
    rows = list(csv.DictReader((tmp_path / "m/history.csv").open()))
    accuracies, rates = [float(r["val_accuracy"]) for r in rows], [float(r["lr"]) for r in rows]
    assert accuracies[1] <= accuracies[0], "the premise: no improvement after epoch 1"
    assert rates == [1e-9, 1e-9, 5e-10], rates
    # and the recorded rates are exactly what the rule gives for the recorded metrics
    replay = LearningRate(params.train["lenet"])
    for row, rate in zip(rows, rates, strict=True):
        assert replay.rate(int(row["epoch"]) - 1) == rate  # the schedule takes the loop index
        replay.update({"val_accuracy": float(row["val_accuracy"])})


def test_validate_every_skips_val_but_always_validates_the_last_epoch(tiny_shards: Path, verdict: Path, tmp_path: Path) -> None:
    """validate_every 2 over 3 epochs: val after epochs 2 and 3 only. The epoch not
    validated has empty val cells and no TensorBoard val point, and cannot be the best checkpoint."""
    import tensorflow as tf

    params = train_params(epochs=3, validate_every=2, monitor="val_loss")
    summary = train(params, "lenet", tiny_shards, tmp_path / "m", tmp_path / "run", tmp_path / "ck", verdict)
    rows = list(csv.DictReader((tmp_path / "m/history.csv").open()))
    assert (rows[0]["val_loss"], rows[0]["val_accuracy"]) == ("", "")
    assert all(r["val_loss"] and r["val_accuracy"] and r["loss"] for r in rows[1:])
    assert summary["best_epoch"] in (2, 3)
    assert summary["val_loss"] == min(float(r["val_loss"]) for r in rows[1:])
    events = (tmp_path / "run/tensorboard/validation").glob("*tfevents*")
    steps = sorted(e.step for path in events for e in tf.compat.v1.train.summary_iterator(str(path)) if e.summary.value)
    assert steps == [2, 2, 3, 3], "loss and accuracy for the validated epochs only"


def test_validate_every_needs_val_every_epoch_for_plateau_and_is_positive() -> None:
    with pytest.raises(ConfigError, match="schedule plateau reads val every epoch: validate_every must be 1"):
        train_params(validate_every=2, schedule={"kind": "plateau"})
    with pytest.raises(ConfigError, match="validate_every"):
        train_params(validate_every=0)


def test_validation_does_not_touch_training(tiny_shards: Path, verdict: Path, tmp_path: Path) -> None:
    """The last epoch's weights are the same bytes whether epoch 0 was validated or not (val_loss
    falls here, so both runs keep their last epoch: the premise is asserted)."""
    runs = {
        every: train(
            train_params(validate_every=every, monitor="val_loss"),
            "lenet",
            tiny_shards,
            tmp_path / f"o{every}",
            tmp_path / f"r{every}",
            tmp_path / f"c{every}",
            verdict,
        )
        for every in (1, 2)
    }
    assert runs[1]["best_epoch"] == runs[2]["best_epoch"] == 2
    assert runs[1]["weights_sha256"] == runs[2]["weights_sha256"]


def test_the_best_checkpoint_is_the_best_validated_epoch_not_the_last() -> None:
    recipe = train_params(epochs=4, validate_every=2, monitor="val_loss").train["lenet"]
    state, schedule = resume.RunState(), LearningRate(recipe)
    for epoch, val_loss in enumerate([None, 0.5, None, 0.9]):
        logs = {"loss": 1.0, "accuracy": 0.5} | ({} if val_loss is None else {"val_loss": val_loss, "val_accuracy": 0.5})
        record_epoch(state, schedule, recipe, Epoch(epoch, 0.1, logs, 1.0, 10))
    assert (state.best_epoch, state.best, state.best_checkpoint) == (2, 0.5, "epoch-2.keras")
    assert state.history[0]["val_loss"] is None and state.epoch == 4


def test_an_epoch_without_val_still_stops_on_non_finite_weights(
    tiny_shards: Path, verdict: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The training loss is measured before each update: NaN weights from the epoch's last step
    (250 examples / 32 = 8 steps) show in no loss of that epoch, only in the weights."""
    monkeypatch.setenv("CIFARFLOW_FAULT_NAN_AT", "0:7")
    with pytest.raises(ConfigError, match="weights not finite in epoch 1:"):
        train(train_params(validate_every=2), "lenet", tiny_shards, tmp_path / "o", tmp_path / "r", tmp_path / "c", verdict)
    assert not (tmp_path / "c/epoch-1.keras").exists() and not (tmp_path / "o/model.keras").exists()


def test_mixup_batches_are_blends(tiny_shards: Path) -> None:
    """With mixup on, each example is lam * itself + (1 - lam) * its neighbour, images and one-hot
    labels alike, one lam in (0, 1) per batch; before warm-up ends the batches are the plain ones."""
    from cifarflow.data.inputs import InputPipeline, load_split

    split = load_split(tiny_shards, "train", "parquet")
    mixed_recipe = train_params(mixup={"alpha": 1.0, "warmup": 1}).train["lenet"]
    plain_recipe = train_params().train["lenet"]
    mixed = InputPipeline(split, mixed_recipe, 10, 42, 32)
    plain = InputPipeline(split, plain_recipe, 10, 42, 32)
    for (x, y), (x0, y0) in zip(mixed.train(0), plain.train(0), strict=True):  # warm-up: not mixed
        assert np.array_equal(x.numpy(), x0.numpy()) and np.array_equal(y.numpy(), y0.numpy())
    lams = []
    for (x, y), (x0, y0) in zip(mixed.train(1), plain.train(1), strict=True):
        x, y, x0, y0 = x.numpy(), y.numpy(), x0.numpy(), y0.numpy()
        assert np.allclose(y.sum(axis=1), 1.0) and ((y > 0).sum(axis=1) <= 2).all()
        differ = np.flatnonzero(y0.argmax(1) != np.roll(y0, 1, axis=0).argmax(1))
        lam = float(y[differ[0], y0[differ[0]].argmax()])  # the weight of the example's own label
        assert 0 < lam < 1 and not np.array_equal(y, y0), "labels are convex mixtures, not one-hot"
        np.testing.assert_allclose(y, lam * y0 + (1 - lam) * np.roll(y0, 1, axis=0), atol=1e-6)
        np.testing.assert_allclose(x, lam * x0 + (1 - lam) * np.roll(x0, 1, axis=0), atol=1e-5)
        assert not np.allclose(x, x0), "images are blends"
        lams.append(lam)
    assert len(set(lams)) == len(lams) > 1, "a new lam per batch"


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


@pytest.mark.parametrize(
    ("runtime", "says"),
    [
        ({"logical_cpus": 2, "distribution": "multi_worker"}, "runtime: .*logical_cpus applies to distribution: mirrored"),
        # XLA is the recipe's choice now (train.<arch>.jit_compile, tests/test_whitened_vgg.py)
        ({"jit_compile": True}, "unknown key 'runtime.jit_compile'"),
    ],
)
def test_settings_that_would_not_run_as_written_are_config_errors(runtime: dict, says: str) -> None:
    """Refused at load (so `params --check` catches them), not run otherwise than written."""
    raw = train_params(epochs=1).model_dump(mode="json")
    raw["runtime"].update(runtime)
    with pytest.raises(ConfigError, match=says):
        resolve(raw)


def test_the_train_code_list_holds_everything_training_loads() -> None:
    """resolved.STAGE_CODE["train"] is the one list of the code that decides the weights (the resume
    fingerprint and the train stage's resolved file both hash it): every module training loads (the
    trainer and every model family) is in it, or in resolved.NOT_DECIDING_TRAIN."""
    listed = (*resolved.STAGE_CODE["train"], *resolved.NOT_DECIDING_TRAIN)
    for rel in listed:
        assert (resolved.CODE_ROOT / rel).exists(), rel
    probe = (
        "import sys; from cifarflow.training import trainer; from cifarflow.models import FAMILIES, build_model\n"
        "[build_model(f, 10, 'tiny') for f in FAMILIES]\n"
        "print('\\n'.join(m.__file__ for n, m in sys.modules.items() if n.split('.')[0] == 'cifarflow'))"
    )
    done = subprocess.run([sys.executable, "-c", probe], env=cli_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = {Path(f).relative_to(resolved.CODE_ROOT).as_posix() for f in done.stdout.split()}
    covered = {rel for rel in loaded for entry in listed if rel == entry or rel.startswith(f"{entry}/")}
    assert loaded - covered == set(), "training loads code listed neither in STAGE_CODE['train'] nor NOT_DECIDING_TRAIN"
    assert resolved.CODE_ROOT == Path(__file__).resolve().parents[1] / "cifarflow"
