"""The `preprocess` stage: a stratified, seeded val split carved from train, written as Parquet
and TFRecord shards with a manifest. Test is passed through untouched.

Deterministic (same input and params give byte-identical files) and uint8 throughout: no
float copy of the dataset is ever made.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from cifarflow.contract import MANIFEST, read_json
from cifarflow.data import cifar_binary as cb
from cifarflow.data import shards, tfrecord
from cifarflow.data.cifar_binary import Split
from cifarflow.errors import InputError
from cifarflow.fileio import atomic_dir, dumps_json, sha256_file
from cifarflow.pixels import IMAGE_SHAPE
from cifarflow.settings import Params, check_split_sizes

WRITERS = {"parquet": shards.write_parquet, "tfrecord": tfrecord.write_tfrecord}


def stratified_split(labels: np.ndarray, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, val rows), both sorted. Each class gives val its share of `val_size`
    (largest remainders get the leftover slots, ties to the lower class), chosen at random."""
    n = len(labels)
    if not 0 < val_size < n:
        raise InputError(f"data.val_size is {val_size} but train has {n} examples; set 0 < data.val_size < {n}")
    classes, counts = np.unique(labels, return_counts=True)
    exact = val_size * counts / n
    quota = np.floor(exact).astype(np.int64)
    leftover = val_size - int(quota.sum())
    order = sorted(range(len(classes)), key=lambda c: (-(exact[c] - quota[c]), c))
    quota[order[:leftover]] += 1
    rng = np.random.default_rng([seed, 0x5B117])  # a stream of its own, apart from training's
    val = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:q] for c, q in zip(classes, quota, strict=True)])
    mask = np.zeros(n, bool)
    mask[val] = True
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def make_splits(train: Split, test: Split, val_size: int, seed: int) -> dict[str, tuple[Split, np.ndarray]]:
    """Each split as (source Split, rows of it); rows index lazily so nothing is copied whole."""
    train_rows, val_rows = stratified_split(train.labels, val_size, seed)
    return {"train": (train, train_rows), "val": (train, val_rows), "test": (test, np.arange(len(test)))}


def write_format(out: Path, fmt: str, splits: dict[str, tuple[Split, np.ndarray]], n_shards: int) -> dict[str, str]:
    """Write every split in one format; return {relative path: sha256}."""
    written = {}
    (out / fmt).mkdir()
    for split, (source, rows) in splits.items():
        for i, part in enumerate(np.array_split(rows, n_shards)):
            path = out / fmt / shards.shard_name(split, i, n_shards, fmt)
            WRITERS[fmt](path, source.images[part], source.labels[part], source.index[part])
            written[f"{fmt}/{path.name}"] = sha256_file(path)
    return written


def write_shards(out: Path, splits: dict[str, tuple[Split, np.ndarray]], n_shards: int) -> dict[str, str]:
    """Both formats at once: Parquet is written by pyarrow outside the GIL while the TFRecord
    writer runs Python, so on 2 cores the two overlap."""
    with ThreadPoolExecutor(max_workers=len(WRITERS)) as pool:
        futures = [pool.submit(write_format, out, fmt, splits, n_shards) for fmt in WRITERS]
        written = {}
        for future in futures:
            written.update(future.result())
    return dict(sorted(written.items()))


def run(params: Params, raw: Path, out: Path) -> dict[str, Any]:
    """Read the downloaded batches, split, and write `out/{parquet,tfrecord}/*` and the manifest."""
    raw_manifest = read_json(Path(raw) / MANIFEST, "download")
    train, test, classes = cb.read_raw(Path(raw) / cb.FOLDER)
    try:  # before any work: an archive's split sizes are known only now
        check_split_sizes(len(train), len(test), params.data.val_size, params.data.shards)
    except ValueError as exc:
        raise InputError(f"{raw}: {exc}") from None
    splits = make_splits(train, test, params.data.val_size, params.seed)
    with atomic_dir(out) as tmp:
        files = write_shards(tmp, splits, params.data.shards)
        manifest = {
            "classes": classes,
            "counts": {name: len(rows) for name, (_, rows) in splits.items()},
            "class_counts": {
                name: np.bincount(src.labels[rows], minlength=len(classes)).tolist() for name, (src, rows) in splits.items()
            },
            "shards": files,
            "shards_per_split": params.data.shards,
            "source": {"kind": raw_manifest["kind"], "content": raw_manifest["content"]},
            "split": {"seed": params.seed, "val_size": params.data.val_size},
            "image": {"dtype": "uint8", "shape": list(IMAGE_SHAPE), "layout": "HWC"},
        }
        (tmp / MANIFEST).write_text(dumps_json(manifest))
    return manifest
