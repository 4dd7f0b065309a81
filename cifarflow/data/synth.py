"""A synthetic CIFAR-like archive for tests, CI and the smoke profile: learnable, tiny, offline.

Each class has a fixed prototype (oriented colour stripes); an image is its class's prototype,
shifted by a few pixels, plus per-pixel noise. Optionally a share of the labels is wrong (another
class's, in train and test alike), which caps any model's accuracy at 1 - that share: the smoke
profile uses it so that its models learn without saturating. The same arguments always give
byte-identical files.
The archive carries a marker member (cifar_binary.SYNTH_MARKER): it never passes for real data.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from cifarflow.data import cifar_binary as cb
from cifarflow.pixels import HEIGHT, IMAGE_SHAPE, WIDTH

NOISE_STD = 40.0  # pixel units: tiny models learn it in an epoch, yet do not reach 100%
MAX_SHIFT = 3  # pixels a prototype may move, so that a model must learn the pattern, not positions
CHUNK = 4096  # images generated per step, to bound memory for large archives


def prototypes() -> np.ndarray:
    """(10, 32, 32, 3) float32: class c has stripes at angle c·18° with its own colour pair."""
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    protos = np.empty((cb.NUM_LABELS, *IMAGE_SHAPE), np.float32)
    for c in range(cb.NUM_LABELS):
        angle = np.pi * c / cb.NUM_LABELS
        wave = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * (2 * np.pi / (6 + c % 3)))
        hue = 2 * np.pi * c / cb.NUM_LABELS
        colour = 0.5 + 0.5 * np.cos(hue + np.array([0, 2 * np.pi / 3, 4 * np.pi / 3], np.float32))
        protos[c] = 128 + 100 * wave[..., None] * (2 * colour - 1)
    return protos


def generate(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """n images (HWC uint8) with balanced, shuffled labels."""
    labels = rng.permutation(np.arange(n) % cb.NUM_LABELS).astype(np.uint8)
    protos = prototypes()
    images = np.empty((n, *IMAGE_SHAPE), np.uint8)
    for start in range(0, n, CHUNK):
        lab = labels[start : start + CHUNK]
        shifts = rng.integers(-MAX_SHIFT, MAX_SHIFT + 1, size=(len(lab), 2))
        noise = rng.normal(0.0, NOISE_STD, size=(len(lab), *IMAGE_SHAPE)).astype(np.float32)
        for i, (c, (dy, dx)) in enumerate(zip(lab, shifts, strict=True)):
            noise[i] += np.roll(protos[c], (dy, dx), axis=(0, 1))
        images[start : start + len(lab)] = np.clip(np.rint(noise), 0, 255).astype(np.uint8)
    return images, labels


def mislabel(labels: np.ndarray, percent: int, rng: np.random.Generator) -> np.ndarray:
    """A copy of `labels` where each label, with probability percent/100, is replaced by one of the
    other nine classes, uniformly: the image still shows its own class's pattern."""
    wrong = rng.random(len(labels)) < percent / 100
    out = labels.copy()
    out[wrong] = (labels[wrong] + rng.integers(1, cb.NUM_LABELS, int(wrong.sum()))) % cb.NUM_LABELS
    return out


def synth_files(train: int, test: int, seed: int, mislabel_percent: int = 0) -> dict[str, bytes]:
    """The batches folder's files for a generated dataset."""
    rng = np.random.default_rng(seed)
    x_train, y_train = generate(train, rng)
    x_test, y_test = generate(test, rng)
    if mislabel_percent:  # its own stream, so that the images are those of mislabel_percent=0
        flips = np.random.default_rng([seed, 1])
        y_train, y_test = mislabel(y_train, mislabel_percent, flips), mislabel(y_test, mislabel_percent, flips)
    return cb.batch_files(x_train, y_train, x_test, y_test, cb.CIFAR10_CLASSES)


def synth_archive_bytes(train: int, test: int, seed: int, mislabel_percent: int = 0) -> bytes:
    """The archive: the batches folder's files plus the SYNTH_MARKER member, which makes the
    download stage report the data as "synth" whichever source (path, file://, http) serves it."""
    buffer = io.BytesIO()
    files = synth_files(train, test, seed, mislabel_percent)
    cb.write_archive(buffer, {**files, cb.SYNTH_MARKER: cb.SYNTH_MARKER_TEXT})
    return buffer.getvalue()


def write_synth_archive(out: Path, train: int, test: int, seed: int, mislabel_percent: int = 0) -> None:
    from cifarflow.fileio import write_bytes_atomic

    write_bytes_atomic(Path(out), synth_archive_bytes(train, test, seed, mislabel_percent))
