"""The tf.data input pipeline: shards -> normalized (and, for train, augmented) batches.

The split is held once in memory as uint8 (CIFAR-10 is 150 MB); batches are gathered from it.
Every random choice is a stateless function of (seed, epoch, batch): epoch k sees the same
order, crops, flips and mixup weights however the run got there (fresh, resumed, parallel).
Augmentation works on whole batches (one gather for crop + flip), not per image.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from cifarflow.data import shards
from cifarflow.data.cifar_binary import Split
from cifarflow.data.verdict import CheckedShards
from cifarflow.normalization import normalize
from cifarflow.pixels import HEIGHT, IMAGE_SHAPE
from cifarflow.settings import Recipe

# augmentation -> (padding, how it pads): seed 002 pads 4 black pixels, airbench 2 mirrored ones;
# both then crop back to 32x32 at a random place and flip about half the images horizontally
PADDING = {"crop_flip": (4, "CONSTANT"), "flip_translate": (2, "REFLECT")}
SIZE = HEIGHT  # square images: one size for rows and columns
# Independent streams: a new stream never shifts the numbers of an existing one.
STREAM_SHUFFLE, STREAM_AUGMENT, STREAM_MIXUP = 1, 2, 3
STREAM_FLIP = 4  # drawn once per run, not per epoch: seeded by (seed, stream)


def _lean_options() -> tf.data.Options:
    """tf.data's static graph rewrites off. They run each time an iterator is made (every epoch:
    Keras makes one per `fit` call) and serialise the dataset graph with the split it captures
    (150 MB for CIFAR-10's train): ~0.7 s per epoch here, which a short epoch shows as input stall.
    The pipeline is already what they would make it (parallel map, prefetch), and none of them
    changes a value, so the batches stay byte for byte the same."""
    options = tf.data.Options()
    options.experimental_optimization.apply_default_optimizations = False
    return options


LEAN = _lean_options()


def load_split(root: Path, split: str, fmt: str) -> Split:
    """One split's shards, read into uint8 arrays (the same arrays whichever the format)."""
    paths = shards.shard_paths(root, split, fmt)
    return shards.read_parquet(paths) if fmt == "parquet" else read_tfrecords(paths)


def load_checked(data: CheckedShards, split: str) -> Split:
    """One split of shards that passed `verdict.check_shards`, with its count and labels checked."""
    loaded = load_split(data.root, split, data.fmt)
    data.check_split(split, loaded.labels)
    return loaded


def read_tfrecords(paths: list[Path]) -> Split:
    """TFRecord shards -> Split, parsed in batches of 1024 records by tf.data."""
    features = shards.tfrecord_features()
    images, labels, index = [], [], []
    dataset = tf.data.TFRecordDataset([str(p) for p in paths]).batch(1024)
    for batch in dataset.map(lambda r: tf.io.parse_example(r, features)):
        images.append(tf.io.decode_raw(batch["image"], tf.uint8).numpy())
        labels.append(batch["label"].numpy().astype(np.uint8))
        index.append(batch["index"].numpy())
    if not images:
        return Split(np.empty((0, *IMAGE_SHAPE), np.uint8), np.empty(0, np.uint8), np.empty(0, np.int64))
    return Split(np.concatenate(images).reshape(-1, *IMAGE_SHAPE), np.concatenate(labels), np.concatenate(index))


def stream_seed(seed: int, epoch: int, stream: int) -> np.ndarray:
    """A stateless-op seed (2 int32s) for one random stream of one epoch."""
    return np.random.SeedSequence([seed, epoch, stream]).generate_state(2, np.uint32).astype(np.int64) % (2**31 - 1)


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The full-dataset shuffle of one epoch."""
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, STREAM_SHUFFLE])).permutation(n)


def alternating_flips(n: int, seed: int, epoch: int) -> np.ndarray:
    """airbench's alternating flip: each image gets a random flip once per run, and the opposite one
    in every odd epoch, so that any two consecutive epochs show it both ways."""
    first = np.random.default_rng(np.random.SeedSequence([seed, STREAM_FLIP])).random(n) < 0.5
    return first ^ bool(epoch % 2)


def crop_flip(
    images: tf.Tensor, seed: tf.Tensor, pad: int = 4, mode: str = "CONSTANT", flip: tf.Tensor | None = None
) -> tf.Tensor:
    """(B, 32, 32, C) -> the same after padding by `pad` (tf.pad's `mode`), a random 32x32 crop per
    image and a horizontal flip (`flip`, bool (B,), else random), all as one gather per axis."""
    batch = tf.shape(images)[0]
    offsets = tf.random.stateless_uniform([batch, 2], seed, minval=0, maxval=2 * pad + 1, dtype=tf.int32)
    if flip is None:
        flip = tf.random.stateless_uniform([batch], tf.random.experimental.stateless_fold_in(seed, 1)) < 0.5
    padded = tf.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]], mode=mode)
    steps = tf.range(SIZE)
    rows = offsets[:, :1] + steps  # (B, 32)
    cols = offsets[:, 1:] + tf.where(flip[:, None], SIZE - 1 - steps, steps)  # a flip reverses the columns
    out = tf.gather(padded, rows, axis=1, batch_dims=1)  # (B, 32, 32 + 2 pad, C)
    return tf.gather(out, cols, axis=2, batch_dims=1)  # (B, 32, 32, C)


def mixup(x: tf.Tensor, y: tf.Tensor, alpha: float, seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """FastEstimator's MixUpBatch + MixUpLoss: one lambda ~ Beta(alpha, alpha) per batch, each
    example mixed with its neighbour (roll by 1). Mixing the one-hot labels gives the mixed loss,
    since cross-entropy is linear in the labels."""
    g1 = tf.random.stateless_gamma([], seed, alpha=alpha)
    g2 = tf.random.stateless_gamma([], tf.random.experimental.stateless_fold_in(seed, 1), alpha=alpha)
    lam = g1 / (g1 + g2)
    return lam * x + (1 - lam) * tf.roll(x, 1, axis=0), lam * y + (1 - lam) * tf.roll(y, 1, axis=0)


def mixup_on(recipe: Recipe, epoch: int) -> bool:
    """Mixup is a training-only op, switched on from epoch `mixup.warmup` (0-based)."""
    return recipe.mixup is not None and epoch >= recipe.mixup.warmup


@dataclass
class InputPipeline:
    """Builds one epoch's datasets for a recipe. The split tensors are made once per run."""

    split: Split
    recipe: Recipe
    num_classes: int
    seed: int
    batch_size: int  # the global batch: randomness, mixup pairs and order are decided per global batch
    micro_batch: int | None = None  # train only: split each global batch for gradient accumulation

    def __post_init__(self) -> None:
        self.images = tf.constant(self.split.images)  # (N, 32, 32, 3) uint8: the one copy TF holds
        self.labels = tf.one_hot(tf.constant(self.split.labels, tf.int32), self.num_classes)

    def __len__(self) -> int:
        return len(self.split)

    def steps(self, training: bool) -> int:
        n, b = len(self.split), self.batch_size
        return n // b if training and self.recipe.drop_remainder else -(-n // b)

    def train(self, epoch: int) -> tf.data.Dataset:
        """Epoch `epoch`: shuffled, augmented (and mixed, after warm-up) batches of (x, y)."""
        order = tf.constant(epoch_order(len(self.split), self.seed, epoch))
        augment_seed = tf.constant(stream_seed(self.seed, epoch, STREAM_AUGMENT))
        mixup_seed = tf.constant(stream_seed(self.seed, epoch, STREAM_MIXUP))
        mix = mixup_on(self.recipe, epoch)
        flips = tf.constant(alternating_flips(len(self.split), self.seed, epoch))  # flip_translate's, by example
        b, n = self.batch_size, len(self.split)

        def make(step: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            rows = order[step * b : tf.minimum((step + 1) * b, n)]
            images, labels = tf.gather(self.images, rows), tf.gather(self.labels, rows)
            if self.recipe.augmentation in PADDING:
                pad, mode = PADDING[self.recipe.augmentation]
                flip = tf.gather(flips, rows) if self.recipe.augmentation == "flip_translate" else None
                images = crop_flip(images, tf.random.experimental.stateless_fold_in(augment_seed, step), pad, mode, flip)
            x = normalize(images, self.recipe.normalization)
            if mix:
                x, labels = mixup(x, labels, self.recipe.mixup.alpha, tf.random.experimental.stateless_fold_in(mixup_seed, step))
            return x, labels

        dataset = self._batches(make, self.steps(training=True))
        if self.micro_batch and self.micro_batch < self.batch_size:
            dataset = dataset.rebatch(self.micro_batch)
        return dataset

    def evaluation(self) -> tf.data.Dataset:
        """All examples in order, normalized, no augmentation or mixup."""
        b, n = self.batch_size, len(self.split)

        def make(step: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            rows = tf.range(step * b, tf.minimum((step + 1) * b, n))
            return normalize(tf.gather(self.images, rows), self.recipe.normalization), tf.gather(self.labels, rows)

        return self._batches(make, self.steps(training=False))

    @staticmethod
    def _batches(make, steps: int) -> tf.data.Dataset:
        dataset = tf.data.Dataset.range(steps).map(make, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return dataset.prefetch(tf.data.AUTOTUNE).with_options(LEAN)
