"""Fault injection, for tests only: kill or fail a training at a chosen epoch and step, once.

    CIFARFLOW_FAULT_KILL_AT=<epoch>:<step>   SIGKILL the process after that train step
    CIFARFLOW_FAULT_OOM_AT=<epoch>:<step>    raise ResourceExhaustedError there (out of memory)
    CIFARFLOW_FAULT_FAIL_AT=<epoch>:<step>   raise a plain runtime error there
    CIFARFLOW_FAULT_NAN_AT=<epoch>:<step>    set the weights to NaN there (a diverged run)

Epochs and steps are the loop's indexes, from 0 (epoch 0 is the log's epoch 1). Each fault fires
once: a marker file in the run's checkpoint folder records that it fired, so the retry runs
through. Never set these in production.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf

FAULTS = {
    "kill": "CIFARFLOW_FAULT_KILL_AT",
    "oom": "CIFARFLOW_FAULT_OOM_AT",
    "fail": "CIFARFLOW_FAULT_FAIL_AT",
    "nan": "CIFARFLOW_FAULT_NAN_AT",
}


def _parse(name: str, value: str) -> tuple[int, int]:
    epoch, sep, step = value.partition(":")
    if not sep or not epoch.strip().isdigit() or not step.strip().isdigit():
        raise ValueError(f"{name}={value!r}: expected <epoch>:<step>, e.g. 1:3")
    return int(epoch), int(step)


def armed() -> dict[str, tuple[int, int]]:
    return {kind: _parse(env, os.environ[env]) for kind, env in FAULTS.items() if os.environ.get(env)}


class FaultInjector(keras.callbacks.Callback):
    """Fires the armed faults at their (epoch, step), each once per marker folder."""

    def __init__(self, marker_dir: Path) -> None:
        super().__init__()
        self.marker_dir, self.faults, self.epoch = Path(marker_dir), armed(), 0

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self.epoch = epoch

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        for kind, at in self.faults.items():
            marker = self.marker_dir / f"{kind}.fired"
            if at != (self.epoch, batch) or marker.exists():
                continue
            self.marker_dir.mkdir(parents=True, exist_ok=True)
            marker.write_text(f"{self.epoch}:{batch}\n")
            if kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if kind == "nan":
                for weight in self.model.trainable_weights:
                    weight.assign(tf.fill(weight.shape, float("nan")))
                continue
            if kind == "oom":
                raise tf.errors.ResourceExhaustedError(None, None, f"injected OOM at epoch {self.epoch} step {batch}")
            raise RuntimeError(f"injected runtime failure at epoch {self.epoch} step {batch}")
