"""Real CIFAR-10 (the JPEG copy in ../shared/data, via CIFARFLOW_REAL_DATA): the archive built
by make_cifar10_binary.py goes through download, preprocess and validate: 45,000 / 5,000 / 10,000."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import built_once, make_params

from cifarflow.data import download, preprocess, shards, validate

REAL = os.environ.get("CIFARFLOW_REAL_DATA")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not REAL or not Path(REAL, "make_cifar10_binary.py").is_file(),
        reason="real data not available: set CIFARFLOW_REAL_DATA to ../shared/data to run",
    ),
]


@pytest.fixture(scope="session")
def real_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    def build(folder: Path) -> None:
        folder.mkdir()
        out = folder / "cifar-10-binary.tar.gz"
        subprocess.run([sys.executable, str(Path(REAL, "make_cifar10_binary.py")), str(out)], check=True, capture_output=True)

    return built_once(tmp_path_factory, "real", build) / "cifar-10-binary.tar.gz"


def test_real_archive_through_the_data_stages(tmp_path: Path, real_archive: Path) -> None:
    sha = download.digests(real_archive)["sha256"]
    params = make_params(source=str(real_archive), sha256=sha, md5=None)
    raw = download.run(params, tmp_path / "raw", tmp_path / "cache")
    assert raw["counts"] == {"train": 50000, "test": 10000}
    assert raw["classes"][0] == "airplane" and raw["classes"][-1] == "truck"
    manifest = preprocess.run(params, tmp_path / "raw", tmp_path / "shards")
    assert manifest["counts"] == {"train": 45000, "val": 5000, "test": 10000}
    assert manifest["class_counts"]["val"] == [500] * 10
    for fmt in shards.FORMATS:
        assert len(shards.shard_paths(tmp_path / "shards", "train", fmt)) == params.data.shards
    metrics = validate.run(params, tmp_path / "shards", tmp_path / "m.json", tmp_path / "report.md")
    assert metrics["counts"] == {"train": 45000, "val": 5000, "test": 10000}
    print("real-data validation:", metrics["leakage"], metrics["duplicates_within"])
