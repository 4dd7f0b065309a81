"""The `validate` stage: check the shards against the manifest and schema, and report class
counts, per-channel pixel statistics, and exact duplicates within and across splits.

The train/val/test leakage count (an image that appears in two splits) is the figure that
matters: it fails the stage only when data.fail_on_leakage is set.

Both formats are covered: the Parquet shards are read (schema, labels, counts), and every shard
of both formats must be exactly the manifest's, by name and sha256. TFRecord content is not
parsed here (that would need TensorFlow or ~1 s more per 60k images): its bytes must be the ones
preprocess recorded, and training and evaluation check the labels and counts of whatever format
they load. Only when everything passes is the verdict written (verdict.py), which train, evaluate
and export require.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from cifarflow.contract import DETAILS, MANIFEST
from cifarflow.data import cifar_binary as cb
from cifarflow.data import shards
from cifarflow.data.verdict import discard_verdict, read_manifest, write_verdict
from cifarflow.errors import InputError
from cifarflow.fileio import sha256_file, split_headline, write_bytes_atomic, write_json_atomic
from cifarflow.settings import Params

log = logging.getLogger(__name__)


def check_manifest(root: Path, manifest: dict[str, Any]) -> None:
    """The manifest lists every split's shards in both formats; every shard listed is present with
    its recorded sha256, and no unlisted shard exists."""
    listed = set(manifest["shards"])
    n = manifest.get("shards_per_split")
    if not isinstance(n, int) or n < 1:
        raise InputError(f"{root / MANIFEST}: shards_per_split is {n!r}, not a positive count; rerun preprocess")
    names = {
        f"{fmt}/{shards.shard_name(split, i, n, fmt)}" for fmt in shards.FORMATS for split in shards.SPLITS for i in range(n)
    }
    if listed != names:
        wrong = sorted(listed ^ names)
        raise InputError(
            f"{root / MANIFEST}: does not list {n} shards per split in each of {sorted(shards.FORMATS)} "
            f"(differs in {wrong[:4]}{' ...' if len(wrong) > 4 else ''}); rerun preprocess"
        )
    present = {f"{p.parent.name}/{p.name}" for fmt in shards.FORMATS for p in (root / fmt).glob("*")}
    if present - listed:
        raise InputError(f"{root}: shards not in {MANIFEST}: {sorted(present - listed)}")
    for rel, expected in manifest["shards"].items():
        if not (root / rel).is_file():
            raise InputError(f"{root / rel}: listed in {MANIFEST} but missing")
        if sha256_file(root / rel) != expected:
            raise InputError(f"{root / rel}: sha256 differs from {MANIFEST}; rerun preprocess")


def channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel histograms (3, 256) of uint8 pixels: exact statistics with no float copy."""
    return np.stack([np.bincount(images[..., c].ravel(), minlength=256) for c in range(cb.CHANNELS)])


def mean_std(histogram: np.ndarray) -> tuple[list[float], list[float]]:
    values = np.arange(256, dtype=np.float64)
    n = histogram.sum(axis=1)
    mean = histogram @ values / n
    var = histogram @ values**2 / n - mean**2
    return [round(float(m), 4) for m in mean], [round(float(s), 4) for s in np.sqrt(np.maximum(var, 0))]


def image_hashes(images: np.ndarray) -> list[bytes]:
    flat = images.reshape(len(images), -1)
    return [hashlib.sha256(row.data).digest() for row in flat]  # sha256 runs on SHA-NI: fastest here


# The DVC metrics (fileio.split_headline): the split sizes and the images in more than one split;
# the rest goes to the details file.
HEADLINE = {"counts": shards.SPLITS, "leakage": ("total",)}


def run(
    params: Params,
    root: Path,
    metrics_path: Path,
    report_path: Path,
    verdict_path: Path | None = None,
    details_path: Path | None = None,
) -> dict[str, Any]:
    """Validate `root` (the preprocess output); write the headline metrics JSON (a handful of
    `dvc metrics show` columns), the long tail in `details_path` (default: details.json beside the
    metrics), a markdown summary, and the verdict at `verdict_path` only if the shards pass."""
    root = Path(root)
    if verdict_path is not None:
        discard_verdict(verdict_path)
    manifest_bytes, manifest = read_manifest(root)
    with ThreadPoolExecutor(max_workers=1) as pool:  # hashing the shards overlaps the statistics
        integrity = pool.submit(check_manifest, root, manifest)
        try:
            metrics = measure(root, manifest)
        finally:
            integrity.result()  # a damaged shard is reported first: it explains everything else
    headline, details = split_headline(metrics, HEADLINE)
    write_json_atomic(metrics_path, headline)
    write_json_atomic(details_path or Path(metrics_path).with_name(DETAILS), details)
    write_bytes_atomic(report_path, render_report(metrics, manifest).encode())
    empty = [(split, name) for split, counts in metrics["class_counts"].items() for name, n in counts.items() if n == 0]
    if empty:  # a class a split never shows is a class its model or its test can never get right or wrong
        shown = ", ".join(f"{name} in {split}" for split, name in empty[:10])
        raise InputError(f"{root}: {len(empty)} class(es) with no examples: {shown}; every class needs examples in every split")
    leakage = metrics["leakage"]
    if leakage["total"]:
        message = f"{leakage['total']} images appear in more than one split: {leakage}"
        if params.data.fail_on_leakage:
            raise InputError(f"{message} (data.fail_on_leakage is set)")
        log.warning("%s; set data.fail_on_leakage: true to fail on this", message)
    if verdict_path is not None:
        write_verdict(verdict_path, manifest_bytes)  # last: nothing after this can fail the stage
    return metrics


def measure(root: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Read the Parquet shards once: schema, counts, pixel statistics, duplicates, leakage."""
    n_classes = len(manifest["classes"])
    counts, class_counts, stats, within, hashes = {}, {}, {}, {}, {}
    for split in shards.SPLITS:
        histogram = np.zeros((cb.CHANNELS, 256), np.int64)
        labels_seen = np.zeros(n_classes, np.int64)
        split_hashes: list[bytes] = []
        for path in shards.shard_paths(root, split, "parquet"):
            part = shards.read_parquet_file(path)  # checks the schema; images are (n, 32, 32, 3)
            if len(part) and int(part.labels.max()) >= n_classes:
                raise InputError(f"{path}: schema violation: label {int(part.labels.max())} >= {n_classes} classes")
            histogram += channel_stats(part.images)
            labels_seen += np.bincount(part.labels, minlength=n_classes)
            split_hashes += image_hashes(part.images)
        if len(split_hashes) != manifest["counts"][split]:
            raise InputError(f"{root}: {split} has {len(split_hashes)} examples, {MANIFEST} says {manifest['counts'][split]}")
        counts[split] = len(split_hashes)
        class_counts[split] = dict(zip(manifest["classes"], labels_seen.tolist(), strict=True))
        mean, std = mean_std(histogram) if counts[split] else ([0.0] * 3, [0.0] * 3)
        stats[split] = {"mean": mean, "std": std}
        within[split] = sum(c - 1 for c in Counter(split_hashes).values() if c > 1)
        hashes[split] = split_hashes
    unique = {split: set(h) for split, h in hashes.items()}
    leakage = {f"{a}_{b}": len(unique[a] & unique[b]) for a, b in combinations(shards.SPLITS, 2)}
    leakage["total"] = sum(leakage.values())
    return {
        "counts": counts,
        "class_counts": class_counts,
        "pixel": stats,
        "duplicates_within": within,
        "leakage": leakage,
        "schema_ok": True,
    }


def render_report(metrics: dict[str, Any], manifest: dict[str, Any]) -> str:
    lines = [
        "# Data validation report",
        "",
        f"Source: {manifest['source']['kind']}, content {json.dumps(manifest['source']['content'], sort_keys=True)}",
        "",
        "| split | examples | duplicates within | pixel mean (R, G, B) | pixel std (R, G, B) |",
        "|---|---:|---:|---|---|",
    ]
    for split in shards.SPLITS:
        p = metrics["pixel"][split]
        lines.append(
            f"| {split} | {metrics['counts'][split]} | {metrics['duplicates_within'][split]} | "
            f"{', '.join(f'{v:.2f}' for v in p['mean'])} | {', '.join(f'{v:.2f}' for v in p['std'])} |"
        )
    leak = metrics["leakage"]
    lines += [
        "",
        "## Leakage (the same image in two splits)",
        "",
        "| train-val | train-test | val-test | total |",
        "|---:|---:|---:|---:|",
        f"| {leak['train_val']} | {leak['train_test']} | {leak['val_test']} | {leak['total']} |",
        "",
        "## Class counts",
        "",
        "| class | " + " | ".join(shards.SPLITS) + " |",
        "|---|" + "---:|" * len(shards.SPLITS),
    ]
    for name in manifest["classes"]:
        lines.append(f"| {name} | " + " | ".join(str(metrics["class_counts"][s][name]) for s in shards.SPLITS) + " |")
    return "\n".join(lines) + "\n"
