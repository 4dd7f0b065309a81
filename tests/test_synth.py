"""The synthetic archive: the official layout, byte-identical for the same arguments, learnable."""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
from conftest import cli_env

from cifarflow.data import cifar_binary as cb
from cifarflow.data.extract import read_archive, read_batches
from cifarflow.data.synth import prototypes, synth_archive_bytes, synth_files


def test_cli_writes_byte_identical_archives(tmp_path: Path) -> None:
    digests = []
    for name in ("a.tgz", "b.tgz"):
        cmd = [
            sys.executable,
            "-m",
            "cifarflow",
            "synth-archive",
            str(tmp_path / name),
            "--train",
            "50",
            "--test",
            "20",
            "--seed",
            "7",
        ]
        subprocess.run(cmd, check=True, env=cli_env(), capture_output=True)
        digests.append(hashlib.sha256((tmp_path / name).read_bytes()).hexdigest())
    assert digests[0] == digests[1]
    assert synth_archive_bytes(50, 20, 8) != (tmp_path / "a.tgz").read_bytes()


def test_official_layout() -> None:
    files = read_batches(io.BytesIO(synth_archive_bytes(55, 20, 0)), 1 << 30, "synth")
    assert set(files) == set(cb.EXPECTED_FILES)
    assert [len(files[f]) // cb.RECORD_BYTES for f in cb.TRAIN_FILES] == [11] * 5
    assert cb.parse_meta(files[cb.META_FILE]) == list(cb.CIFAR10_CLASSES)


def test_archive_carries_the_synth_marker() -> None:
    """The marker member makes the download stage report the data as "synth" whatever serves it;
    read_batches still gives exactly the batches folder."""
    blob = synth_archive_bytes(55, 20, 0)
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        names = tar.getnames()
        marker = tar.extractfile(f"{cb.FOLDER}/{cb.SYNTH_MARKER}")
        assert marker is not None and marker.read() == cb.SYNTH_MARKER_TEXT
    assert sorted(names) == sorted(f"{cb.FOLDER}/{name}" for name in (*cb.EXPECTED_FILES, cb.SYNTH_MARKER))
    archive = read_archive(io.BytesIO(blob), 1 << 30, "synth")
    assert archive.marker == cb.SYNTH_MARKER_TEXT.decode().strip() and set(archive.files) == set(cb.EXPECTED_FILES)
    buffer = io.BytesIO()
    cb.write_archive(buffer, archive.files)  # the same batches, unmarked: an ordinary archive
    assert read_archive(io.BytesIO(buffer.getvalue()), 1 << 30, "plain").marker is None


def test_images_carry_a_learnable_class_pattern() -> None:
    """A nearest-prototype rule with shift-invariant features (per-channel power spectrum)
    beats chance by far: the classes are learnable, yet noisy."""
    files = read_batches(io.BytesIO(synth_archive_bytes(500, 10, 0)), 1 << 30, "synth")
    images, labels = cb.decode_records(b"".join(files[f] for f in cb.TRAIN_FILES), "train")

    def spectrum(x: np.ndarray) -> np.ndarray:
        return np.abs(np.fft.fft2(x.astype(np.float32) - x.mean(axis=(-3, -2), keepdims=True), axes=(-3, -2)))

    protos = spectrum(prototypes()).reshape(10, -1)
    feats = spectrum(images).reshape(len(images), -1)
    sims = (feats / np.linalg.norm(feats, axis=1, keepdims=True)) @ (protos / np.linalg.norm(protos, axis=1, keepdims=True)).T
    accuracy = float((sims.argmax(axis=1) == labels).mean())
    assert accuracy > 0.8, accuracy


def test_mislabelled_share_changes_labels_only() -> None:
    """`mislabel_percent` keeps the images of the clean dataset and gives about that share of the
    labels, in train and test alike, a class other than the image's own."""
    clean, noisy = synth_files(2000, 1000, 3), synth_files(2000, 1000, 3, mislabel_percent=20)
    for files, split in ((cb.TRAIN_FILES, "train"), ((cb.TEST_FILE,), "test")):
        x0, y0 = cb.decode_records(b"".join(clean[f] for f in files), split)
        x1, y1 = cb.decode_records(b"".join(noisy[f] for f in files), split)
        assert np.array_equal(x0, x1)
        changed = float((y0 != y1).mean())
        assert 0.17 < changed < 0.23, changed  # 20% of 1,000+ labels: within 3 standard deviations
        assert y1.max() < cb.NUM_LABELS
    assert synth_files(50, 10, 3, mislabel_percent=0) == synth_files(50, 10, 3)
