"""`cifarflow train <arch>`: the recipe's model, optimizer and schedule, trained with Keras `fit`
one epoch at a time, checkpointed at every epoch end so a killed run resumes where it stopped.

Why one epoch at a time: every random stream is re-derived from (seed, epoch) at each epoch
start (data order, augmentation, mixup, and each layer's dropout seed), so an epoch's result
depends only on the weights and state it starts from; a resumed run therefore ends
bit-identical to an uninterrupted one.

Outputs (deterministic, DVC-tracked) in `out/`: `model.keras` (the best epoch on the recipe's
monitor), `weights.sha256`, `history.csv` (per-epoch metrics, no timings) and `summary.json`.
Run-dependent facts (times, img/s, hardware, versions, resumed_from_epoch, TensorBoard logs) go
to `runinfo/`. Resume state lives in `checkpoints/` and is deleted when the run completes.

One loop for every strategy (`train`): it owns setup, resume, the schedule, the reseed,
checkpoints, out-of-memory handling and the outputs. Only the per-epoch work is swappable:
`FitSteps` (Keras `fit`: one device, or MirroredStrategy) or, for `runtime.distribution:
multi_worker`, `multi_worker.StrategySteps` (`strategy.run` steps, since Keras 3.15's `fit` fails
under MultiWorkerMirroredStrategy). The loop imports the steps, never the reverse.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np
import psutil
import tensorflow as tf

from cifarflow import keras_archive
from cifarflow.config import Params, Recipe
from cifarflow.data.inputs import InputPipeline, load_checked
from cifarflow.data.layout import MANIFEST
from cifarflow.data.verdict import check_shards
from cifarflow.digest import weights_digest
from cifarflow.errors import CifarflowError, ConfigError, InputError
from cifarflow.fileio import atomic_path, temp_sibling, write_bytes_atomic, write_json_atomic
from cifarflow.models import build_model
from cifarflow.models.registry import data_init, load_model
from cifarflow.training import runtime, sgd
from cifarflow.training.faults import FaultInjector
from cifarflow.training.multi_worker import StrategySteps
from cifarflow.training.resume import ResumeStore, RunState, fingerprint
from cifarflow.training.schedule import LearningRate, WarmupLinear

log = logging.getLogger(__name__)
HISTORY_FIELDS = ("epoch", "lr", "loss", "accuracy", "val_loss", "val_accuracy")
MODEL_FILE, DIGEST_FILE, HISTORY_FILE, SUMMARY_FILE = "model.keras", "weights.sha256", "history.csv", "summary.json"
ACCUMULATOR = "gradient_accumulator"  # optimizer variables that restart from zero after an adaptation


class OutOfMemoryError(CifarflowError):
    """The device ran out of memory; the next attempt (a fresh process) uses a smaller micro-batch."""

    exit_code = 3
    failure_class = "oom"


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


def make_optimizer(
    recipe: Recipe, rate: float | WarmupLinear, accumulation: int = 1, total_steps: int = 1
) -> keras.optimizers.Optimizer:
    """`total_steps`: the run's optimizer steps (micro-steps under accumulation), for lookahead's ramp."""
    o = recipe.optimizer
    extra: dict[str, Any] = {"gradient_accumulation_steps": accumulation} if accumulation > 1 else {}
    if recipe.ema or o.norm_bias_rate != 1:  # config: sgd only
        if recipe.ema:
            extra |= {"use_ema": True, "ema_momentum": recipe.ema.momentum, "ema_overwrite_frequency": recipe.ema.every}
            extra |= {"ema_ramp": recipe.ema.ramp, "total_steps": total_steps}
        return sgd.SGD(learning_rate=rate, momentum=o.momentum, nesterov=o.nesterov, norm_bias_rate=o.norm_bias_rate, **extra)
    if o.name == "adam":
        return keras.optimizers.Adam(learning_rate=rate, **extra)
    if o.name == "adamax":
        return keras.optimizers.Adamax(learning_rate=rate, **extra)
    return keras.optimizers.SGD(learning_rate=rate, momentum=o.momentum, nesterov=o.nesterov, **extra)


def model_options(recipe: Recipe) -> dict[str, Any]:
    """The builder's options the recipe sets (catalog.STEMS, WIDTHS, TTA_FAMILIES)."""
    options = {"stem": recipe.stem, "width": recipe.width, "tta_level": recipe.tta_level}
    return {k: v for k, v in options.items() if v is not None}


def build_compiled(
    recipe: Recipe, num_classes: int, rate: float | WarmupLinear, accumulation: int = 1, total_steps: int = 1
) -> keras.Model:
    model = build_model(recipe.model, num_classes, recipe.variant, **model_options(recipe))
    model.compile(
        optimizer=make_optimizer(recipe, rate, accumulation, total_steps),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=recipe.label_smoothing),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
    )
    if recipe.jit_compile:
        # Keras 3.15 refuses XLA whenever op determinism is on (some ops lack deterministic XLA kernels),
        # and its setter checks again. Config allows jit_compile only for families that have them all
        # (catalog.XLA_FAMILIES), so set the attribute the train step is built from: TensorFlow then
        # runs the compiled step under op determinism (bit-identical runs, tested).
        model._jit_compile = True
    return model


def _unprefixed(path: str) -> str:
    return path.split("/", 1)[-1]  # optimizer variables are "<optimizer name>/<variable>"


def restore(model: keras.Model, checkpoint: Path) -> list[str]:
    """Weights and optimizer state from a checkpoint, copied by name, so that a model compiled
    with a different gradient accumulation still gets its moments and step count (Keras itself
    skips all optimizer variables on load when their number differs). Returns the names of the
    optimizer variables copied."""
    saved = load_model(checkpoint, compile=True)
    model.set_weights(saved.get_weights())
    optimizer = model.optimizer
    optimizer.build(model.trainable_variables)
    source = {_unprefixed(v.path): v for v in saved.optimizer.variables}
    copied = []
    for variable in optimizer.variables:
        name = _unprefixed(variable.path)
        if name not in source or ACCUMULATOR in name:
            continue
        value = source[name]
        if name == "iteration":  # counts micro-steps under accumulation: keep the optimizer steps
            value = int(saved.optimizer.iterations) * (optimizer.gradient_accumulation_steps or 1)
        variable.assign(value)
        copied.append(name)
    return copied


def save_model_atomic(model: keras.Model, path: Path) -> None:
    """model.save needs a .keras name: save beside the target, normalise into a temp, then rename
    over it. The archive's time stamps are fixed, so the same weights give the same bytes (and
    dvc.lock). Both temps are PID-named: the next save of `path` removes a killed run's."""
    with atomic_path(path) as normalised, temp_sibling(path, ".tmp.keras") as saved:
        model.save(saved)
        keras_archive.normalise(saved, normalised)


def improved(recipe: Recipe, value: float, best: float | None) -> bool:
    if best is None:
        return not np.isnan(value)
    return value > best if recipe.monitor == "val_accuracy" else value < best


class EpochTimer(keras.callbacks.Callback):
    """Wall time of the training part of an epoch (fit's set-up excluded), for img/s."""

    def __init__(self) -> None:
        super().__init__()
        self.started = self.seconds = 0.0

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        self.seconds = time.perf_counter() - self.started


def process_seconds() -> float:
    """Wall seconds since this process started (interpreter and TensorFlow start-up included)."""
    return round(time.time() - psutil.Process().create_time(), 1)


def history_csv(rows: list[dict[str, float]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, HISTORY_FIELDS, lineterminator="\n")
    writer.writeheader()
    # an epoch that was not validated (recipe validate_every) has empty val_* cells
    writer.writerows({k: v if k == "epoch" or v is None else repr(float(v)) for k, v in row.items()} for row in rows)
    return buffer.getvalue()


def run_info(arch: str, state: RunState, resumed_from: int | None, devices: dict) -> dict[str, Any]:
    rates = [t["images_per_second"] for t in state.timings]
    return {
        "arch": arch,
        "resumed_from_epoch": resumed_from,
        "adaptations": state.adaptations,
        "epochs": state.timings,
        "train_images_per_second": round(float(np.median(rates)), 1) if rates else None,
        "process_seconds": process_seconds(),  # the stage's wall time, less writing this file and exiting
        "runtime": devices,
        "hardware": {
            "machine": platform.machine(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
        },
        "versions": {
            "python": platform.python_version(),
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "numpy": np.__version__,
        },
    }


def adapt_to_oom(state: RunState, recipe: Recipe, arch: str, micro: int, floor: int, epoch: int) -> RunState:
    """The state the next attempt starts from: the last checkpoint, with half the micro-batch."""
    half = micro // 2
    if micro % 2 or half < floor or recipe.batch_size % half:
        raise CifarflowError(
            f"train@{arch}: out of memory at micro-batch {micro} (batch_size {recipe.batch_size}); "
            f"halving would go below runtime.oom_min_micro_batch={floor} or not divide the batch. "
            "Use a smaller model variant, precision: mixed_float16, or a bigger device."
        )
    state.micro_batch = half
    state.adaptations.append({"epoch": epoch, "micro_batch": half, "accumulation": recipe.batch_size // half})
    return state


def check_finite(arch: str, epoch: int, logs: dict[str, float], monitor: str, model: keras.Model) -> None:
    """A diverged epoch (NaN or infinite loss or monitored metric) stops the run as a configuration
    error: retrying the same recipe diverges again, and a NaN model must never be kept. An epoch
    without validation has its weights checked instead: the training loss is measured before each
    update, so it misses weights that the epoch's last step made non-finite."""
    validated = "val_loss" in logs
    names = ("loss", "val_loss", monitor) if validated else ("loss",)
    bad = [name for name in dict.fromkeys(names) if not np.isfinite(logs[name])]
    if not validated and not all(np.isfinite(w).all() for w in model.get_weights()):
        bad.append("weights")
    if bad:
        raise ConfigError(
            f"train@{arch}: {' and '.join(bad)} not finite in epoch {epoch}: the recipe train.{arch} "
            "diverges (learning rate too high for this batch or normalization?); nothing of this epoch kept"
        )


def record_epoch(
    state: RunState,
    schedule: LearningRate,
    recipe: Recipe,
    epoch: int,
    rate: float,
    logs: dict[str, float],
    seconds: float,
    images: int,
) -> None:
    """Fold a finished epoch into the run state; its checkpoint (`state.checkpoint`) is saved next.
    Timings: the epoch's training seconds, and the wall seconds from this process's start to the
    end of the epoch and its validation, if it had one (time to accuracy; a resumed run counts from
    its own start)."""
    schedule.update(logs)
    state.schedule = schedule.to_dict()
    state.history.append({"epoch": epoch, "lr": rate, **{k: logs.get(k) for k in HISTORY_FIELDS[2:]}})
    state.timings.append(
        {
            "epoch": epoch,
            "train_seconds": round(seconds, 3),
            "images_per_second": round(images / max(seconds, 1e-9), 1),
            "process_seconds": process_seconds(),
        }
    )
    state.checkpoint = f"epoch-{epoch}.keras"
    if recipe.monitor in logs and improved(recipe, logs[recipe.monitor], state.best):
        state.best, state.best_epoch, state.best_checkpoint = logs[recipe.monitor], epoch, state.checkpoint
    state.epoch = epoch + 1


class Summaries:
    """TensorBoard scalars per epoch, in the Keras callback's layout (train/, validation/), for every kind of steps."""

    def __init__(self, root: Path) -> None:
        self.train = tf.summary.create_file_writer(str(root / "train"))
        self.validation = tf.summary.create_file_writer(str(root / "validation"))

    def write(self, epoch: int, logs: dict[str, float], rate: float) -> None:
        with self.train.as_default():
            for name in ("loss", "accuracy"):
                tf.summary.scalar(f"epoch_{name}", logs[name], step=epoch)
            tf.summary.scalar("epoch_learning_rate", rate, step=epoch)
        if "val_loss" in logs:  # a validated epoch
            with self.validation.as_default():
                for name in ("loss", "accuracy"):
                    tf.summary.scalar(f"epoch_{name}", logs[f"val_{name}"], step=epoch)
        self.train.flush()
        self.validation.flush()


class FitSteps:
    """One epoch of Keras `fit`, for the loop: a single process on one device or MirroredStrategy."""

    loop = "keras fit"
    writes = True  # one process: it writes everything
    adapts_micro_batch = True  # out of memory: halve the micro-batch, accumulate gradients

    def __init__(self, injector: FaultInjector) -> None:
        self.timer = EpochTimer()
        self.callbacks = [self.timer, injector]
        self.model: keras.Model | None = None

    def agree(self, store: ResumeStore | None, mine: str, arch: str) -> RunState:
        return store.load() or RunState()

    def start(self, model: keras.Model, spec: tuple[tf.TensorSpec, tf.TensorSpec]) -> None:
        self.model = model

    def describe(self) -> dict[str, Any]:
        return {"workers": 1}

    def epoch(self, epoch: int, train: tf.data.Dataset, validation: tf.data.Dataset | None) -> tuple[dict[str, float], float]:
        """(the epoch's logs, without val_* when `validation` is None; seconds of its training part).
        Validation runs after `fit` returns, not inside it: fit ends by copying an EMA of the weights
        into the model (`finalize_variable_values`) after its own validation, and val must score the
        weights kept."""
        fit = self.model.fit(
            train,
            initial_epoch=epoch,
            epochs=epoch + 1,
            shuffle=False,
            callbacks=self.callbacks,
            verbose=0,  # the loop logs one line per epoch, for every kind of steps
        )
        scores = {} if validation is None else self.model.evaluate(validation, verbose=0, return_dict=True)
        logs = {k: float(v[-1]) for k, v in fit.history.items()} | {f"val_{k}": float(v) for k, v in scores.items()}
        return logs, self.timer.seconds

    def done(self) -> None:
        pass


Steps = FitSteps | StrategySteps


def make_steps(params: Params, strategy: tf.distribute.Strategy, per_replica: int, checkpoints: Path) -> Steps:
    injector = FaultInjector(checkpoints)
    if params.runtime.distribution == "multi_worker":  # Keras 3.15's fit fails under this strategy
        return StrategySteps(strategy, per_replica, injector)
    return FitSteps(injector)  # one device, or MirroredStrategy: fit distributes the batches


def micro_batch(state: RunState, recipe: Recipe, arch: str, steps: Steps, strategy: tf.distribute.Strategy) -> int:
    """The micro-batch this attempt trains with: the recipe's batch, or an out-of-memory adaptation's."""
    if state.micro_batch and not steps.adapts_micro_batch:
        raise CifarflowError(
            f"train@{arch}: the resume state asks for micro-batch {state.micro_batch} (an "
            "out-of-memory adaptation), which multi_worker does not do; delete the checkpoints"
        )
    micro = state.micro_batch or recipe.batch_size
    if recipe.batch_size // micro > 1 and strategy.num_replicas_in_sync > 1:
        raise CifarflowError(
            f"train@{arch}: out-of-memory adaptation needs gradient accumulation, which Keras "
            "3.15 does not support under a multi-device strategy; a single device is required"
        )
    return micro


def build_state(
    recipe: Recipe,
    num_classes: int,
    strategy: tf.distribute.Strategy,
    store: ResumeStore | None,
    state: RunState,
    schedule: LearningRate,
    accumulation: int,
    train_images: np.ndarray,
) -> keras.Model:
    """The model and optimizer the run continues from. Variables are made inside the scope (the
    strategy mirrors them; MultiWorkerMirroredStrategy syncs their creation, so every worker makes
    the same ones in the same order), the checkpoint is read outside it: loading builds a throwaway
    model whose variables must not be distributed (nor, under multi_worker, collective). A fresh
    model of a family whose initial weights come from the data (whitened_vgg) gets them from the
    training images here; a resumed one has them in its checkpoint."""
    with strategy.scope():
        model = build_compiled(recipe, num_classes, schedule.for_optimizer(state.epoch), accumulation, schedule.total_steps)
        model.optimizer.build(model.trainable_variables)
    if store is not None and state.checkpoint:
        restore(model, store.path(state.checkpoint))
    elif (init := data_init(recipe.model)) is not None:
        init(model, train_images, recipe.normalization)
    return model


def out_of_memory(
    exc: tf.errors.ResourceExhaustedError,
    steps: Steps,
    store: ResumeStore,
    recipe: Recipe,
    arch: str,
    micro: int,
    floor: int,
    epoch: int,
) -> CifarflowError:
    """The error to stop with; with adaptable steps, the next attempt's smaller micro-batch is committed first."""
    if not steps.adapts_micro_batch:
        return CifarflowError(
            f"train@{arch}: out of memory in epoch {epoch} ({exc.message}); multi_worker does "
            "not adapt the micro-batch: use more workers, a smaller batch_size or variant, or "
            "precision: mixed_float16"
        )
    committed = store.load() or RunState()  # the last completed epoch, not this half-done one
    store.commit(adapt_to_oom(committed, recipe, arch, micro, floor, epoch))
    return OutOfMemoryError(
        f"train@{arch}: out of memory in epoch {epoch} at micro-batch {micro} "
        f"({exc.message}); the next attempt resumes with micro-batch {micro // 2}"
    )


def train(
    params: Params, arch: str, shards_dir: Path, out: Path, runinfo: Path, checkpoints: Path, verdict: Path
) -> dict[str, Any]:
    """Train `arch` on the shards, resuming from `checkpoints` if a run was cut short. Only shards the
    validate stage passed (its `verdict`) are read, and only if they are still the ones it checked.
    Under multi_worker every node runs this, each on its share of every global batch; only the chief writes."""
    recipe = params.recipe(arch)
    data = check_shards(shards_dir, verdict, params.data.format, ("train", "val"))  # before devices or shards: fail fast
    num_classes, out, runinfo = len(data.classes), Path(out), Path(runinfo)
    strategy = runtime.make_strategy(params.runtime)  # first: devices are fixed at TF's first op
    configure_determinism(params.seed, params.runtime.deterministic)
    per_replica = runtime.per_replica_batch(recipe.batch_size, strategy, f"train.{arch}.batch_size")
    steps = make_steps(params, strategy, per_replica, Path(checkpoints))

    mine = fingerprint(params, arch, data.root / MANIFEST)
    store = ResumeStore(checkpoints, mine) if steps.writes else None  # other workers never touch the folder
    state = steps.agree(store, mine, arch)
    resumed_from = state.epoch if state.checkpoint else None
    micro = micro_batch(state, recipe, arch, steps, strategy)
    accumulation = recipe.batch_size // micro

    # Global batches (randomness and mixup pairs are decided per global batch); fit splits them
    # over its replicas, each multi_worker replica takes its rows.
    train_inputs = InputPipeline(load_checked(data, "train"), recipe, num_classes, params.seed, recipe.batch_size, micro)
    val_inputs = InputPipeline(load_checked(data, "val"), recipe, num_classes, params.seed, recipe.batch_size)
    if train_inputs.steps(training=True) == 0:
        raise InputError(
            f"train has {len(train_inputs)} examples, fewer than one batch of "
            f"train.{arch}.batch_size={recipe.batch_size} with drop_remainder"
        )
    schedule = LearningRate(recipe, state.schedule, train_inputs.steps(training=True) * accumulation)
    model = build_state(recipe, num_classes, strategy, store, state, schedule, accumulation, train_inputs.split.images)
    if resumed_from is not None:
        log.info("train@%s: resumed from epoch %d (micro-batch %d)", arch, resumed_from, micro)
    devices = runtime.describe(strategy, params.runtime) | {
        "loop": steps.loop,
        "per_replica_batch": per_replica,
        "micro_batch": micro,
        "accumulation": accumulation,
        "jit_compile": bool(model.jit_compile),  # what the compiled model runs, not only what was asked
    }
    devices |= steps.describe()
    log.info(
        "train@%s: %s, %s, %d worker(s), %d replica(s) of %d examples",
        arch,
        devices["strategy"],
        "writes the outputs" if steps.writes else f"task {runtime.task_name(strategy)}, not chief: writes nothing",
        devices["workers"],
        strategy.num_replicas_in_sync,
        per_replica,
    )
    validation = val_inputs.evaluation()
    steps.start(model, validation.element_spec)
    run_epochs(params, arch, model, steps, store, state, schedule, train_inputs, validation, micro, runinfo)
    if state.best_epoch is None:
        raise CifarflowError(f"train@{arch}: {recipe.monitor} was NaN in every epoch; no model to keep")
    summary = (
        finish(arch, recipe, state, store, out, runinfo, resumed_from, devices)
        if steps.writes
        else {"arch": arch, "best_epoch": state.best_epoch, "resumed_from_epoch": resumed_from}
    )
    steps.done()
    return summary


def run_epochs(
    params: Params,
    arch: str,
    model: keras.Model,
    steps: Steps,
    store: ResumeStore | None,
    state: RunState,
    schedule: LearningRate,
    train_inputs: InputPipeline,
    validation: tf.data.Dataset,
    micro: int,
    runinfo: Path,
) -> None:
    """The epoch loop: each epoch starts from (weights, state) and its (seed, epoch) streams only,
    and ends committed (checkpoint, then state.json) by the writer."""
    recipe = params.recipe(arch)
    summaries = Summaries(runinfo / "tensorboard") if steps.writes else None
    seen = train_inputs.steps(training=True) * recipe.batch_size
    for epoch in range(state.epoch, recipe.epochs):
        rate = schedule.rate(epoch)
        if not schedule.per_step:  # a per-step schedule is the optimizer's own
            model.optimizer.learning_rate.assign(rate)
        reseed_layers(model, params.seed, epoch)
        validates = (epoch + 1) % recipe.validate_every == 0 or epoch + 1 == recipe.epochs
        try:
            logs, seconds = steps.epoch(epoch, train_inputs.train(epoch), validation if validates else None)
        except tf.errors.ResourceExhaustedError as exc:
            floor = params.runtime.oom_min_micro_batch
            raise out_of_memory(exc, steps, store, recipe, arch, micro, floor, epoch) from None
        scored = f" val_loss {logs['val_loss']:.4f} val_accuracy {logs['val_accuracy']:.4f}" if validates else ""
        log.info(
            "train@%s: epoch %d/%d loss %.4f accuracy %.4f%s (%.1fs)",
            arch,
            epoch + 1,
            recipe.epochs,
            logs["loss"],
            logs["accuracy"],
            scored,
            seconds,
        )
        check_finite(arch, epoch, logs, recipe.monitor, model)
        record_epoch(state, schedule, recipe, epoch, rate, logs, seconds, seen)
        if steps.writes:
            save_model_atomic(model, store.path(state.checkpoint))
            store.commit(state)
            summaries.write(epoch, logs, rate)


def finish(
    arch: str,
    recipe: Recipe,
    state: RunState,
    store: ResumeStore,
    out: Path,
    runinfo: Path,
    resumed_from: int | None,
    devices: dict,
) -> dict[str, Any]:
    """Write the outputs from the best checkpoint, then drop the resume state."""
    (out / f".{MODEL_FILE}.partial").unlink(missing_ok=True)  # a killed older version's temp (no PID in its name)
    with atomic_path(out / MODEL_FILE) as partial:
        shutil.copyfile(store.path(state.best_checkpoint), partial)
    best = load_model(out / MODEL_FILE)
    digest = weights_digest(best)
    best_row = state.history[state.best_epoch]
    summary = {
        "arch": arch,
        "model": recipe.model,
        "variant": recipe.variant,
        "params": int(best.count_params()),
        "epochs": recipe.epochs,
        "monitor": recipe.monitor,
        "best_epoch": state.best_epoch,
        "val_accuracy": best_row["val_accuracy"],
        "val_loss": best_row["val_loss"],
        "weights_sha256": digest,
        "adaptations": state.adaptations,
    }
    write_bytes_atomic(out / DIGEST_FILE, f"{digest}\n".encode())
    write_bytes_atomic(out / HISTORY_FILE, history_csv(state.history).encode())
    write_json_atomic(out / SUMMARY_FILE, summary)
    write_json_atomic(runinfo / "run.json", run_info(arch, state, resumed_from, devices))
    store.clear()
    log.info(
        "train@%s: best epoch %d, %s %.4f, weights %s, resumed_from_epoch %s",
        arch,
        state.best_epoch,
        recipe.monitor,
        state.best,
        digest[:12],
        resumed_from,
    )
    return summary | {"resumed_from_epoch": resumed_from}
