"""Shard formats: Parquet (pyarrow; written and read here) and TFRecord (tf.train.Example; written
without TensorFlow by cifarflow.data.tfrecord, read here with TensorFlow), the same three columns.

image: 3072 bytes, 32x32x3 uint8 in HWC order · label: class index · index: position in the
source split (train or test) before the val split, so every example traces back to the archive.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cifarflow.data import cifar_binary as cb
from cifarflow.data.cifar_binary import Split
from cifarflow.errors import InputError
from cifarflow.pixels import IMAGE_SHAPE

SPLITS = ("train", "val", "test")
FORMATS = {"parquet": "parquet", "tfrecord": "tfrecord"}  # format -> file extension
SCHEMA = pa.schema(
    [
        pa.field("image", pa.binary(cb.IMAGE_BYTES), nullable=False),
        pa.field("label", pa.uint8(), nullable=False),
        pa.field("index", pa.int64(), nullable=False),
    ],
    metadata={b"cifarflow.image": b"uint8 HWC 32x32x3"},
)


def shard_name(split: str, i: int, n: int, fmt: str) -> str:
    return f"{split}-{i:05d}-of-{n:05d}.{FORMATS[fmt]}"


def shard_paths(root: Path, split: str, fmt: str) -> list[Path]:
    """The shards of one split in order (they are listed, so a manifest is not needed to read)."""
    paths = sorted((Path(root) / fmt).glob(f"{split}-*-of-*.{FORMATS[fmt]}"))
    if not paths:
        raise InputError(f"{Path(root) / fmt}: no {split} shards; run the preprocess stage first")
    return paths


def write_parquet(path: Path, images: np.ndarray, labels: np.ndarray, index: np.ndarray) -> None:
    # Uncompressed and without dictionaries: pixels barely compress, and the fixed-size column
    # can then be read back as one contiguous buffer, straight into a numpy view.
    table = pa.Table.from_arrays(
        [
            pa.FixedSizeBinaryArray.from_buffers(
                pa.binary(cb.IMAGE_BYTES), len(labels), [None, pa.py_buffer(np.ascontiguousarray(images))]
            ),
            pa.array(labels, pa.uint8()),
            pa.array(index, pa.int64()),
        ],
        schema=SCHEMA,
    )
    pq.write_table(table, path, compression="none", use_dictionary=False, write_statistics=["label", "index"])


def check_parquet_schema(path: Path, schema: pa.Schema) -> None:
    """A schema violation names the shard and both schemas (exit 2)."""
    if not schema.equals(SCHEMA, check_metadata=False):
        raise InputError(f"{path}: schema violation: found\n{schema}\nexpected\n{SCHEMA}")


def _images_view(column: pa.FixedSizeBinaryArray) -> np.ndarray:
    """(N, 32, 32, 3) uint8 view of a fixed-size binary column's data buffer (no copy)."""
    images = np.frombuffer(
        column.buffers()[1], np.uint8, count=len(column) * cb.IMAGE_BYTES, offset=column.offset * cb.IMAGE_BYTES
    )
    return images.reshape(-1, *IMAGE_SHAPE)


def _read_table(path: Path) -> pa.Table:
    table = pq.read_table(path, memory_map=True)  # mmap: no read buffer, steady speed
    check_parquet_schema(path, table.schema)
    return table


def read_parquet_file(path: Path) -> Split:
    """One Parquet shard -> Split; the images are a zero-copy view of the memory-mapped column."""
    table = _read_table(path)
    return Split(
        _images_view(table.column("image").combine_chunks()), table.column("label").to_numpy(), table.column("index").to_numpy()
    )


def read_parquet(paths: list[Path]) -> Split:
    """Parquet shards -> one Split. The shards' columns are joined once in Arrow's memory pool
    (which reuses its pages, unlike a fresh numpy array) and viewed from numpy without a copy."""
    tables = [_read_table(p) for p in paths]
    columns = {name: pa.concat_arrays([c for t in tables for c in t.column(name).chunks]) for name in SCHEMA.names}
    return Split(_images_view(columns["image"]), columns["label"].to_numpy(), columns["index"].to_numpy())


def tfrecord_features() -> dict:
    """The Example features of a TFRecord shard, for tf.io.parse_example."""
    import tensorflow as tf  # only the TFRecord side needs TensorFlow

    return {
        "image": tf.io.FixedLenFeature([], tf.string),
        "label": tf.io.FixedLenFeature([], tf.int64),
        "index": tf.io.FixedLenFeature([], tf.int64),
    }
