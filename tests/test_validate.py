"""The validate stage: counts, pixel statistics, duplicates and leakage; schema violations fail."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_params, write_params

from cifarflow.cli import main
from cifarflow.data import cifar_binary as cb
from cifarflow.data import preprocess, validate
from cifarflow.errors import InputError


def raw_with(tmp_path: Path, train: np.ndarray, train_labels: np.ndarray, test: np.ndarray, test_labels: np.ndarray) -> Path:
    raw = tmp_path / "raw"
    (raw / cb.FOLDER).mkdir(parents=True)
    for name, data in cb.batch_files(train, train_labels, test, test_labels, cb.CIFAR10_CLASSES).items():
        (raw / cb.FOLDER / name).write_bytes(data)
    (raw / "manifest.json").write_text(json.dumps({"kind": "synth", "content": {"sha256": "0" * 64}}))
    return raw


def images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def shards_of(tmp_path: Path, raw: Path, **data) -> Path:
    preprocess.run(
        make_params(md5=None, source="synth:train=100,test=30", val_size=20, shards=2, **data), raw, tmp_path / "shards"
    )
    return tmp_path / "shards"


def test_statistics_and_no_leakage(tmp_path: Path) -> None:
    train, test = images(100, 1), images(30, 2)
    train[:, :, :, 0] = 10  # a constant red channel: its mean and std are known exactly
    raw = raw_with(tmp_path, train, np.arange(100) % 10, test, np.arange(30) % 10)
    params = make_params(md5=None, source="synth:train=100,test=30", val_size=20, shards=2)
    metrics = validate.run(params, shards_of(tmp_path, raw), tmp_path / "m.json", tmp_path / "r.md")
    assert metrics["counts"] == {"train": 80, "val": 20, "test": 30}
    assert metrics["class_counts"]["val"] == dict.fromkeys(cb.CIFAR10_CLASSES, 2)
    assert metrics["pixel"]["train"]["mean"][0] == 10.0 and metrics["pixel"]["train"]["std"][0] == 0.0
    pixels = test.reshape(-1, 3).astype(np.float64)
    assert np.allclose(metrics["pixel"]["test"]["mean"], pixels.mean(axis=0), atol=1e-4)
    assert np.allclose(metrics["pixel"]["test"]["std"], pixels.std(axis=0), atol=1e-4)
    assert metrics["leakage"]["total"] == 0
    headline, details = json.loads((tmp_path / "m.json").read_text()), json.loads((tmp_path / "details.json").read_text())
    assert headline == {"counts": metrics["counts"], "leakage": {"total": 0}}  # few `dvc metrics show` columns
    assert details["leakage"] == {k: v for k, v in metrics["leakage"].items() if k != "total"}
    assert {**details, "counts": headline["counts"], "leakage": metrics["leakage"]} == metrics
    assert "| test | 30 |" in (tmp_path / "r.md").read_text()


def leaky_raw(tmp_path: Path) -> Path:
    train, test = images(100, 1), images(30, 2)
    test[:3] = train[:3]  # three test images are copies of train images
    train[50] = train[51]  # one duplicate within train (possibly split across train/val)
    return raw_with(tmp_path, train, np.arange(100) % 10, test, np.arange(30) % 10)


def test_leakage_is_counted_and_reported(tmp_path: Path) -> None:
    metrics = validate.run(
        make_params(md5=None, source="synth:train=100,test=30", val_size=20, shards=2),
        shards_of(tmp_path, leaky_raw(tmp_path)),
        tmp_path / "m.json",
        tmp_path / "r.md",
    )
    within = metrics["duplicates_within"]["train"] + metrics["duplicates_within"]["val"]
    assert metrics["leakage"]["train_test"] + metrics["leakage"]["val_test"] == 3
    assert within + metrics["leakage"]["train_val"] == 1
    assert metrics["leakage"]["total"] >= 3


def test_fail_on_leakage_exits_2(tmp_path: Path, capsys) -> None:
    root = shards_of(tmp_path, leaky_raw(tmp_path))
    params = write_params(
        tmp_path,
        {"data": {"source": "synth:train=100,test=30", "md5": None, "val_size": 20, "shards": 2, "fail_on_leakage": True}},
    )
    code = main(
        [
            "--params",
            str(params),
            "validate",
            "--shards",
            str(root),
            "--metrics",
            str(tmp_path / "m.json"),
            "--report",
            str(tmp_path / "r.md"),
            "--verdict",
            str(tmp_path / "verdict.json"),
        ]
    )
    assert code == 2 and "appear in more than one split" in capsys.readouterr().err


def test_schema_violation_exits_2(tmp_path: Path) -> None:
    raw = raw_with(tmp_path, images(100, 1), np.arange(100) % 10, images(30, 2), np.arange(30) % 10)
    root = shards_of(tmp_path, raw)
    bad = root / "parquet" / "test-00001-of-00002.parquet"
    table = pa.table(
        {
            "image": pa.array([b"\0" * 100] * 15, pa.binary()),
            "label": pa.array([1] * 15, pa.int64()),
            "index": pa.array(range(15), pa.int64()),
        }
    )
    pq.write_table(table, bad)
    manifest = json.loads((root / "manifest.json").read_text())
    from cifarflow.fileio import sha256_file

    manifest["shards"]["parquet/" + bad.name] = sha256_file(bad)  # consistent manifest, wrong schema
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match=r"test-00001-of-00002.parquet: schema violation"):
        validate.run(make_params(), root, tmp_path / "m.json", tmp_path / "r.md")
    assert not (tmp_path / "m.json").exists()


def test_tampered_shard_is_detected(tmp_path: Path) -> None:
    raw = raw_with(tmp_path, images(100, 1), np.arange(100) % 10, images(30, 2), np.arange(30) % 10)
    root = shards_of(tmp_path, raw)
    shard = root / "tfrecord" / "train-00000-of-00002.tfrecord"
    shard.write_bytes(shard.read_bytes()[:-1])
    with pytest.raises(InputError, match="sha256 differs"):
        validate.run(make_params(), root, tmp_path / "m.json", tmp_path / "r.md")
