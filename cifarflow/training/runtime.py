"""How a training runs, not what it computes: distribution strategy, precision, XLA, devices.

The recipe's batch_size is the global batch; each replica gets batch_size / replicas, so the
same params mean the same optimisation on a CPU, one GPU or eight.
"""

from __future__ import annotations

import logging

import keras
import tensorflow as tf

from cifarflow.config import RuntimeParams
from cifarflow.errors import ConfigError

log = logging.getLogger(__name__)


def split_cpu(count: int) -> None:
    """Expose `count` logical CPU devices (how MirroredStrategy is exercised without GPUs).
    Must run before TensorFlow initialises its devices."""
    cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * count)


def make_strategy(runtime: RuntimeParams) -> tf.distribute.Strategy:
    if runtime.logical_cpus:
        split_cpu(runtime.logical_cpus)
    if runtime.precision != "float32":
        keras.mixed_precision.set_global_policy(runtime.precision)
    gpus = tf.config.list_logical_devices("GPU")
    if runtime.distribution == "none" or (runtime.distribution == "auto" and len(gpus) < 2):
        return tf.distribute.get_strategy()  # the default: one device
    devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
    log.info("MirroredStrategy over %s", devices)
    return tf.distribute.MirroredStrategy(devices=devices)


def per_replica_batch(batch_size: int, strategy: tf.distribute.Strategy, key: str) -> int:
    replicas = strategy.num_replicas_in_sync
    if batch_size % replicas:
        raise ConfigError(f"{key}={batch_size} does not divide over {replicas} replicas; "
                          f"use a multiple of {replicas} (it is the global batch)")
    return batch_size // replicas


def describe(strategy: tf.distribute.Strategy, runtime: RuntimeParams) -> dict:
    return {"strategy": type(strategy).__name__, "replicas": strategy.num_replicas_in_sync,
            "precision": runtime.precision, "jit_compile": runtime.jit_compile}
