"""The `corrupt` stage: the robustness benchmark's images, made offline from the validated test split.

`robustness.images` test images (stratified by class, seeded; all of them when it is at least the
split's size) are written unchanged as the split `clean`, and under each corruption family at
each severity (cifarflow.data.corruptions) as the split `<family>-<severity>`, one Parquet shard
each, in the shards' schema (same labels and source indices as `clean`). The manifest lists every
shard's sha256 like preprocess's; the stage checks what it wrote (schema, counts, labels and
indices equal to clean's, bytes changed by the corruption) and only then writes its verdict, which
evaluate checks before reading, as it does the shards'. Byte-identical for the same shards and params.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cifarflow.contract import MANIFEST, VERDICT
from cifarflow.data import shards
from cifarflow.data.cifar_binary import Split
from cifarflow.data.corruptions import corrupt
from cifarflow.data.preprocess import stratified_split
from cifarflow.data.verdict import check_shards, read_manifest, verdict_of
from cifarflow.errors import InputError
from cifarflow.fileio import atomic_dir, dumps_json, sha256_file, write_json_atomic
from cifarflow.pixels import IMAGE_SHAPE
from cifarflow.settings import Params

CLEAN = "clean"
FORMAT = "parquet"


def cell(family: str, severity: int) -> str:
    """The split name of one corruption at one severity."""
    return f"{family}-{severity}"


def cells(params: Params) -> list[tuple[str, int]]:
    return [(f, s) for f in params.robustness.families for s in params.robustness.severities]


def subset(labels: np.ndarray, images: int, seed: int) -> np.ndarray:
    """Sorted rows of the test split to corrupt: `images` of them, each class its share."""
    if images >= len(labels):
        return np.arange(len(labels))
    return stratified_split(labels, images, seed)[1]


def check_written(root: Path, splits: list[str], clean: Split) -> None:
    """What this stage wrote reads back in the shards' schema with clean's labels and indices."""
    for split in splits:
        (path,) = shards.shard_paths(root, split, FORMAT)
        got = shards.read_parquet_file(path)
        if not (np.array_equal(got.labels, clean.labels) and np.array_equal(got.index, clean.index)):
            raise InputError(f"{path}: labels or indices differ from the clean images'; rerun the corrupt stage")
        if split != CLEAN and np.array_equal(got.images, clean.images):
            raise InputError(f"{path}: identical to the clean images: the corruption did nothing")


def run(params: Params, shards_dir: Path, verdict: Path, out: Path) -> dict[str, Any]:
    checked = check_shards(shards_dir, verdict, FORMAT, ("test",))
    test = shards.read_parquet(checked.files("test"))
    checked.check_split("test", test.labels)
    rows = subset(test.labels, params.robustness.images, params.seed)
    clean = Split(np.ascontiguousarray(test.images[rows]), test.labels[rows], test.index[rows])
    splits = {CLEAN: None} | {cell(f, s): (f, s) for f, s in cells(params)}  # split -> (family, severity)
    with atomic_dir(out) as tmp:
        (tmp / FORMAT).mkdir()
        files = {}
        for split, corruption in splits.items():
            # one cell in memory at a time: the whole test split's 70 cells would be 2.1 GB
            images = clean.images if corruption is None else corrupt(clean.images, *corruption, params.seed)
            path = tmp / FORMAT / shards.shard_name(split, 0, 1, FORMAT)
            shards.write_parquet(path, images, clean.labels, clean.index)
            files[f"{FORMAT}/{path.name}"] = sha256_file(path)
        check_written(tmp, list(splits), clean)
        manifest = {
            "classes": checked.classes,
            "counts": {split: len(clean.labels) for split in splits},
            "class_counts": np.bincount(clean.labels, minlength=len(checked.classes)).tolist(),
            "shards": dict(sorted(files.items())),
            "source": {
                "test_manifest_sha256": sha256_file(Path(shards_dir) / MANIFEST),
                "seed": params.seed,
                "families": params.robustness.families,
                "severities": params.robustness.severities,
            },
            "image": {"dtype": "uint8", "shape": list(IMAGE_SHAPE), "layout": "HWC"},
        }
        data = dumps_json(manifest).encode()
        (tmp / MANIFEST).write_bytes(data)
        write_json_atomic(tmp / VERDICT, verdict_of(data))
    return manifest


def load(root: Path, params: Params) -> tuple[list[str], dict[str, Split]]:
    """(classes, {split: Split}) of the corrupt stage's output for the cells of `params`, checked
    (verdict, listing, sha256, counts, labels) before use."""
    root = Path(root)
    wanted = [CLEAN] + [cell(f, s) for f, s in cells(params)]
    if not (root / MANIFEST).is_file():
        raise InputError(f"{root / MANIFEST}: not found; run the corrupt stage first (dvc repro corrupt)")
    _, manifest = read_manifest(root)
    if missing := [split for split in wanted if split not in manifest["counts"]]:
        raise InputError(
            f"{root / MANIFEST}: has no {missing[0]} (made for other robustness params); "
            "rerun the corrupt stage (dvc repro corrupt)"
        )
    checked = check_shards(root, root / VERDICT, FORMAT, wanted)
    splits = {}
    for split in wanted:
        data = shards.read_parquet(checked.files(split))
        checked.check_split(split, data.labels)
        splits[split] = data
    return checked.classes, splits
