"""The input pipeline: normalizations, crop + flip, mixup, (seed, epoch) determinism, formats."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow as tf

from cifarflow.data.cifar_binary import Split
from cifarflow.data.inputs import InputPipeline, alternating_flips, crop_flip, load_split, mixup, mixup_on
from cifarflow.normalization import normalize
from cifarflow.settings import Recipe

RNG = np.random.default_rng(0)


def recipe(**changes) -> Recipe:
    base = {
        "model": "lenet",
        "variant": "tiny",
        "epochs": 3,
        "batch_size": 16,
        "optimizer": {"name": "adam", "learning_rate": 1e-3},
        "normalization": "center",
    }
    return Recipe.model_validate({**base, **changes})


def split(n: int = 40) -> Split:
    return Split(RNG.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), (np.arange(n) % 10).astype(np.uint8), np.arange(n))


def test_normalizations_match_their_definitions() -> None:
    x = RNG.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    f = x.astype(np.float64)
    assert np.allclose(normalize(x, "center"), f / 255 - 0.5, atol=1e-6)
    lo, hi = f.min(axis=(1, 2, 3), keepdims=True), f.max(axis=(1, 2, 3), keepdims=True)
    assert np.allclose(normalize(x, "minmax"), (f - lo) / (hi - lo), atol=1e-6)
    mean, std = f.mean(axis=(1, 2, 3), keepdims=True), f.std(axis=(1, 2, 3), keepdims=True)
    assert np.allclose(normalize(x, "standardize"), (f - mean) / np.maximum(std, 1 / np.sqrt(3072)), atol=1e-4)
    flat = np.full((1, 32, 32, 3), 7, np.uint8)
    assert np.all(np.isfinite(normalize(flat, "minmax"))) and np.all(np.isfinite(normalize(flat, "standardize")))


def test_crop_flip_is_a_shifted_window_of_the_padded_image() -> None:
    x = RNG.integers(1, 256, (64, 32, 32, 3), dtype=np.uint8)
    out = crop_flip(tf.constant(x), tf.constant([1, 2], tf.int64)).numpy()
    padded = np.pad(x, ((0, 0), (4, 4), (4, 4), (0, 0)))
    flips = 0
    for i in range(len(x)):
        windows = [(padded[i, dy : dy + 32, dx : dx + 32], f) for dy in range(9) for dx in range(9) for f in (0, 1)]
        matches = [f for w, f in windows if np.array_equal(out[i], w[:, ::-1] if f else w)]
        assert matches, i
        flips += matches[0]
    assert 10 < flips < 54  # about half are flipped
    again = crop_flip(tf.constant(x), tf.constant([1, 2], tf.int64)).numpy()
    assert np.array_equal(out, again)


def test_flip_translate_mirrors_the_padding_and_alternates_each_images_flip() -> None:
    x = RNG.integers(1, 256, (64, 32, 32, 3), dtype=np.uint8)
    flips = alternating_flips(64, seed=7, epoch=0)
    assert 10 < flips.sum() < 54 and np.array_equal(alternating_flips(64, seed=7, epoch=2), flips)
    np.testing.assert_array_equal(alternating_flips(64, seed=7, epoch=1), ~flips)  # each image both ways in 2 epochs
    assert not np.array_equal(alternating_flips(64, seed=8, epoch=0), flips)
    out = crop_flip(tf.constant(x), tf.constant([1, 2], tf.int64), 2, "REFLECT", tf.constant(flips)).numpy()
    padded = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)), mode="reflect")
    for i in range(len(x)):
        windows = [padded[i, dy : dy + 32, dx : dx + 32] for dy in range(5) for dx in range(5)]
        assert any(np.array_equal(out[i], w[:, ::-1] if flips[i] else w) for w in windows), i


def test_mixup_labels_sum_to_one_and_mix_neighbours() -> None:
    x = tf.constant(RNG.normal(size=(8, 32, 32, 3)).astype(np.float32))
    y = tf.one_hot(np.arange(8) % 10, 10)
    mx, my = mixup(x, y, 1.0, tf.constant([3, 4], tf.int64))
    assert np.allclose(my.numpy().sum(axis=1), 1.0, atol=1e-6)
    lam = float(my.numpy()[0, 0])  # example 0 mixes label 0 with label 7 (its rolled neighbour)
    assert 0 < lam < 1 and np.isclose(my.numpy()[0, 7], 1 - lam, atol=1e-6)
    assert np.allclose(mx.numpy()[0], lam * x.numpy()[0] + (1 - lam) * x.numpy()[7], atol=1e-5)


def test_mixup_is_off_during_warmup_and_evaluation() -> None:
    r = recipe(mixup={"alpha": 1.0, "warmup": 1})
    assert not mixup_on(r, 0) and mixup_on(r, 1) and not mixup_on(recipe(), 5)
    pipe = InputPipeline(split(), r, 10, seed=0, batch_size=16)
    labels = lambda ds: np.concatenate([y.numpy() for _, y in ds])  # noqa: E731
    assert set(np.unique(labels(pipe.train(0)))) == {0.0, 1.0}, "warm-up epoch: hard labels"
    soft = labels(pipe.train(1))
    assert not set(np.unique(soft)) <= {0.0, 1.0} and np.allclose(soft.sum(axis=1), 1, atol=1e-6)
    assert set(np.unique(labels(pipe.evaluation()))) == {0.0, 1.0}, "evaluation never mixes"


def test_epochs_are_reproducible_and_differ() -> None:
    r = recipe(augmentation="crop_flip", normalization="standardize", drop_remainder=True)
    data = split()
    first = [x.numpy() for x, _ in InputPipeline(data, r, 10, seed=5, batch_size=16).train(2)]
    again = [x.numpy() for x, _ in InputPipeline(data, r, 10, seed=5, batch_size=16).train(2)]
    other = [x.numpy() for x, _ in InputPipeline(data, r, 10, seed=5, batch_size=16).train(3)]
    assert len(first) == 2 and all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not np.array_equal(first[0], other[0])


def test_evaluation_keeps_every_example_in_order() -> None:
    data = split(37)
    ys = np.concatenate([y.numpy().argmax(1) for _, y in InputPipeline(data, recipe(), 10, 0, 16).evaluation()])
    assert np.array_equal(ys, data.labels)


def test_both_shard_formats_give_the_same_batches(tiny_shards: Path) -> None:
    a, b = load_split(tiny_shards, "train", "parquet"), load_split(tiny_shards, "train", "tfrecord")
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    r = recipe(augmentation="crop_flip")
    xa = [x.numpy() for x, _ in InputPipeline(a, r, 10, 1, 16).train(0)]
    xb = [x.numpy() for x, _ in InputPipeline(b, r, 10, 1, 16).train(0)]
    assert all(np.array_equal(p, q) for p, q in zip(xa, xb, strict=True))
