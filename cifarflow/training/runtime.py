"""How a training runs, not what it computes: distribution strategy, precision, devices.

The recipe's batch_size is the global batch; each replica gets batch_size / replicas, and the
learning rate follows the recipe for that global batch. For models without BatchNorm or dropout
that is the same optimisation on one device or eight, up to the order of float additions; with
them it is not: BatchNorm statistics and dropout masks are per replica (not synchronised), so
those models train equally well but not along the same path.

XLA is the recipe's choice (`train.<arch>.jit_compile`), not the runtime's: it is kept under op
determinism for the model families whose every op has a deterministic XLA kernel (see
`trainer.build_compiled`), and the run info records what the compiled model actually uses.

`distribution: multi_worker` runs one process per node, each told the cluster and its own
place in it by the TF_CONFIG environment variable; the chief (the `chief` task, or worker 0
when there is none) is the one process that writes files.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import keras
import tensorflow as tf

from cifarflow.errors import ConfigError
from cifarflow.settings import RuntimeParams

log = logging.getLogger(__name__)


def split_cpu(count: int) -> None:
    """Expose `count` logical CPU devices (how MirroredStrategy is exercised without GPUs).
    Must run before TensorFlow initialises its devices."""
    cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * count)


TF_CONFIG = "TF_CONFIG"
TF_CONFIG_EXAMPLE = '{"cluster": {"worker": ["node0:12345", "node1:12345"]}, "task": {"type": "worker", "index": 0}}'
ROLES = ("chief", "worker")


def cluster_config(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """The TF_CONFIG of this process, checked: MultiWorkerMirroredStrategy would otherwise fall
    back to a silent single-worker run (no TF_CONFIG) or fail deep inside gRPC."""
    text = (os.environ if environ is None else environ).get(TF_CONFIG, "")
    need = (
        f"runtime.distribution: multi_worker needs the environment variable {TF_CONFIG} on every node, "
        f"naming the cluster and this process's task, e.g. {TF_CONFIG}='{TF_CONFIG_EXAMPLE}'"
    )
    if not text.strip():
        raise ConfigError(f"{need}; it is not set")
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{need}; it is not valid JSON ({exc})") from None
    cluster, task = (config.get("cluster"), config.get("task")) if isinstance(config, dict) else (None, None)
    if not isinstance(cluster, dict) or not isinstance(task, dict):
        raise ConfigError(f'{need}; it has no "cluster" or "task" object: {text}')
    if set(cluster) - set(ROLES) or (not cluster.get("worker") and not cluster.get("chief")):
        raise ConfigError(
            f'{need}; its cluster must list "worker" (and at most one "chief") addresses, got jobs {sorted(cluster)}'
        )
    if any(not isinstance(v, list) or not all(isinstance(a, str) and ":" in a for a in v) for v in cluster.values()):
        raise ConfigError(f'{need}; every job must be a list of "host:port" strings, got {cluster}')
    if len(cluster.get("chief", [])) > 1:
        raise ConfigError(f"{need}; a cluster has at most one chief, got {cluster['chief']}")
    kind, index = task.get("type"), task.get("index")
    if kind not in cluster or not isinstance(index, int) or not 0 <= index < len(cluster[kind]):
        raise ConfigError(
            f"{need}; its task {task} is not in the cluster {cluster} "
            "(type must be one of its jobs, index an integer position in that job's list)"
        )
    return config


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes the run's files: the chief task, else worker 0, else (one
    process, no cluster) yes."""
    resolver = getattr(strategy, "cluster_resolver", None)
    cluster = resolver.cluster_spec().as_dict() if resolver is not None else {}
    if not cluster:
        return True
    return resolver.task_type == "chief" or (resolver.task_type == "worker" and resolver.task_id == 0 and "chief" not in cluster)


def task_name(strategy: tf.distribute.Strategy) -> str:
    resolver = getattr(strategy, "cluster_resolver", None)
    return f"{resolver.task_type}:{resolver.task_id}" if resolver is not None and resolver.task_type else "local"


def worker_count(strategy: tf.distribute.Strategy) -> int:
    resolver = getattr(strategy, "cluster_resolver", None)
    cluster = resolver.cluster_spec().as_dict() if resolver is not None else {}
    return sum(len(tasks) for tasks in cluster.values()) or 1


def multi_worker_strategy(runtime: RuntimeParams) -> tf.distribute.MultiWorkerMirroredStrategy:
    """MultiWorkerMirroredStrategy from TF_CONFIG. Must be the first TensorFlow call of the process:
    it starts this task's gRPC server, and its first collective waits (without limit) for all peers,
    so bad settings are refused before it starts."""
    config = cluster_config()
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    if runtime.precision != "float32":
        keras.mixed_precision.set_global_policy(runtime.precision)
    log.info(
        "MultiWorkerMirroredStrategy: task %s of cluster %s, %d replicas",
        config["task"],
        config["cluster"],
        strategy.num_replicas_in_sync,
    )
    return strategy


def make_strategy(runtime: RuntimeParams) -> tf.distribute.Strategy:
    if runtime.distribution == "multi_worker":
        return multi_worker_strategy(runtime)  # before anything else touches the devices
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
        raise ConfigError(
            f"{key}={batch_size} does not divide over {replicas} replicas; use a multiple of {replicas} (it is the global batch)"
        )
    return batch_size // replicas


def replica_devices(strategy: tf.distribute.Strategy) -> list[str]:
    """This process's devices that hold a replica (the default strategy: its one device)."""
    try:
        return [str(d) for d in strategy.extended.worker_devices]
    except (RuntimeError, NotImplementedError):  # the default strategy has no device list
        return [tf.config.list_logical_devices()[0].name]


def strategy_name(strategy: tf.distribute.Strategy) -> str:
    """The strategy as the run info and the log name it: its class, or "one device" for TensorFlow's
    default (whose class, _DefaultDistributionStrategy, is private)."""
    name = type(strategy).__name__
    return "one device" if name == "_DefaultDistributionStrategy" else name


def in_words(strategy: tf.distribute.Strategy, workers: int, per_replica: int, writes: bool) -> str:
    """One log line's worth: what trains, on what, and whether this process writes the outputs."""
    replicas = strategy.num_replicas_in_sync
    line = f"{strategy_name(strategy)}, {replicas} replica(s) of {per_replica} examples"
    if workers > 1:
        role = "writes the outputs" if writes else "writes nothing (not the chief)"
        line += f", task {task_name(strategy)} of {workers} workers, {role}"
    return line


def describe(strategy: tf.distribute.Strategy, runtime: RuntimeParams) -> dict:
    """What runs, as the run info records it: the strategy in use, its replicas and devices."""
    return {
        "strategy": strategy_name(strategy),
        "replicas": strategy.num_replicas_in_sync,
        "devices": replica_devices(strategy),
        "precision": runtime.precision,
    }
