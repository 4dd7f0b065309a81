"""The preprocess stage: stratified split, Parquet and TFRecord shards equal to the source
byte for byte, determinism, and the hand-written TFRecord encoder checked against TensorFlow."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import make_params, tree_files

from cifarflow.data import cifar_binary as cb
from cifarflow.data import download, inputs, preprocess, shards, tfrecord
from cifarflow.errors import InputError

SOURCE = "synth:train=300,test=60,seed=5"


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("raw")
    download.run(make_params(source=SOURCE, md5=None, val_size=50, shards=2), root / "raw", root / "cache")
    return root / "raw"


def test_stratified_split_is_exact_and_seeded() -> None:
    labels = np.repeat(np.arange(10), [50, 50, 50, 50, 50, 30, 30, 30, 30, 33]).astype(np.uint8)
    train, val = preprocess.stratified_split(labels, 43, seed=1)
    assert len(val) == 43 and len(train) + len(val) == len(labels)
    assert not set(train) & set(val)
    per_class = np.bincount(labels[val], minlength=10)
    expected = 43 * np.bincount(labels) / len(labels)
    assert np.all(np.abs(per_class - expected) < 1), (per_class, expected)
    again = preprocess.stratified_split(labels, 43, seed=1)
    other = preprocess.stratified_split(labels, 43, seed=2)
    assert np.array_equal(val, again[1]) and not np.array_equal(val, other[1])


@pytest.mark.parametrize("val_size", [300, 1000])
def test_val_size_must_leave_train(val_size: int) -> None:
    with pytest.raises(InputError, match="data.val_size"):
        preprocess.stratified_split(np.zeros(300, np.uint8), val_size, 0)


def test_shards_round_trip_byte_for_byte(tmp_path: Path, raw: Path) -> None:
    params = make_params(source=SOURCE, md5=None, val_size=40, shards=3)
    manifest = preprocess.run(params, raw, tmp_path / "shards")
    train, test, classes = cb.read_raw(raw / cb.FOLDER)
    train_rows, val_rows = preprocess.stratified_split(train.labels, 40, params.seed)
    expected = {"train": train.take(train_rows), "val": train.take(val_rows), "test": test}
    assert manifest["counts"] == {"train": 260, "val": 40, "test": 60}
    assert manifest["classes"] == classes
    for split, want in expected.items():
        for fmt, reader in (("parquet", shards.read_parquet), ("tfrecord", inputs.read_tfrecords)):
            paths = shards.shard_paths(tmp_path / "shards", split, fmt)
            assert len(paths) == 3
            got = reader(paths)
            assert got.images.dtype == np.uint8 and got.images.shape == want.images.shape
            assert got.images.tobytes() == want.images.tobytes(), (split, fmt)
            assert np.array_equal(got.labels, want.labels) and np.array_equal(got.index, want.index)


def test_parquet_is_readable_with_plain_pandas(tmp_path: Path, raw: Path) -> None:
    preprocess.run(make_params(source=SOURCE, md5=None, val_size=40, shards=1), raw, tmp_path / "shards")
    frame = pd.read_parquet(tmp_path / "shards" / "parquet" / "test-00000-of-00001.parquet")
    assert list(frame.columns) == ["image", "label", "index"]
    _, test, _ = cb.read_raw(raw / cb.FOLDER)
    first = np.frombuffer(frame["image"].iloc[0], np.uint8).reshape(32, 32, 3)
    assert np.array_equal(first, test.images[0]) and frame["label"].iloc[0] == test.labels[0]


def test_preprocess_is_deterministic(tmp_path: Path, raw: Path) -> None:
    params = make_params(source=SOURCE, md5=None, val_size=40, shards=2)
    preprocess.run(params, raw, tmp_path / "a")
    preprocess.run(params, raw, tmp_path / "b")
    assert tree_files(tmp_path / "a") == tree_files(tmp_path / "b")
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["shards"] == {k: v for k, v in tree_files(tmp_path / "a").items() if k != "manifest.json"}
    assert manifest["source"]["content"] == json.loads((raw / "manifest.json").read_text())["content"]


def test_tfrecord_bytes_equal_tensorflow_serialization(tmp_path: Path) -> None:
    import tensorflow as tf

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    labels = np.array([0, 9, 3, 127, 1], np.uint8)
    index = np.array([0, 1, 127, 128, 2**40], np.int64)
    path = tmp_path / "x.tfrecord"
    tfrecord.write_tfrecord(path, images, labels, index)
    expected = tmp_path / "tf.tfrecord"
    with tf.io.TFRecordWriter(str(expected)) as writer:
        for image, label, idx in zip(images, labels, index, strict=True):
            example = tf.train.Example(
                features=tf.train.Features(
                    feature={
                        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image.tobytes()])),
                        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)])),
                        "index": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(idx)])),
                    }
                )
            )
            serialized = example.SerializeToString(deterministic=True)
            assert tfrecord.encode_example(image.tobytes(), int(label), int(idx)) == serialized
            writer.write(serialized)
    assert path.read_bytes() == expected.read_bytes()


def test_missing_raw_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="run the download stage first"):
        preprocess.run(make_params(), tmp_path / "nothing", tmp_path / "out")
    assert not (tmp_path / "out").exists()
