"""`cifarflow train <arch>`: the recipe's model, optimizer and schedule, trained with Keras `fit`
one epoch at a time, checkpointed at every epoch end so a killed run resumes where it stopped.

Why one epoch at a time: every random stream is re-derived from (seed, epoch) at each epoch
start (data order, augmentation, mixup, and each layer's dropout seed), so an epoch's result
depends only on the weights and state it starts from; a resumed run therefore ends
bit-identical to an uninterrupted one.

Outputs (deterministic, DVC-tracked) in `out/`: `model.keras` (the best epoch on the recipe's
monitor), `weights.sha256`, `history.csv` (per-epoch metrics, no timings), `summary.json` and
its few numbers for `dvc metrics show`, `metrics.json`.
Run-dependent facts (times, img/s, hardware, versions, resumed_after_epoch, TensorBoard logs) go
to `runinfo/`. Resume state lives in `checkpoints/` and is deleted when the run completes.

Every output counts epochs from 1, as the log does: "epoch 2/3" is history.csv's epoch 2, the
summary's best_epoch 2, TensorBoard's step 2 and the checkpoint epoch-2.keras. Only the loop's
index (the random streams' `epoch`, the schedule's) counts from 0.

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
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import keras
import numpy as np
import psutil
import tensorflow as tf

from cifarflow import keras_archive, numerics
from cifarflow.contract import (
    HISTORY,
    MANIFEST,
    METRICS,
    MODEL,
    RUN_INFO,
    SUMMARY,
    WEIGHTS_DIGEST,
)
from cifarflow.data.inputs import InputPipeline, load_checked
from cifarflow.data.verdict import check_shards
from cifarflow.digest import weights_digest
from cifarflow.errors import CifarflowError, ConfigError, InputError, OutOfMemoryError
from cifarflow.fileio import atomic_path, split_headline, temp_sibling, write_bytes_atomic, write_json_atomic
from cifarflow.models import build_model
from cifarflow.models.registry import data_init, load_model
from cifarflow.settings import Params, Recipe
from cifarflow.training import runtime, sgd
from cifarflow.training.faults import FaultInjector
from cifarflow.training.multi_worker import StrategySteps
from cifarflow.training.resume import ResumeStore, RunState, fingerprint
from cifarflow.training.schedule import LearningRate, WarmupLinear

log = logging.getLogger(__name__)
HISTORY_FIELDS = ("epoch", "lr", "loss", "accuracy", "val_loss", "val_accuracy")
# The DVC metrics of a training (metrics.json, fileio.split_headline); summary.json holds the whole record.
HEADLINE: dict[str, tuple[str, ...]] = {"epochs": (), "best_epoch": (), "val_loss": ()}
ACCUMULATOR = "gradient_accumulator"  # optimizer variables that restart from zero after an adaptation


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


def run_info(
    arch: str, state: RunState, resumed_after: int | None, devices: dict, resume_notes: list[str], host: dict
) -> dict[str, Any]:
    rates = [t["images_per_second"] for t in state.timings]
    return {
        "arch": arch,
        "resumed_after_epoch": resumed_after,  # the epochs done before this attempt started, if it resumed
        "resume_notes": resume_notes,  # damaged state or checkpoints set aside, and what the run resumed from
        "adaptations": state.adaptations,
        "epochs": state.timings,
        "train_images_per_second": round(float(np.median(rates)), 1) if rates else None,
        "process_seconds": process_seconds(),  # the stage's wall time, less writing this file and exiting
        "runtime": devices,
        "numerics": host,  # the host and libraries that decided the weights' bits
    }


def adapt_to_oom(state: RunState, recipe: Recipe, arch: str, micro: int, floor: int, epoch: int) -> RunState:
    """The state the next attempt starts from: the last checkpoint, with half the micro-batch
    (`epoch`: the loop's index of the epoch that ran out of memory)."""
    half = micro // 2
    if micro % 2 or half < floor or recipe.batch_size % half:
        raise CifarflowError(
            f"train@{arch}: out of memory at micro-batch {micro} (batch_size {recipe.batch_size}); "
            f"halving would go below runtime.oom_min_micro_batch={floor} or not divide the batch. "
            "Use a smaller model variant, precision: mixed_float16, or a bigger device."
        )
    state.micro_batch = half
    state.adaptations.append({"epoch": epoch + 1, "micro_batch": half, "accumulation": recipe.batch_size // half})
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
            f"train@{arch}: {' and '.join(bad)} not finite in epoch {epoch + 1}: the recipe train.{arch} "
            "diverges (learning rate too high for this batch or normalization?); nothing of this epoch kept"
        )


class Summaries:
    """TensorBoard scalars per epoch, in the Keras callback's layout (train/, validation/), for every kind of steps."""

    def __init__(self, root: Path) -> None:
        self.train = tf.summary.create_file_writer(str(root / "train"))
        self.validation = tf.summary.create_file_writer(str(root / "validation"))

    def write(self, epoch: int, logs: dict[str, float], rate: float) -> None:
        """`epoch`: its number, counted from 1."""
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


class Steps(Protocol):
    """The per-epoch work the loop delegates (FitSteps, or multi_worker.StrategySteps): how batches
    become updates. Everything else (resume, schedule, reseed, checkpoints, outputs) is the loop's."""

    loop: str  # what the run info calls it
    writes: bool  # this process writes checkpoints and outputs (one process, or the chief)
    adapts_micro_batch: bool  # out of memory: halve the micro-batch and accumulate gradients

    def agree(self, store: ResumeStore | None) -> RunState:
        """The resume state every process of the run starts from."""
        ...

    def start(self, model: keras.Model, spec: tuple[tf.TensorSpec, tf.TensorSpec]) -> None:
        """Called once the model holds the state the run continues from."""
        ...

    def describe(self) -> dict[str, Any]: ...

    def epoch(self, epoch: int, train: tf.data.Dataset, validation: tf.data.Dataset | None) -> tuple[dict[str, float], float]:
        """(the epoch's logs as Keras names them, without val_* when `validation` is None; seconds of its training part)."""
        ...

    def done(self) -> None: ...


class FitSteps:
    """Steps of Keras `fit`: a single process on one device, or MirroredStrategy."""

    loop = "keras fit"
    writes = True  # one process: it writes everything
    adapts_micro_batch = True

    def __init__(self, injector: FaultInjector) -> None:
        self.timer = EpochTimer()
        self.callbacks = [self.timer, injector]
        self.model: keras.Model | None = None

    def agree(self, store: ResumeStore | None) -> RunState:
        return (store.load() if store else None) or RunState()

    def start(self, model: keras.Model, spec: tuple[tf.TensorSpec, tf.TensorSpec]) -> None:
        self.model = model

    def describe(self) -> dict[str, Any]:
        return {"workers": 1}

    def epoch(self, epoch: int, train: tf.data.Dataset, validation: tf.data.Dataset | None) -> tuple[dict[str, float], float]:
        """Validation runs after `fit` returns, not inside it: fit ends by copying an EMA of the weights
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


def make_steps(
    params: Params, arch: str, strategy: tf.distribute.Strategy, per_replica: int, checkpoints: Path, mine: str
) -> Steps:
    """`mine`: this process's resume fingerprint, which every multi_worker process must share."""
    injector = FaultInjector(checkpoints)
    if params.runtime.distribution == "multi_worker":  # Keras 3.15's fit fails under this strategy
        return StrategySteps(strategy, per_replica, injector, arch, mine)
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


@dataclass
class TrainState:
    """Everything the epoch loop carries, built once by `prepare` and passed through the loop (as a
    flax TrainState is): the run's settings, its model and steps, where it commits, and `run`, the
    part that survives a restart (resume.RunState)."""

    params: Params
    arch: str
    recipe: Recipe
    strategy: tf.distribute.Strategy
    steps: Steps
    store: ResumeStore | None  # None on a process that does not write (a multi_worker non-chief)
    run: RunState
    resumed_after: int | None  # the epochs done before this attempt started, if it resumed
    micro: int  # the micro-batch (the recipe's batch, unless an out-of-memory adaptation halved it)
    train_inputs: InputPipeline
    validation: tf.data.Dataset
    schedule: LearningRate
    model: keras.Model
    runinfo: Path

    @property
    def accumulation(self) -> int:
        return self.recipe.batch_size // self.micro


def build_model_state(ts: TrainState, num_classes: int) -> keras.Model:
    """The model and optimizer the run continues from. Variables are made inside the scope (the
    strategy mirrors them; MultiWorkerMirroredStrategy syncs their creation, so every worker makes
    the same ones in the same order), the checkpoint is read outside it: loading builds a throwaway
    model whose variables must not be distributed (nor, under multi_worker, collective). A fresh
    model of a family whose initial weights come from the data (whitened_vgg) gets them from the
    training images here; a resumed one has them in its checkpoint."""
    recipe, schedule = ts.recipe, ts.schedule
    with ts.strategy.scope():
        model = build_compiled(recipe, num_classes, schedule.for_optimizer(ts.run.epoch), ts.accumulation, schedule.total_steps)
        model.optimizer.build(model.trainable_variables)
    if ts.store is not None and ts.run.checkpoint:
        restore(model, ts.store.path(ts.run.checkpoint))
    elif (init := data_init(recipe.model)) is not None:
        init(model, ts.train_inputs.split.images, recipe.normalization)
    return model


def out_of_memory(exc: tf.errors.ResourceExhaustedError, ts: TrainState, epoch: int) -> CifarflowError:
    """The error to stop with; with adaptable steps, the next attempt's smaller micro-batch is committed first."""
    if not ts.steps.adapts_micro_batch:
        return CifarflowError(
            f"train@{ts.arch}: out of memory in epoch {epoch + 1} ({exc.message}); multi_worker does "
            "not adapt the micro-batch: use more workers, a smaller batch_size or variant, or "
            "precision: mixed_float16"
        )
    committed = ts.store.load() or RunState()  # the last completed epoch, not this half-done one
    floor = ts.params.runtime.oom_min_micro_batch
    ts.store.commit(adapt_to_oom(committed, ts.recipe, ts.arch, ts.micro, floor, epoch))
    return OutOfMemoryError(
        f"train@{ts.arch}: out of memory in epoch {epoch + 1} at micro-batch {ts.micro} "
        f"({exc.message}); the next attempt resumes with micro-batch {ts.micro // 2}"
    )


def checkpoint_folder(params: Params, arch: str, given: Path, mine: str) -> Path:
    """Where this run's checkpoints live: `given` (the stage's --checkpoints), or with
    runtime.checkpoint_store, `<store>/<arch>-<fingerprint>`, which any node of the same inputs finds
    (the fingerprint is what decides the weights, so another run's checkpoints never mix in)."""
    store = params.runtime.checkpoint_store
    return given if store is None else Path(store) / f"{arch}-{mine}"


def prepare(params: Params, arch: str, shards_dir: Path, runinfo: Path, checkpoints: Path, verdict: Path) -> TrainState:
    """The run's state before its first epoch: strategy and determinism, the resume state every
    process agrees on, the inputs, the schedule and the model it continues from."""
    recipe = params.recipe(arch)
    data = check_shards(shards_dir, verdict, params.data.format, ("train", "val"))  # before devices or shards: fail fast
    strategy = runtime.make_strategy(params.runtime)  # first: devices are fixed at TF's first op
    configure_determinism(params.seed, params.runtime.deterministic)
    per_replica = runtime.per_replica_batch(recipe.batch_size, strategy, f"train.{arch}.batch_size")
    if recipe.ema is not None and strategy.num_replicas_in_sync > 1 and params.runtime.distribution != "multi_worker":
        raise ConfigError(  # `auto` on a multi-GPU node: what the params check refuses for `mirrored`
            f"train.{arch}: lookahead (ema) does not run under MirroredStrategy in Keras 3.15, and this node has "
            f"{strategy.num_replicas_in_sync} devices: set runtime.distribution: none, or multi_worker"
        )
    mine = fingerprint(params, arch, data.root / MANIFEST)
    checkpoints = checkpoint_folder(params, arch, Path(checkpoints), mine)
    steps = make_steps(params, arch, strategy, per_replica, checkpoints, mine)
    store = ResumeStore(checkpoints, mine) if steps.writes else None  # other workers never touch the folder
    if store is not None:
        store.hold()
    run = steps.agree(store)
    micro = micro_batch(run, recipe, arch, steps, strategy)

    # Global batches (randomness and mixup pairs are decided per global batch); fit splits them
    # over its replicas, each multi_worker replica takes its rows.
    num_classes = len(data.classes)
    train_inputs = InputPipeline(load_checked(data, "train"), recipe, num_classes, params.seed, recipe.batch_size, micro)
    val_inputs = InputPipeline(load_checked(data, "val"), recipe, num_classes, params.seed, recipe.batch_size)
    if train_inputs.steps(training=True) == 0:
        raise InputError(
            f"train has {len(train_inputs)} examples, fewer than one batch of "
            f"train.{arch}.batch_size={recipe.batch_size} with drop_remainder"
        )
    schedule = LearningRate(recipe, run.schedule, train_inputs.steps(training=True) * (recipe.batch_size // micro))
    ts = TrainState(
        params=params,
        arch=arch,
        recipe=recipe,
        strategy=strategy,
        steps=steps,
        store=store,
        run=run,
        resumed_after=run.epoch if run.checkpoint else None,
        micro=micro,
        train_inputs=train_inputs,
        validation=val_inputs.evaluation(),
        schedule=schedule,
        model=None,  # built next, from the state above
        runinfo=Path(runinfo),
    )
    ts.model = build_model_state(ts, num_classes)
    return ts


def train(
    params: Params, arch: str, shards_dir: Path, out: Path, runinfo: Path, checkpoints: Path, verdict: Path
) -> dict[str, Any]:
    """Train `arch` on the shards, resuming from `checkpoints` if a run was cut short. Only shards the
    validate stage passed (its `verdict`) are read, and only if they are still the ones it checked.
    Under multi_worker every node runs this, each on its share of every global batch; only the chief writes."""
    ts = prepare(params, arch, shards_dir, runinfo, checkpoints, verdict)
    try:
        return train_prepared(ts, Path(out))
    finally:
        if ts.store is not None:
            ts.store.release()  # the checkpoint folder's writer lock (ResumeStore.hold)


def train_prepared(ts: TrainState, out: Path) -> dict[str, Any]:
    """The prepared run: its epochs, then its outputs (the writer) or the wait for them (another worker)."""
    params, arch = ts.params, ts.arch
    if ts.resumed_after is not None:
        log.info("train@%s: resuming after epoch %d of %d (micro-batch %d)", arch, ts.resumed_after, ts.recipe.epochs, ts.micro)
    devices = runtime.describe(ts.strategy, params.runtime) | {
        "loop": ts.steps.loop,
        "per_replica_batch": ts.train_inputs.batch_size // ts.strategy.num_replicas_in_sync,
        "micro_batch": ts.micro,
        "accumulation": ts.accumulation,
        "jit_compile": bool(ts.model.jit_compile),  # what the compiled model runs, not only what was asked
    }
    devices |= ts.steps.describe()
    log.info(
        "train@%s: %s", arch, runtime.in_words(ts.strategy, devices["workers"], devices["per_replica_batch"], ts.steps.writes)
    )
    ts.steps.start(ts.model, ts.validation.element_spec)
    run_epochs(ts)
    if ts.run.best_epoch is None:
        raise CifarflowError(f"train@{arch}: {ts.recipe.monitor} was NaN in every epoch; no model to keep")
    if ts.steps.writes:
        return finish(ts, out, devices)
    ts.steps.done()  # a worker exits 0 only once the chief has written
    return {"arch": arch, "best_epoch": ts.run.best_epoch, "resumed_after_epoch": ts.resumed_after}


@dataclass(frozen=True)
class Epoch:
    """What one finished epoch gives the loop: its index (from 0), the rate it ran at, its logs
    (val_* only when it was validated), the seconds of its training part and the images it saw."""

    number: int
    rate: float
    logs: dict[str, float]
    seconds: float
    images: int


def record_epoch(state: RunState, schedule: LearningRate, recipe: Recipe, done: Epoch) -> None:
    """Fold a finished epoch into the run state; its checkpoint (`state.checkpoint`) is saved next.
    Timings: the epoch's training seconds, and the wall seconds from this process's start to the
    end of the epoch and its validation, if it had one (time to accuracy; a resumed run counts from
    its own start)."""
    epoch, rate, logs, seconds, images = done.number + 1, done.rate, done.logs, done.seconds, done.images
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
    state.epoch = epoch  # epochs done: the next one's loop index


def run_epochs(ts: TrainState) -> None:
    """The epoch loop: each epoch starts from (weights, state) and its (seed, epoch) streams only,
    and ends committed (checkpoint, then state.json) by the writer."""
    recipe, model, steps = ts.recipe, ts.model, ts.steps
    summaries = Summaries(ts.runinfo / "tensorboard") if steps.writes else None
    seen = ts.train_inputs.steps(training=True) * recipe.batch_size
    for epoch in range(ts.run.epoch, recipe.epochs):
        rate = ts.schedule.rate(epoch)
        if not ts.schedule.per_step:  # a per-step schedule is the optimizer's own
            model.optimizer.learning_rate.assign(rate)
        reseed_layers(model, ts.params.seed, epoch)
        validates = (epoch + 1) % recipe.validate_every == 0 or epoch + 1 == recipe.epochs
        try:
            logs, seconds = steps.epoch(epoch, ts.train_inputs.train(epoch), ts.validation if validates else None)
        except tf.errors.ResourceExhaustedError as exc:
            raise out_of_memory(exc, ts, epoch) from None
        scored = f" val_loss {logs['val_loss']:.4f} val_accuracy {logs['val_accuracy']:.4f}" if validates else ""
        log.info(
            "train@%s: epoch %d/%d loss %.4f accuracy %.4f%s (%.1fs)",
            ts.arch,
            epoch + 1,
            recipe.epochs,
            logs["loss"],
            logs["accuracy"],
            scored,
            seconds,
        )
        check_finite(ts.arch, epoch, logs, recipe.monitor, model)
        record_epoch(ts.run, ts.schedule, recipe, Epoch(epoch, rate, logs, seconds, seen))
        if steps.writes:
            save_model_atomic(model, ts.store.path(ts.run.checkpoint))
            ts.store.commit(ts.run)
            summaries.write(epoch + 1, logs, rate)


def finish(ts: TrainState, out: Path, devices: dict) -> dict[str, Any]:
    """Write the outputs from the best checkpoint, then drop the resume state."""
    state, recipe, arch = ts.run, ts.recipe, ts.arch
    (out / f".{MODEL}.partial").unlink(missing_ok=True)  # a killed older version's temp (no PID in its name)
    with atomic_path(out / MODEL) as partial:
        shutil.copyfile(ts.store.path(state.best_checkpoint), partial)
    best = load_model(out / MODEL)
    digest = weights_digest(best)
    best_row = state.history[state.best_epoch - 1]
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
        # where the bits came from: compare-runs names what differs between two hosts' records
        "numerics": numerics.record(ts.params.runtime.portable),
    }
    write_bytes_atomic(out / WEIGHTS_DIGEST, f"{digest}\n".encode())
    write_bytes_atomic(out / HISTORY, history_csv(state.history).encode())
    write_json_atomic(out / SUMMARY, summary)
    write_json_atomic(out / METRICS, split_headline(summary, HEADLINE)[0])
    write_json_atomic(
        ts.runinfo / RUN_INFO, run_info(arch, state, ts.resumed_after, devices, ts.store.notes, summary["numerics"])
    )
    # Every worker waits here for the others (multi_worker); the resume state goes only after: a peer
    # lost in this barrier fails the run, and the restart must still find the last checkpoint.
    ts.steps.done()
    ts.store.clear()
    log.info(
        "train@%s: best epoch %d of %d (%s %.4f), weights %s",
        arch,
        state.best_epoch,
        recipe.epochs,
        recipe.monitor,
        state.best,
        digest[:12],
    )
    return summary | {"resumed_after_epoch": ts.resumed_after}
