"""`runtime.distribution: multi_worker`: one process per node under MultiWorkerMirroredStrategy,
trained by a custom loop (`strategy.run`), because Keras 3.15's `fit` fails under this strategy
(keras-team/keras#20585: in build and in metric reduction).

Everything that decides the weights is the fit path's: the model and optimizer of
`build_compiled`, the schedule, the per-epoch reseed, and the global batches of `InputPipeline`.
Every worker builds the same global batch (order, crops, flips and mixup pairs are decided per
global batch) and replica r trains on rows [r·b, (r+1)·b) of it, b = batch_size / replicas; a
short last batch leaves the last replicas fewer rows, or none. Each replica's loss is its sum
of per-example losses over the global batch's size, so the all-reduced (summed) gradient is the
gradient of the global batch's mean loss: the same step a single device takes, up to the order
of float additions.

Only the chief (the `chief` task, else worker 0) touches the filesystem: checkpoints, state.json,
outputs, run info, TensorBoard logs, fault markers. Other workers write nothing: at start the
chief sends them its resume state and every variable (so only the chief needs the checkpoint
folder), and a worker whose params, data or code give another fingerprint makes all of them
stop. Checkpoints have the fit path's format (`epoch-<e>.keras` + `state.json`).

When one process dies, the others fail on their next collective (connection reset by peer,
seconds later here; a vanished host is noticed by TensorFlow's coordination-service heartbeat)
and the whole job is restarted, which resumes from the chief's last checkpoint. A process that
never joins leaves the others waiting at start without limit: whoever launches the job must
enforce a timeout. Fault injection (CIFARFLOW_FAULT_*_AT) fires on the chief only, where its
marker lives.

Op determinism (`runtime.deterministic`) works with the CPU collectives (checked here with
TF 2.21): the workers hold bit-identical weights after every step, a run repeats bit for bit,
and a resumed run ends bit-identical to an uninterrupted one. Against one process with the same
global batch the weights agree to ~1e-7 after an epoch, not bit for bit (another summation order).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from cifarflow.config import Params
from cifarflow.data.inputs import InputPipeline, load_checked
from cifarflow.data.layout import MANIFEST
from cifarflow.data.verdict import CheckedShards
from cifarflow.errors import CifarflowError, ConfigError, InputError
from cifarflow.training import runtime
from cifarflow.training.faults import FaultInjector
from cifarflow.training.resume import ResumeStore, RunState, fingerprint
from cifarflow.training.schedule import LearningRate
from cifarflow.training.trainer import (
    build_compiled,
    check_finite,
    configure_determinism,
    finish,
    record_epoch,
    reseed_layers,
    restore,
    save_model_atomic,
)

log = logging.getLogger(__name__)
SUM = tf.distribute.ReduceOp.SUM


# --- collectives outside the training step --------------------------------------------------------


class Collectives:
    """All-reduces, broadcasts from the chief and a barrier, for use between training steps. Every
    worker must make the same calls in the same order (each is a collective)."""

    def __init__(self, strategy: tf.distribute.Strategy, chief: bool) -> None:
        self.strategy, self.chief = strategy, chief
        # One trace each for any shape: (1,) lengths and flags, (n,) payloads.
        self._sum = tf.function(lambda v: self._run(v, False), reduce_retracing=True)
        self._from_chief = tf.function(lambda v: self._run(v, True), reduce_retracing=True)

    def _run(self, value: tf.Tensor, chief_only: bool) -> Any:
        def replica(v: tf.Tensor) -> tf.Tensor:
            context = tf.distribute.get_replica_context()
            # Global replica 0 is the chief's first (MWMS numbers the chief's replicas first). Always a new op
            # on the replica's device: an all-reduce of an int32 input as is fails ("destinations can not be
            # empty"), TensorFlow keeps those in host memory.
            keep = tf.equal(context.replica_id_in_sync_group, 0) if chief_only else tf.constant(True)
            return context.all_reduce(SUM, tf.where(keep, v, tf.zeros_like(v)))

        return self.strategy.run(replica, args=(value,))

    def _local(self, result: Any) -> np.ndarray:
        return self.strategy.experimental_local_results(result)[0].numpy()

    def sum(self, value: np.ndarray) -> np.ndarray:
        """The sum of `value` over all replicas, on every worker."""
        return self._local(self._sum(tf.constant(value)))

    def from_chief(self, value: np.ndarray) -> np.ndarray:
        """The chief's `value` (integers) on every worker, exactly: the others add zeros."""
        return self._local(self._from_chief(tf.constant(value)))

    def broadcast_bytes(self, data: bytes) -> bytes:
        """The chief's `data` on every worker (others pass anything): its length, then its bytes as int32 words."""
        size = int(self.from_chief(np.array([len(data) if self.chief else 0], np.int64))[0])
        words = -(-size // 4)
        mine = np.frombuffer(data.ljust(words * 4, b"\0"), np.int32) if self.chief else np.zeros(words, np.int32)
        return self.from_chief(mine).tobytes()[:size]

    def broadcast_variables(self, variables: list[Any]) -> None:
        """Give every worker the chief's values of `variables` (the same list, in the same order, everywhere),
        bit for bit: they travel as raw bytes, so no float addition touches them."""
        arrays = [np.array(v.numpy(), order="C") for v in variables]  # np.array keeps 0-d shapes
        payload = self.broadcast_bytes(b"".join(a.tobytes() for a in arrays))
        offset = 0
        for variable, array in zip(variables, arrays, strict=True):
            variable.assign(np.frombuffer(payload, array.dtype, array.size, offset).reshape(array.shape))
            offset += array.nbytes

    def barrier(self) -> None:
        self.sum(np.zeros(1, np.int32))


def agree_on_state(collectives: Collectives, store: ResumeStore | None, mine: str, arch: str) -> RunState:
    """The chief's resume state (`store` is the chief's, None elsewhere) on every worker. All workers
    stop with a ConfigError if any of them runs with other params, data or code than the chief."""
    text = json.dumps({"fingerprint": mine, "state": asdict(store.load() or RunState())}) if store else ""
    theirs = json.loads(collectives.broadcast_bytes(text.encode()))
    differing = int(collectives.sum(np.array([int(theirs["fingerprint"] != mine)], np.int32))[0])
    if differing:
        raise ConfigError(
            f"train@{arch}: {differing} replica(s) run with other params, shards or code than the "
            f"chief (fingerprint of the chief {theirs['fingerprint']}, of this worker {mine}): "
            "params.yaml, data/shards and the cifarflow code must be the same on every node"
        )
    return RunState(**theirs["state"])


# --- the training step ----------------------------------------------------------------------------


class Steps:
    """tf.functions that run one global batch over all replicas and return its summed
    [loss, correct] over the global batch (all-reduced, so the same on every worker)."""

    def __init__(
        self, model: keras.Model, strategy: tf.distribute.Strategy, per_replica: int, spec: tuple[tf.TensorSpec, tf.TensorSpec]
    ) -> None:
        self.model, self.strategy, self.per_replica = model, strategy, per_replica
        self.per_example = keras.losses.CategoricalCrossentropy(reduction=None)  # the fit path's loss, unreduced
        # Any batch size: one trace serves full and short batches (tracing costs seconds under the strategy).
        signature = [tf.TensorSpec((None, *s.shape[1:]), s.dtype) for s in spec]
        self.train = tf.function(self._train, input_signature=signature)
        self.evaluate = tf.function(self._evaluate, input_signature=signature)

    def _mine(self, x: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """This replica's rows of the global batch x (n, 32, 32, 3), and n."""
        n = tf.shape(x)[0]
        start = tf.minimum(tf.cast(tf.distribute.get_replica_context().replica_id_in_sync_group, tf.int32) * self.per_replica, n)
        stop = tf.minimum(start + self.per_replica, n)
        return x[start:stop], y[start:stop], n

    def _sums(self, y: tf.Tensor, probs: tf.Tensor, losses: tf.Tensor, extra: tf.Tensor) -> tf.Tensor:
        """[sum of this replica's losses (+ regularization, per example as Keras reports it), correct]."""
        rows = tf.cast(tf.shape(y)[0], tf.float32)
        correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(y, -1), tf.argmax(probs, -1)), tf.float32))
        return tf.stack([tf.reduce_sum(tf.cast(losses, tf.float32)) + extra * rows, correct])

    def _extra(self) -> tf.Tensor:
        return tf.cast(tf.add_n(self.model.losses), tf.float32) if self.model.losses else tf.constant(0.0)

    def _train_replica(self, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        x, y, n = self._mine(x, y)
        replicas = tf.distribute.get_replica_context().num_replicas_in_sync
        with tf.GradientTape() as tape:
            probs = self.model(x, training=True)
            losses = self.per_example(y, probs)  # (rows,)
            extra = self._extra()  # regularization: every replica adds 1/replicas of it
            loss = tf.reduce_sum(losses) / tf.cast(n, losses.dtype) + tf.cast(extra, losses.dtype) / replicas
            scaled = self.model.optimizer.scale_loss(loss)  # loss scaling under mixed_float16, else as is
        variables = self.model.trainable_variables
        # Keras's TF optimizer all-reduces (sums) the gradients over the replicas in apply_gradients.
        self.model.optimizer.apply_gradients(zip(tape.gradient(scaled, variables), variables, strict=True))
        return self._sums(y, probs, losses, extra)

    def _evaluate_replica(self, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        x, y, _ = self._mine(x, y)
        probs = self.model(x, training=False)
        return self._sums(y, probs, self.per_example(y, probs), self._extra())

    def _train(self, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        return self.strategy.reduce(SUM, self.strategy.run(self._train_replica, args=(x, y)), axis=None)

    def _evaluate(self, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        return self.strategy.reduce(SUM, self.strategy.run(self._evaluate_replica, args=(x, y)), axis=None)


def run_epoch(step: Any, dataset: tf.data.Dataset, on_batch_end: Any = None) -> tuple[float, float]:
    """(mean loss, accuracy) over the dataset's examples; Keras's epoch logs are the same means."""
    loss = correct = count = 0.0
    for batch, (x, y) in enumerate(dataset):
        sums = step(x, y).numpy()
        loss, correct, count = loss + float(sums[0]), correct + float(sums[1]), count + int(x.shape[0])
        if on_batch_end is not None:
            on_batch_end(batch)
    return loss / count, correct / count


# --- the run --------------------------------------------------------------------------------------


class Summaries:
    """The chief's TensorBoard scalars per epoch, in the Keras callback's layout (train/, validation/)."""

    def __init__(self, root: Path) -> None:
        self.train = tf.summary.create_file_writer(str(root / "train"))
        self.validation = tf.summary.create_file_writer(str(root / "validation"))

    def write(self, epoch: int, logs: dict[str, float], rate: float) -> None:
        with self.train.as_default():
            for name in ("loss", "accuracy"):
                tf.summary.scalar(f"epoch_{name}", logs[name], step=epoch)
            tf.summary.scalar("epoch_learning_rate", rate, step=epoch)
        with self.validation.as_default():
            for name in ("loss", "accuracy"):
                tf.summary.scalar(f"epoch_{name}", logs[f"val_{name}"], step=epoch)
        self.train.flush()
        self.validation.flush()


def train(
    params: Params,
    arch: str,
    data: CheckedShards,
    out: Path,
    runinfo: Path,
    checkpoints: Path,
    strategy: tf.distribute.Strategy,
) -> dict[str, Any]:
    """Train `arch` on this worker's share of every global batch; the chief writes the fit path's files.
    `data` is what `verdict.check_shards` returned on this node (trainer.train calls it before the
    strategy starts); each split's count and labels are checked once loaded."""
    shards_dir, num_classes = data.root, len(data.classes)
    recipe = params.recipe(arch)
    configure_determinism(params.seed, params.runtime.deterministic)
    per_replica = runtime.per_replica_batch(recipe.batch_size, strategy, f"train.{arch}.batch_size")
    chief = runtime.is_chief(strategy)
    mine = fingerprint(params, arch, shards_dir / MANIFEST)
    store = ResumeStore(checkpoints, mine) if chief else None
    collectives = Collectives(strategy, chief)
    state = agree_on_state(collectives, store, mine, arch)
    resumed_from = state.epoch if state.checkpoint else None
    if state.micro_batch:
        raise CifarflowError(
            f"train@{arch}: the resume state asks for micro-batch {state.micro_batch} (an "
            "out-of-memory adaptation), which multi_worker does not do; delete the checkpoints"
        )

    schedule = LearningRate(recipe, state.schedule)
    with strategy.scope():  # every worker creates the same variables in the same order (MWMS syncs their creation)
        model = build_compiled(recipe, num_classes, schedule.rate(state.epoch))
        model.optimizer.build(model.trainable_variables)
    if chief and state.checkpoint:
        # Outside the scope: loading builds a throwaway model, whose variables must not be collective.
        restore(model, store.path(state.checkpoint))
        log.info("train@%s: resumed from epoch %d", arch, state.epoch)
    collectives.broadcast_variables([*model.variables, *model.optimizer.variables])

    train_inputs = InputPipeline(
        load_checked(data, "train"), recipe, num_classes, params.seed, recipe.batch_size
    )  # global batches: each replica takes its rows
    val_inputs = InputPipeline(load_checked(data, "val"), recipe, num_classes, params.seed, recipe.batch_size)
    if train_inputs.steps(training=True) == 0:
        raise InputError(
            f"train has {len(train_inputs)} examples, fewer than one batch of "
            f"train.{arch}.batch_size={recipe.batch_size} with drop_remainder"
        )
    workers = runtime.worker_count(strategy)
    devices = runtime.describe(strategy, params.runtime) | {
        "strategy": "MultiWorkerMirroredStrategy",  # type(strategy) is its alias CollectiveAllReduceStrategy
        "workers": workers,
        "per_replica_batch": per_replica,
        "loop": "custom (strategy.run)",
        "micro_batch": recipe.batch_size,
        "accumulation": 1,
    }
    log.info(
        "train@%s: task %s (%s), %d workers, %d replicas of %d examples",
        arch,
        runtime.task_name(strategy),
        "chief" if chief else "not chief: writes nothing",
        workers,
        strategy.num_replicas_in_sync,
        per_replica,
    )

    validation = val_inputs.evaluation()
    steps = Steps(model, strategy, per_replica, validation.element_spec)
    injector = FaultInjector(checkpoints) if chief else None  # its marker lives in the chief's checkpoints
    summaries = Summaries(Path(runinfo) / "tensorboard") if chief else None
    for epoch in range(state.epoch, recipe.epochs):
        rate = schedule.rate(epoch)
        model.optimizer.learning_rate.assign(rate)
        reseed_layers(model, params.seed, epoch)
        if injector is not None:
            injector.on_epoch_begin(epoch)
        started = time.perf_counter()
        try:
            loss, accuracy = run_epoch(
                steps.train, train_inputs.train(epoch), injector.on_train_batch_end if injector is not None else None
            )
        except tf.errors.ResourceExhaustedError as exc:
            raise CifarflowError(
                f"train@{arch}: out of memory in epoch {epoch} ({exc.message}); multi_worker does "
                "not adapt the micro-batch: use more workers, a smaller batch_size or variant, or "
                "precision: mixed_float16"
            ) from None
        seconds = time.perf_counter() - started
        val_loss, val_accuracy = run_epoch(steps.evaluate, validation)
        logs = {"loss": loss, "accuracy": accuracy, "val_loss": val_loss, "val_accuracy": val_accuracy}
        log.info(
            "train@%s: epoch %d/%d loss %.4f accuracy %.4f val_loss %.4f val_accuracy %.4f (%.1fs)",
            arch,
            epoch + 1,
            recipe.epochs,
            loss,
            accuracy,
            val_loss,
            val_accuracy,
            seconds,
        )
        check_finite(arch, epoch, logs, recipe.monitor)
        record_epoch(state, schedule, recipe, epoch, rate, logs, seconds, train_inputs.steps(training=True) * recipe.batch_size)
        if chief:
            save_model_atomic(model, store.path(state.checkpoint))
            store.commit(state)
            summaries.write(epoch, logs, rate)
    if state.best_epoch is None:
        raise CifarflowError(f"train@{arch}: {recipe.monitor} was NaN in every epoch; no model to keep")
    summary = (
        finish(arch, recipe, state, store, Path(out), Path(runinfo), resumed_from, devices)
        if chief
        else {"arch": arch, "best_epoch": state.best_epoch, "resumed_from_epoch": resumed_from}
    )
    collectives.barrier()  # a barrier: a worker exits 0 only once the chief has written
    return summary
