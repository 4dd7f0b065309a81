"""The official CIFAR-10 binary layout: records of 1 label byte + 3072 pixel bytes (R, G, B planes).

Reading it never unpickles anything: the binary version is plain bytes.
"""

from __future__ import annotations

import gzip
import io
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cifarflow.errors import InputError

HEIGHT = WIDTH = 32
CHANNELS = 3
IMAGE_BYTES = HEIGHT * WIDTH * CHANNELS  # 3072
RECORD_BYTES = 1 + IMAGE_BYTES  # 3073
NUM_LABELS = 10  # labels are one byte, 0..9
FOLDER = "cifar-10-batches-bin"
TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
TEST_FILE = "test_batch.bin"
META_FILE = "batches.meta.txt"
EXPECTED_FILES = (*TRAIN_FILES, TEST_FILE, META_FILE)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@dataclass(frozen=True)
class Split:
    """One split in memory: images (N, 32, 32, 3) uint8 HWC, labels (N,) uint8, original indices."""

    images: np.ndarray
    labels: np.ndarray
    index: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, rows: np.ndarray) -> Split:
        return Split(self.images[rows], self.labels[rows], self.index[rows])


def encode_records(images: np.ndarray, labels: np.ndarray) -> bytes:
    """(N, 32, 32, 3) HWC uint8 + (N,) labels -> the binary records (CHW planes per image)."""
    chw = images.transpose(0, 3, 1, 2).reshape(len(labels), IMAGE_BYTES)
    return np.concatenate([labels.astype(np.uint8)[:, None], chw], axis=1).tobytes()


def check_records(data: bytes | memoryview, name: str) -> np.ndarray:
    """Validate the binary records (whole records, labels 0-9) and return the labels (N,) uint8."""
    if len(data) == 0 or len(data) % RECORD_BYTES:
        raise InputError(
            f"{name}: {len(data)} bytes is not a whole number of {RECORD_BYTES}-byte records "
            f"(truncated or not a CIFAR-10 binary batch)"
        )
    labels = np.frombuffer(data, dtype=np.uint8)[::RECORD_BYTES].copy()
    bad = np.flatnonzero(labels >= NUM_LABELS)
    if bad.size:
        raise InputError(
            f"{name}: record {int(bad[0])} has label {int(labels[bad[0]])}, valid labels are 0-{NUM_LABELS - 1} "
            f"({bad.size} bad records)"
        )
    return labels


def decode_records(data: bytes | memoryview, name: str) -> tuple[np.ndarray, np.ndarray]:
    """The binary records -> (images (N, 32, 32, 3) HWC uint8, labels uint8), validated."""
    labels = check_records(data, name)
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, RECORD_BYTES)
    images = records[:, 1:].reshape(-1, CHANNELS, HEIGHT, WIDTH).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def parse_meta(data: bytes, name: str = META_FILE) -> list[str]:
    """batches.meta.txt: one class name per line, in label order (trailing blank lines allowed)."""
    try:
        names = [line.strip() for line in data.decode("utf-8").splitlines()]
    except UnicodeDecodeError:
        raise InputError(f"{name}: not UTF-8 text; expected one class name per line") from None
    while names and not names[-1]:
        names.pop()
    if not 1 <= len(names) <= NUM_LABELS or not all(names):
        raise InputError(f"{name}: expected 1-{NUM_LABELS} non-empty class names, one per line; got {names!r}")
    if len(set(names)) != len(names):
        raise InputError(f"{name}: duplicate class names in {names!r}")
    return names


def format_meta(classes: list[str] | tuple[str, ...]) -> bytes:
    return ("\n".join(classes) + "\n\n").encode()


def read_raw(folder: Path) -> tuple[Split, Split, list[str]]:
    """Read an extracted batches folder: (train, test, class names), all validated."""
    folder = Path(folder)
    missing = [f for f in EXPECTED_FILES if not (folder / f).is_file()]
    if missing:
        raise InputError(f"{folder}: missing {', '.join(missing)}")
    classes = parse_meta((folder / META_FILE).read_bytes(), str(folder / META_FILE))
    splits = []
    for name, files in (("train", TRAIN_FILES), ("test", (TEST_FILE,))):
        blobs = [(folder / f).read_bytes() for f in files]
        for f, blob in zip(files, blobs, strict=True):  # validate each file, so an error names it
            check_records(blob, str(folder / f))
        # then decode the split in one piece: one HWC copy, no second copy to concatenate
        images, labels = decode_records(b"".join(blobs), name)
        del blobs
        if labels.max() >= len(classes):
            raise InputError(f"{folder}: {name} has label {int(labels.max())} but {META_FILE} names {len(classes)} classes")
        splits.append(Split(images, labels, np.arange(len(labels), dtype=np.int64)))
    return splits[0], splits[1], classes


def batch_files(train_images: np.ndarray, train_labels: np.ndarray, test_images: np.ndarray,
                test_labels: np.ndarray, classes: list[str] | tuple[str, ...]) -> dict[str, bytes]:
    """The files of the batches folder: five near-equal train batches, the test batch, the meta."""
    files = {}
    for i, rows in enumerate(np.array_split(np.arange(len(train_labels)), len(TRAIN_FILES))):
        files[TRAIN_FILES[i]] = encode_records(train_images[rows], train_labels[rows])
    files[TEST_FILE] = encode_records(test_images, test_labels)
    files[META_FILE] = format_meta(classes)
    return files


def write_archive(out: Path | io.BytesIO, files: dict[str, bytes]) -> None:
    """A .tar.gz in the official layout, byte-identical for equal input (no timestamps)."""
    def _write(raw: io.IOBase) -> None:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz, \
                tarfile.open(fileobj=gz, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for name, data in sorted(files.items()):
                info = tarfile.TarInfo(f"{FOLDER}/{name}")
                info.size, info.mode, info.mtime = len(data), 0o644, 0
                tar.addfile(info, io.BytesIO(data))

    if isinstance(out, io.BytesIO):
        _write(out)
    else:
        with open(out, "wb") as raw:
            _write(raw)
