"""`cifarflow train <arch>`: the recipe's model, optimizer and schedule, trained with Keras `fit`
one epoch at a time.

Why one epoch at a time: every random stream is re-derived from (seed, epoch) at each epoch
start (data order, augmentation, mixup, and each layer's dropout seed), so an epoch's result
depends only on the weights and state it starts from; that is what makes a resumed run end
bit-identical to an uninterrupted one.

Outputs (deterministic, DVC-tracked) in `out/`: `model.keras` (the best epoch on the recipe's
monitor), `weights.sha256`, `history.csv` (per-epoch metrics, no timings) and `summary.json`.
Run-dependent facts (times, img/s, hardware, versions, TensorBoard logs) go to `runinfo/`.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from cifarflow.config import Params, Recipe
from cifarflow.data.inputs import InputPipeline, load_split
from cifarflow.data.preprocess import MANIFEST
from cifarflow.digest import weights_digest
from cifarflow.errors import InputError
from cifarflow.fileio import write_bytes_atomic, write_json_atomic
from cifarflow.models import build_model
from cifarflow.training.schedule import LearningRate

log = logging.getLogger(__name__)
HISTORY_FIELDS = ("epoch", "lr", "loss", "accuracy", "val_loss", "val_accuracy")
MODEL_FILE, DIGEST_FILE, HISTORY_FILE, SUMMARY_FILE = "model.keras", "weights.sha256", "history.csv", "summary.json"


def configure_determinism(seed: int, deterministic: bool) -> None:
    """Seed Python, numpy and TF; with op determinism, CPU runs give bit-identical weights."""
    keras.utils.set_random_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()


def reseed_layers(model: keras.Model, seed: int, epoch: int) -> None:
    """Give every layer's random stream (dropout, ...) a state derived from (seed, layer, epoch)."""
    for i, layer in enumerate(model._flatten_layers(include_self=False)):
        for j, generator in enumerate(getattr(layer, "_seed_generators", [])):
            state = np.random.SeedSequence([seed, epoch, i, j]).generate_state(1)[0] % (2**31 - 1)
            generator.state.assign(np.array([state, 0], dtype=generator.state.dtype))


def make_optimizer(recipe: Recipe, rate: float) -> keras.optimizers.Optimizer:
    o = recipe.optimizer
    if o.name == "adam":
        return keras.optimizers.Adam(learning_rate=rate)
    if o.name == "adamax":
        return keras.optimizers.Adamax(learning_rate=rate)
    return keras.optimizers.SGD(learning_rate=rate, momentum=o.momentum)


def build_compiled(recipe: Recipe, num_classes: int, rate: float) -> keras.Model:
    options = {"stem": recipe.stem} if recipe.stem else {}
    model = build_model(recipe.model, num_classes, recipe.variant, **options)
    model.compile(optimizer=make_optimizer(recipe, rate), loss=keras.losses.CategoricalCrossentropy(),
                  metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")])
    return model


def save_model_atomic(model: keras.Model, path: Path) -> None:
    """model.save needs a .keras name: save beside the target, then rename over it."""
    partial = path.with_name(f".{path.stem}.partial.keras")
    try:
        model.save(partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def improved(recipe: Recipe, value: float, best: float | None) -> bool:
    if best is None:
        return not np.isnan(value)
    return value > best if recipe.monitor == "val_accuracy" else value < best


class EpochTimer(keras.callbacks.Callback):
    """Wall time of the training part of an epoch (validation excluded), for img/s."""

    def __init__(self) -> None:
        super().__init__()
        self.started = self.seconds = 0.0

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self.started = time.perf_counter()

    def on_test_begin(self, logs: Any = None) -> None:
        self.seconds = time.perf_counter() - self.started


@dataclass
class RunState:
    """What the loop carries from epoch to epoch."""

    epoch: int = 0  # the next epoch to run
    best: float | None = None
    best_epoch: int | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    schedule: dict | None = None


def history_csv(rows: list[dict[str, float]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, HISTORY_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: (repr(float(v)) if k != "epoch" else v) for k, v in row.items()} for row in rows)
    return buffer.getvalue()


def run_info(arch: str, recipe: Recipe, timings: list[dict[str, float]], resumed_from: int | None) -> dict[str, Any]:
    return {
        "arch": arch, "resumed_from_epoch": resumed_from, "epochs": timings,
        "train_images_per_second": round(float(np.median([t["images_per_second"] for t in timings])), 1) if timings else None,
        "hardware": {"machine": platform.machine(), "processor": platform.processor(), "cpus": os.cpu_count(),
                     "gpus": [d.name for d in tf.config.list_physical_devices("GPU")]},
        "versions": {"python": platform.python_version(), "tensorflow": tf.__version__, "keras": keras.__version__,
                     "numpy": np.__version__},
    }


def train(params: Params, arch: str, shards_dir: Path, out: Path, runinfo: Path) -> dict[str, Any]:
    """Train `arch` on the shards; write the outputs described in the module docstring."""
    recipe = params.recipe(arch)
    manifest_path = Path(shards_dir) / MANIFEST
    if not manifest_path.is_file():
        raise InputError(f"{manifest_path}: not found; run the preprocess stage first")
    classes = json.loads(manifest_path.read_text())["classes"]
    configure_determinism(params.seed, params.runtime.deterministic)

    train_inputs = InputPipeline(load_split(shards_dir, "train", params.data.format), recipe, len(classes),
                                 params.seed, recipe.batch_size)
    val_inputs = InputPipeline(load_split(shards_dir, "val", params.data.format), recipe, len(classes),
                               params.seed, recipe.batch_size)
    if train_inputs.steps(training=True) == 0:
        raise InputError(f"train has {len(train_inputs)} examples, fewer than one batch of "
                         f"train.{arch}.batch_size={recipe.batch_size} with drop_remainder")
    state = RunState()
    schedule = LearningRate(recipe, state.schedule)
    model = build_compiled(recipe, len(classes), schedule.rate(state.epoch))
    out, runinfo = Path(out), Path(runinfo)
    out.mkdir(parents=True, exist_ok=True)
    timer = EpochTimer()
    callbacks = [timer, keras.callbacks.TensorBoard(log_dir=str(runinfo / "tensorboard"), write_graph=False)]
    validation = val_inputs.evaluation()
    timings = []
    for epoch in range(state.epoch, recipe.epochs):
        rate = schedule.rate(epoch)
        model.optimizer.learning_rate.assign(rate)
        reseed_layers(model, params.seed, epoch)
        fit = model.fit(train_inputs.train(epoch), validation_data=validation, initial_epoch=epoch, epochs=epoch + 1,
                        shuffle=False, callbacks=callbacks, verbose=2)
        logs = {k: float(v[-1]) for k, v in fit.history.items()}
        schedule.update(logs)
        state.history.append({"epoch": epoch, "lr": rate, **{k: logs[k] for k in HISTORY_FIELDS[2:]}})
        seen = train_inputs.steps(training=True) * recipe.batch_size
        timings.append({"epoch": epoch, "train_seconds": round(timer.seconds, 3),
                        "images_per_second": round(seen / max(timer.seconds, 1e-9), 1)})
        if improved(recipe, logs[recipe.monitor], state.best):
            state.best, state.best_epoch = logs[recipe.monitor], epoch
            save_model_atomic(model, out / MODEL_FILE)
        state.epoch = epoch + 1
    if state.best_epoch is None:
        raise RuntimeError(f"train@{arch}: {recipe.monitor} was NaN in every epoch; no model to keep")
    best = keras.models.load_model(out / MODEL_FILE, compile=False)
    digest = weights_digest(best)
    best_row = state.history[state.best_epoch]
    summary = {
        "arch": arch, "model": recipe.model, "variant": recipe.variant, "params": int(best.count_params()),
        "epochs": recipe.epochs, "monitor": recipe.monitor, "best_epoch": state.best_epoch,
        "val_accuracy": best_row["val_accuracy"], "val_loss": best_row["val_loss"], "weights_sha256": digest,
    }
    write_bytes_atomic(out / DIGEST_FILE, f"{digest}\n".encode())
    write_bytes_atomic(out / HISTORY_FILE, history_csv(state.history).encode())
    write_json_atomic(out / SUMMARY_FILE, summary)
    write_json_atomic(runinfo / "run.json", run_info(arch, recipe, timings, None))
    log.info("train@%s: best epoch %d, %s %.4f, weights %s", arch, state.best_epoch, recipe.monitor, state.best,
             digest[:12])
    return summary
