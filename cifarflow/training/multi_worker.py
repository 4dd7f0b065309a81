"""`runtime.distribution: multi_worker`: the per-step work of the training loop (`trainer.train`)
for one process per node under MultiWorkerMirroredStrategy: `strategy.run` steps instead of
Keras `fit`, because Keras 3.15's `fit` fails under this strategy (keras-team/keras#20585: in
build and in metric reduction). The loop itself (resume, schedule, reseed, checkpoints,
out-of-memory handling, outputs) is the one every strategy runs; this module only supplies the
steps and the collectives, and never imports the loop.

What it shares with the `fit` path: the model and optimizer of `build_compiled` (loss, label
smoothing, L2 penalties; not lookahead, whose EMA Keras 3.15 cannot run under this strategy, so
params refuse it here), the schedule, the per-epoch reseed, and the global batches of
`InputPipeline`. What it does not share is the step itself: `ReplicaStep` is its own code, written
to take the update fit takes (tests/test_multi_worker.py compares the two). Every worker builds
the same global batch (order, crops, flips and mixup pairs are decided per global batch) and
replica r trains on rows [r·b, (r+1)·b) of it, b = batch_size / replicas; a short last batch
leaves the last replicas fewer rows, or none. Each replica's loss is
its sum of per-example losses over the global batch's size, so the all-reduced (summed) gradient
is the gradient of the global batch's mean loss: the same step a single device takes, up to the
order of float additions.

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
marker lives. There is no out-of-memory adaptation (it needs gradient accumulation, which Keras
3.15 does not do under a multi-device strategy): out of memory stops the run with advice.

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
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from cifarflow.errors import ConfigError
from cifarflow.training import runtime
from cifarflow.training.faults import FaultInjector
from cifarflow.training.resume import ResumeStore, RunState

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


class ReplicaStep:
    """The training and evaluation step as tf.functions: one global batch over all replicas, returning
    its summed [loss, correct] over the global batch (all-reduced, so the same on every worker)."""

    def __init__(
        self, model: keras.Model, strategy: tf.distribute.Strategy, per_replica: int, spec: tuple[tf.TensorSpec, tf.TensorSpec]
    ) -> None:
        self.model, self.strategy, self.per_replica = model, strategy, per_replica
        # the fit path's loss (the compiled one, label smoothing included), unreduced
        self.per_example = keras.losses.CategoricalCrossentropy(reduction=None, label_smoothing=model.loss.label_smoothing)
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
        variables = self.model.trainable_variables

        def compute() -> list[tf.Tensor]:
            with tf.GradientTape() as tape:
                probs = self.model(x, training=True)
                losses = self.per_example(y, probs)  # (rows,)
                extra = self._extra()  # regularization: every replica adds 1/replicas of it
                loss = tf.reduce_sum(losses) / tf.cast(n, losses.dtype) + tf.cast(extra, losses.dtype) / replicas
                scaled = self.model.optimizer.scale_loss(loss)  # loss scaling under mixed_float16, else as is
            return [*tape.gradient(scaled, variables), self._sums(y, probs, losses, extra)]

        def nothing() -> list[tf.Tensor]:
            return [*(tf.zeros_like(v) for v in variables), tf.zeros(2)]

        # A replica with no rows of a short last batch contributes zeros without running the model:
        # oneDNN's convolution fails on an empty batch on some CPUs (AVX-512), the plain kernel does not.
        *gradients, sums = tf.cond(tf.shape(x)[0] > 0, compute, nothing)
        # Keras's TF optimizer all-reduces (sums) the gradients over the replicas in apply_gradients.
        self.model.optimizer.apply_gradients(zip(gradients, variables, strict=True))
        return sums

    def _evaluate_replica(self, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        x, y, _ = self._mine(x, y)

        def compute() -> tf.Tensor:
            probs = self.model(x, training=False)
            return self._sums(y, probs, self.per_example(y, probs), self._extra())

        return tf.cond(tf.shape(x)[0] > 0, compute, lambda: tf.zeros(2))

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


# --- the per-epoch work the loop calls -----------------------------------------------------------


class StrategySteps:
    """One epoch of `strategy.run` steps over global batches, for `trainer.train`'s loop. Every worker
    runs the loop; only the chief writes (the loop asks `writes`)."""

    loop = "custom (strategy.run)"
    adapts_micro_batch = False  # gradient accumulation does not work under a multi-device strategy

    def __init__(
        self, strategy: tf.distribute.Strategy, per_replica: int, injector: FaultInjector | None, arch: str, fingerprint: str
    ) -> None:
        self.strategy, self.per_replica, self.arch, self.fingerprint = strategy, per_replica, arch, fingerprint
        self.writes = runtime.is_chief(strategy)
        self.injector = injector if self.writes else None  # its marker lives in the chief's checkpoints
        self.collectives = Collectives(strategy, self.writes)
        self.step: ReplicaStep | None = None

    def agree(self, store: ResumeStore | None) -> RunState:
        """The chief's resume state on every worker (`store` is None except on the chief)."""
        return agree_on_state(self.collectives, store if self.writes else None, self.fingerprint, self.arch)

    def start(self, model: keras.Model, spec: tuple[tf.TensorSpec, tf.TensorSpec]) -> None:
        """Once the chief's model holds the state the run starts from: every worker gets it, bit for bit."""
        self.collectives.broadcast_variables([*model.variables, *model.optimizer.variables])
        self.step = ReplicaStep(model, self.strategy, self.per_replica, spec)
        if self.injector is not None:
            self.injector.set_model(model)  # the NaN fault writes into the weights

    def describe(self) -> dict[str, Any]:
        # type(strategy) is its alias CollectiveAllReduceStrategy: name it as the user configured it
        return {"strategy": "MultiWorkerMirroredStrategy", "workers": runtime.worker_count(self.strategy)}

    def epoch(self, epoch: int, train: tf.data.Dataset, validation: tf.data.Dataset | None) -> tuple[dict[str, float], float]:
        """(the epoch's logs as Keras names them, without val_* when `validation` is None; seconds of its training part)."""
        if self.injector is not None:
            self.injector.on_epoch_begin(epoch)
        started = time.perf_counter()
        loss, accuracy = run_epoch(self.step.train, train, self.injector.on_train_batch_end if self.injector else None)
        model = self.step.model
        model.optimizer.finalize_variable_values(model.trainable_variables)  # as fit ends (a no-op without an EMA)
        seconds = time.perf_counter() - started
        logs = {"loss": loss, "accuracy": accuracy}
        if validation is not None:
            val_loss, val_accuracy = run_epoch(self.step.evaluate, validation)
            logs |= {"val_loss": val_loss, "val_accuracy": val_accuracy}
        return logs, seconds

    def done(self) -> None:
        """A barrier: a worker exits 0 only once the chief has written."""
        self.collectives.barrier()
