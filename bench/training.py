"""Benchmarks for Training I, each a ratio against a baseline measured in the same run.

    python bench/training.py [--shards DIR] [--only inputs,stall,overhead,archs]

1. Input pipeline: resnet56 augmentation (pad-4 crop, flip, per-image standardization) over the
   train split, img/s, against (a) a vectorised numpy version of the same ops and (b) seed 002's
   pipeline as written there (per-image map, shuffle(50000), batch). Target >= 1.0x numpy, >= 3x seed.
2. Input stall: step time fed by the pipeline / step time fed from batches already in memory,
   for simple_cnn, lenet and resnet56. Target <= 1.05.
3. Trainer overhead: the trainer's epoch (pipeline, reseeding, schedule, checkpoint, TensorBoard)
   / a bare `model.fit` of the same model on the same in-memory data, both with per-epoch
   validation. Target <= 1.05.
4. Train img/s of each architecture on this machine, with XLA off and on (op determinism on).

Without --shards it builds shards from a generated 50k-image archive (or uses the real data when
CIFARFLOW_REAL_DATA / ../shared/data is there).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from cifarflow.data import download, preprocess, validate  # noqa: E402
from cifarflow.data.inputs import InputPipeline, load_split  # noqa: E402
from cifarflow.normalization import normalize  # noqa: E402
from cifarflow.settings import Params, resolve  # noqa: E402
from cifarflow.training.trainer import build_compiled, train  # noqa: E402

COMMITTED = ROOT / "params.yaml"


def committed_params(**data: object) -> Params:
    import yaml

    raw = yaml.safe_load(COMMITTED.read_text())
    raw["profile"] = "full"
    raw.pop("profiles", None)  # only the full profile runs here; the smoke overlay would not fit a real archive
    raw["data"].update(data)
    return resolve(raw)


def make_shards(workdir: Path) -> Path:
    shared = Path(os.environ.get("CIFARFLOW_REAL_DATA", ROOT.parent / "shared" / "data"))
    archive = workdir / "cifar.tar.gz"
    if (shared / "make_cifar10_binary.py").is_file():
        subprocess.run([sys.executable, str(shared / "make_cifar10_binary.py"), str(archive)], check=True, capture_output=True)
        source = {"source": str(archive), "sha256": download.digests(archive)["sha256"], "md5": None}
    else:
        source = {"source": "synth:train=50000,test=10000,seed=0", "md5": None}
    params = committed_params(**source)
    download.run(params, workdir / "raw", workdir / "cache")
    preprocess.run(params, workdir / "raw", workdir / "shards")
    return workdir / "shards"


def rate(n: int, seconds: float) -> str:
    return f"{n / seconds:>10,.0f} img/s"


def numpy_crop_flip_standardize(images: np.ndarray, rng: np.random.Generator, batch: int) -> None:
    """The same ops, vectorised in numpy: per-image offsets via fancy indexing on a padded batch."""
    steps = np.arange(32)
    for start in range(0, len(images) - batch + 1, batch):
        x = np.pad(images[start : start + batch], ((0, 0), (4, 4), (4, 4), (0, 0)))
        dy, dx = rng.integers(0, 9, (2, batch))
        flip = rng.random(batch) < 0.5
        rows = dy[:, None] + steps
        cols = dx[:, None] + np.where(flip[:, None], 31 - steps, steps)
        x = x[np.arange(batch)[:, None, None], rows[:, :, None], cols[:, None, :]].astype(np.float32)
        mean = x.mean(axis=(1, 2, 3), keepdims=True)
        std = np.maximum(x.std(axis=(1, 2, 3), keepdims=True), 1 / np.sqrt(3072))
        (x - mean) / std


def seed_002_pipeline(images: np.ndarray, labels: np.ndarray) -> tf.data.Dataset:
    """Seed 002 exactly: map(augmentation).map(normalize).shuffle(50000).batch(128, drop_remainder)."""

    def augmentation(x, y):
        x = tf.image.resize_with_crop_or_pad(x, 32 + 8, 32 + 8)
        x = tf.image.random_crop(x, [32, 32, 3])
        x = tf.image.random_flip_left_right(x)
        return x, y

    def normalize_(x, y):
        return tf.image.per_image_standardization(x), y

    ds = tf.data.Dataset.from_tensor_slices((images, labels))
    return ds.map(augmentation).map(normalize_).shuffle(50000).batch(128, drop_remainder=True)


def bench_inputs(shards: Path, params: Params) -> None:
    recipe = params.train["resnet56"]
    split = load_split(shards, "train", "parquet")
    n = len(split)
    pipe = InputPipeline(split, recipe, 10, params.seed, recipe.batch_size)
    for _ in pipe.train(0).take(3):
        pass  # trace once
    started = time.perf_counter()
    for _ in pipe.train(1):
        pass
    ours = time.perf_counter() - started
    started = time.perf_counter()
    numpy_crop_flip_standardize(split.images, np.random.default_rng(0), recipe.batch_size)
    numpy_s = time.perf_counter() - started
    seed_ds = seed_002_pipeline(split.images, split.labels)
    started = time.perf_counter()
    for _ in seed_ds:
        pass
    seed_s = time.perf_counter() - started
    print("\n1. input pipeline, resnet56 augmentation, train split")
    print(f"  cifarflow (batch-vectorised tf.data) {rate(n, ours)}")
    print(f"  numpy, vectorised                    {rate(n, numpy_s)}   ratio {numpy_s / ours:.2f}x  (target >= 1.0)")
    print(f"  seed 002 pipeline as written         {rate(n, seed_s)}   ratio {seed_s / ours:.2f}x  (target >= 3)")


def time_fit(model: keras.Model, dataset: tf.data.Dataset, steps: int) -> float:
    model.fit(dataset.take(3), verbose=0)  # build and trace outside the timing
    started = time.perf_counter()
    model.fit(dataset.take(steps), verbose=0)
    return (time.perf_counter() - started) / steps


def bench_stall(shards: Path, params: Params, steps: int) -> None:
    print("\n2. input stall: step time fed by the pipeline / fed from batches already in memory")
    split = load_split(shards, "train", "parquet")
    for arch in ("simple_cnn", "lenet", "resnet56"):
        recipe = params.train[arch]
        pipe = InputPipeline(split, recipe, 10, params.seed, recipe.batch_size)
        cached = [batch for batch in pipe.train(0).take(steps)]
        in_memory = tf.data.Dataset.from_tensor_slices((tf.stack([x for x, _ in cached]), tf.stack([y for _, y in cached])))
        keras.utils.set_random_seed(0)
        model = build_compiled(recipe, 10, 1e-3)
        # Alternate the two and keep each one's best: whichever ran first used to come out ~2x
        # slower (one-time costs after the warm-up), which made the ratio meaningless.
        memory, fed = [], []
        for _ in range(3):
            memory.append(time_fit(model, in_memory, steps))
            fed.append(time_fit(model, pipe.train(1), steps))
        memory_step, fed_step = min(memory), min(fed)
        print(
            f"  {arch:<11} pipeline {fed_step * 1000:7.1f} ms/step, in memory {memory_step * 1000:7.1f} ms/step"
            f"   ratio {fed_step / memory_step:.3f}  (target <= 1.05)"
        )


def bench_overhead(shards: Path, params: Params, workdir: Path) -> None:
    """One epoch of simple_cnn on the train split: the whole trainer against a bare fit."""
    arch = "simple_cnn"
    raw = params.model_dump()
    raw["train"][arch]["epochs"] = 1
    one_epoch = Params.model_validate(raw)
    recipe = one_epoch.train[arch]
    verdict = workdir / "validation" / "verdict.json"  # train() reads only validated shards: validate first, untimed
    validate.run(one_epoch, shards, verdict.parent / "metrics.json", verdict.parent / "report.md", verdict)
    started = time.perf_counter()
    train(one_epoch, arch, shards, workdir / "out", workdir / "run", workdir / "checkpoints", verdict)
    ours = time.perf_counter() - started

    x, v = load_split(shards, "train", "parquet"), load_split(shards, "val", "parquet")
    xs, ys = normalize(x.images, recipe.normalization).numpy(), keras.utils.to_categorical(x.labels, 10)
    vs, vy = normalize(v.images, recipe.normalization).numpy(), keras.utils.to_categorical(v.labels, 10)
    started = time.perf_counter()
    keras.utils.set_random_seed(0)
    model = build_compiled(recipe, 10, recipe.optimizer.learning_rate)
    model.fit(xs, ys, batch_size=recipe.batch_size, epochs=1, validation_data=(vs, vy), verbose=0, shuffle=True)
    model.save(workdir / "bare.keras")
    bare = time.perf_counter() - started
    print(f"\n3. trainer overhead, {arch}, 1 epoch of {len(x)} images with validation on {len(v)}")
    print(f"  cifarflow train {ours:6.1f} s  (reads the shards, builds, trains, checkpoints, digests)")
    print(f"  bare model.fit  {bare:6.1f} s  (normalised float arrays already in memory; builds, trains, saves)")
    print(f"  ratio {ours / bare:.3f}  (target <= 1.05)")


def bench_archs(shards: Path, params: Params, steps: int) -> None:
    """img/s of every recipe with XLA off and on, op determinism on in both (as training runs). The
    recipe's own `jit_compile` is overridden here (config refuses it for the families whose step
    cannot compile deterministically): such a step fails at its first run, which is reported."""
    print("\n4. train img/s per architecture, op determinism on (recipe batch sizes and widths, full variants)")
    tf.config.experimental.enable_op_determinism()
    split = load_split(shards, "train", "parquet")
    for arch, recipe in params.train.items():
        pipe = InputPipeline(split, recipe, 10, params.seed, recipe.batch_size)
        cells = []
        for xla in (False, True):
            keras.utils.set_random_seed(0)
            model = build_compiled(recipe.model_copy(update={"jit_compile": xla}), 10, 1e-3)
            try:
                cells.append(rate(recipe.batch_size, time_fit(model, pipe.train(0), steps)))
            except tf.errors.OpError as exc:  # the line naming the op without a deterministic kernel
                lines = exc.message.splitlines()
                reason = next((line for line in lines if "determinis" in line), lines[0])
                cells.append(f"fails ({reason.strip()[:90]})")
        chosen = "XLA" if recipe.jit_compile else "no XLA"
        print(f"  {arch:<12} batch {recipe.batch_size:>4}  XLA off {cells[0]}  XLA on {cells[1]}  (recipe: {chosen})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=Path, help="preprocess output to read (default: build one)")
    parser.add_argument("--only", default="inputs,stall,overhead,archs")
    parser.add_argument("--steps", type=int, default=60, help="timed steps per stall/arch measurement")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="cifarflow-bench-train-"))
    try:
        shards = args.shards or make_shards(workdir)
        params = committed_params()
        keras.utils.set_random_seed(params.seed)
        parts = args.only.split(",")
        print(f"shards: {shards}; TensorFlow {tf.__version__}, Keras {keras.__version__}, {os.cpu_count()} CPUs")
        if "inputs" in parts:
            bench_inputs(shards, params)
        if "stall" in parts:
            bench_stall(shards, params, args.steps)
        if "overhead" in parts:
            bench_overhead(shards, params, workdir)
        if "archs" in parts:
            bench_archs(shards, params, args.steps)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
