"""`cifarflow predict PATH...`: classify PNG/JPEG files and folders with an exported SavedModel.

A bad file is an error line naming it; the others are still classified, and the exit code is
1 at the end. Images that are not 32x32 are resized, with a warning. Inputs are untrusted: a
FIFO or device is refused unopened, folders are walked without following directory symlinks and
stop at data.max_members files and folders, a file larger than an image within
data.max_image_pixels can be is refused unread, and an image over data.max_image_pixels is refused
from its header, before any pixel is decoded. Images go through the model BATCH at a time: at most
one batch is held in memory, however many files are given.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import stat
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cifarflow.config import DataParams
from cifarflow.data.extract import file_kind, open_regular
from cifarflow.data.layout import HEIGHT, WIDTH
from cifarflow.errors import InputError

log = logging.getLogger(__name__)
EXTENSIONS = {".png", ".jpg", ".jpeg"}
FORMATS = ("PNG", "JPEG")  # the only decoders Pillow may pick, whatever a file's bytes claim to be
BATCH = 256
DEFAULT_MAX_FILES = DataParams.model_fields["max_members"].default
MAX_LABELS_BYTES = 1 << 20  # labels.txt names at most a few hundred classes


@dataclass
class Prediction:
    path: str
    label: str
    confidence: float
    top3: list[tuple[str, float]] = field(default_factory=list)


class _Budget:
    """Paths given and folder entries listed, counted: the walk stops at `limit` (data.max_members),
    so `cifarflow predict /` ends early with an error line instead of walking /proc."""

    def __init__(self, limit: int) -> None:
        self.limit, self.count, self.exceeded = limit, 0, False

    def take(self, errors: list[str], where: Path | str) -> bool:
        """Count one more; False (and the error line, once) when that is over the limit."""
        if self.count >= self.limit:
            if not self.exceeded:
                errors.append(
                    f"{where}: more than {self.limit:,} files and folders, over data.max_members={self.limit}; "
                    "stopped there, the rest is not classified (pass fewer or smaller folders, or raise it)"
                )
            self.exceeded = True
            return False
        self.count += 1
        return True


def expand(paths: list[Path], max_files: int = DEFAULT_MAX_FILES) -> tuple[list[Path], list[str]]:
    """Files as given; folders searched recursively for images, in sorted order. Also one error line
    per path that is missing or neither a regular file nor a folder (a FIFO, a device, a socket), and
    one when more than `max_files` paths and folder entries were met (the rest are not looked at)."""
    files: list[Path] = []
    errors: list[str] = []
    budget = _Budget(max_files)
    for path in paths:
        if not budget.take(errors, path):
            break
        try:
            mode = os.stat(path).st_mode  # never open() to find out: a FIFO would block
        except FileNotFoundError:
            errors.append(f"{path}: no such file or folder")
            continue
        except OSError as exc:
            errors.append(f"{path}: cannot read ({exc.strerror})")
            continue
        if stat.S_ISDIR(mode):
            found, bad = _walk(path, budget)
            files += found
            errors += bad
        elif stat.S_ISREG(mode):
            files.append(path)
        else:
            errors.append(f"{path}: is a {file_kind(mode)}, not an image file or folder")
        if budget.exceeded:
            break
    return files, errors


def _walk(folder: Path, budget: _Budget) -> tuple[list[Path], list[str]]:
    """The image files under `folder`, sorted. Symlinked folders are never descended into, so a
    symlink loop cannot make it run forever; a symlinked file is followed and must be a regular file.
    Every entry listed counts against `budget`, while the listing is read: a folder of millions of
    entries stops at the budget, not at the end of memory."""
    found: list[Path] = []
    errors: list[str] = []
    pending = [folder]
    while pending and not budget.exceeded:
        top = pending.pop()
        entries = []
        try:
            with os.scandir(top) as listing:
                for entry in listing:
                    if not budget.take(errors, folder):
                        break
                    entries.append(entry)
        except OSError as exc:
            errors.append(f"{top}: cannot read ({exc.strerror})")
        subfolders = []
        for entry in sorted(entries, key=lambda e: e.name):
            try:
                if entry.is_dir(follow_symlinks=False):
                    subfolders.append(Path(entry.path))
                    continue
            except OSError:
                pass
            if os.path.splitext(entry.name)[1].lower() not in EXTENSIONS:
                continue
            path = Path(entry.path)
            try:
                mode = os.stat(path).st_mode
            except OSError as exc:  # a dangling symlink, or one in a loop
                errors.append(f"{path}: cannot read ({exc.strerror})")
                continue
            if stat.S_ISREG(mode):
                found.append(path)
            elif not stat.S_ISDIR(mode):  # a symlink to a folder is not walked, and not an error either
                errors.append(f"{path}: is a {file_kind(mode)}, not an image file")
        pending += reversed(subfolders)  # depth first, in name order
    return sorted(found), errors


def load_image(path: Path, max_pixels: int) -> np.ndarray:
    """(32, 32, 3) uint8; other sizes are resized with a warning. A file larger than an image within
    `max_pixels` can be is refused unread, and an image over `max_pixels` from its header, before
    decoding. Raises InputError naming the file, whatever went wrong."""
    from PIL import Image

    from cifarflow.data.image_folder import check_image_bytes, pixel_limit

    try:
        with pixel_limit(max_pixels), open_regular(path) as f:  # Pillow's own check, at open; then explicit ones
            check_image_bytes(path, os.fstat(f.fileno()).st_size, max_pixels)  # before Pillow reads a byte
            with Image.open(f, formats=FORMATS) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise InputError(
                        f"{path}: image is {width}x{height}, over data.max_image_pixels={max_pixels} "
                        "(raise it in params.yaml if the image is genuine)"
                    )
                rgb = image.convert("RGB")
        if rgb.size != (WIDTH, HEIGHT):
            log.warning("%s: %dx%d, resized to %dx%d", path, *rgb.size, WIDTH, HEIGHT)
            rgb = rgb.resize((WIDTH, HEIGHT), Image.Resampling.BILINEAR)
        return np.asarray(rgb, dtype=np.uint8)
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError(
            f"{path}: image over data.max_image_pixels={max_pixels}, refused before decoding (raise "
            "it in params.yaml if the image is genuine)"
        ) from None
    except Exception as exc:  # whatever a decoder raises on hostile bytes is this file's error, not the batch's
        raise InputError(f"{path}: not a readable image ({exc.__class__.__name__})") from None


def default_model(registry_dir: Path) -> Path:
    """The registry's champion, checked complete; no champion is an error, never a silent fallback."""
    from cifarflow import registry

    champion = registry.current(registry_dir)
    if champion is None:
        raise InputError(
            f"{registry_dir}: the champion registry (export.champion_dir) has no champion; promote one "
            "(`cifarflow promote`) or choose a model with --model, e.g. --model data/export"
        )
    problems = registry.verify(champion)
    if problems:
        raise registry.RegistryError(
            f"{champion.path}: the champion is damaged ({'; '.join(problems[:5])}); "
            "roll back (`cifarflow promote --rollback`) or pass --model"
        )
    return champion.path


def read_labels(path: Path) -> list[str]:
    """labels.txt: one class name per line, in label order (a name may hold spaces: `sea lion`);
    trailing empty lines are dropped, and nothing else."""
    with open_regular(path) as f:
        data = f.read(MAX_LABELS_BYTES + 1)
    if len(data) > MAX_LABELS_BYTES:
        raise InputError(f"{path}: over {MAX_LABELS_BYTES:,} bytes; expected one class name per line")
    try:
        names = data.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text; expected one class name per line") from None
    while names and not names[-1]:
        names.pop()
    if not names or not all(names):
        raise InputError(f"{path}: expected one non-empty class name per line")
    return names


def load_model(model_dir: Path) -> tuple[list[str], Callable[[np.ndarray], np.ndarray]]:
    """The export's class names and its serving function: a uint8 batch in, probabilities out."""
    import tensorflow as tf

    saved = Path(model_dir) / "saved_model"
    labels_file = Path(model_dir) / "labels.txt"
    if not saved.is_dir() or not labels_file.is_file():
        raise InputError(f"{model_dir}: no saved_model/ and labels.txt; run export (or pass --model)")
    classes = read_labels(labels_file)
    signature = tf.saved_model.load(str(saved)).signatures["serving_default"]
    return classes, lambda batch: next(iter(signature(images=tf.constant(batch)).values())).numpy()


def load_images(files: list[Path], max_pixels: int) -> tuple[list[np.ndarray], list[str], list[str]]:
    """The readable images and their names, and one error line per file that is not."""
    images, names, errors = [], [], []
    for path in files:
        try:
            images.append(load_image(path, max_pixels))
            names.append(str(path))
        except InputError as exc:
            errors.append(str(exc))
    return images, names, errors


def batches(files: list[Path], max_pixels: int, errors: list[str]) -> Iterator[tuple[list[str], np.ndarray]]:
    """The readable images, BATCH at a time, with their names; one error line per unreadable file is
    appended to `errors`. Files are read as the batches are used: one batch in memory at a time."""
    names: list[str] = []
    images: list[np.ndarray] = []
    for path in files:
        try:
            images.append(load_image(path, max_pixels))
        except InputError as exc:
            errors.append(str(exc))
            continue
        names.append(str(path))
        if len(images) >= BATCH:
            yield names, np.stack(images)
            names, images = [], []
    if images:
        yield names, np.stack(images)


def classify(model_dir: Path, files: list[Path], max_pixels: int) -> tuple[list[Prediction], list[str]]:
    """Predictions for the readable files, and one error line per unreadable one. The images go
    through the model a batch at a time, as they are read."""
    classes, serve = load_model(model_dir)
    results: list[Prediction] = []
    errors: list[str] = []
    for names, images in batches(files, max_pixels, errors):
        probs = serve(images)
        if probs.ndim != 2 or probs.shape[1] != len(classes):
            raise InputError(
                f"{model_dir}: the model gives {probs.shape[-1]} scores per image but labels.txt names "
                f"{len(classes)} classes; export the model again"
            )
        for name, row in zip(names, probs, strict=True):
            order = np.argsort(-row)[:3]
            results.append(
                Prediction(name, classes[order[0]], float(row[order[0]]), [(classes[i], round(float(row[i]), 4)) for i in order])
            )
    return results, errors


def render(results: list[Prediction], fmt: str) -> str:
    if fmt == "json":
        return (
            json.dumps(
                [
                    {
                        "path": r.path,
                        "label": r.label,
                        "confidence": round(r.confidence, 4),
                        "top3": [{"label": label, "p": p} for label, p in r.top3],
                    }
                    for r in results
                ],
                indent=2,
            )
            + "\n"
        )
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["path", "label", "confidence", "top3"])
        for r in results:
            writer.writerow([r.path, r.label, f"{r.confidence:.4f}", " ".join(f"{label}:{p:.4f}" for label, p in r.top3)])
        return buffer.getvalue()
    width = max([len(r.path) for r in results] + [4])
    lines = [f"{'path':<{width}}  {'label':<10}  {'conf':>6}  top-3"]
    for r in results:
        top = ", ".join(f"{label} {p:.2f}" for label, p in r.top3)
        lines.append(f"{r.path:<{width}}  {r.label:<10}  {r.confidence:>6.3f}  {top}")
    return "\n".join(lines) + "\n"


def run(paths: list[Path], model_dir: Path, fmt: str, max_image_pixels: int, max_files: int = DEFAULT_MAX_FILES) -> int:
    """Classify `paths` (at most `max_files` files and folder entries, data.max_members)."""
    files, errors = expand(paths, max_files)
    results, unreadable = classify(model_dir, files, max_image_pixels)
    errors += unreadable
    sys.stdout.write(render(results, fmt))
    for line in errors:
        print(f"error: {line}", file=sys.stderr)
    return 1 if errors else 0
