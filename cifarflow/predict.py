"""`cifarflow predict PATH...`: classify PNG/JPEG files and folders with an exported SavedModel.

A bad file is an error line naming it; the others are still classified, and the exit code is
1 at the end. Images that are not 32x32 are resized, with a warning.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cifarflow.errors import InputError

log = logging.getLogger(__name__)
EXTENSIONS = {".png", ".jpg", ".jpeg"}
BATCH = 256


@dataclass
class Prediction:
    path: str
    label: str
    confidence: float
    top3: list[tuple[str, float]] = field(default_factory=list)


def expand(paths: list[Path]) -> list[Path]:
    """Files as given; folders searched recursively for images, in sorted order."""
    files = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())
        else:
            files.append(path)
    return files


def load_image(path: Path) -> np.ndarray:
    """(32, 32, 3) uint8; other sizes are resized with a warning. Raises InputError naming the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
            if rgb.size != (32, 32):
                log.warning("%s: %dx%d, resized to 32x32", path, *rgb.size)
                rgb = rgb.resize((32, 32), Image.Resampling.BILINEAR)
            return np.asarray(rgb, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"{path}: not a readable image ({exc.__class__.__name__})") from None


def default_model(champion: Path, export: Path) -> Path:
    return champion if (champion / "saved_model").is_dir() else export


def classify(model_dir: Path, files: list[Path]) -> tuple[list[Prediction], list[str]]:
    """Predictions for the readable files, and one error line per unreadable one."""
    import tensorflow as tf

    saved = Path(model_dir) / "saved_model"
    labels_file = Path(model_dir) / "labels.txt"
    if not saved.is_dir() or not labels_file.is_file():
        raise InputError(f"{model_dir}: no saved_model/ and labels.txt; run export (or pass --model)")
    classes = labels_file.read_text().split()
    serve = tf.saved_model.load(str(saved)).signatures["serving_default"]
    images, names, errors = [], [], []
    for path in files:
        try:
            images.append(load_image(path))
            names.append(str(path))
        except InputError as exc:
            errors.append(str(exc))
    results = []
    for start in range(0, len(images), BATCH):
        batch = tf.constant(np.stack(images[start:start + BATCH]))
        probs = next(iter(serve(images=batch).values())).numpy()
        for name, row in zip(names[start:start + BATCH], probs, strict=True):
            order = np.argsort(-row)[:3]
            results.append(Prediction(name, classes[order[0]], float(row[order[0]]),
                                      [(classes[i], round(float(row[i]), 4)) for i in order]))
    return results, errors


def render(results: list[Prediction], fmt: str) -> str:
    if fmt == "json":
        return json.dumps([{"path": r.path, "label": r.label, "confidence": round(r.confidence, 4),
                            "top3": [{"label": label, "p": p} for label, p in r.top3]} for r in results], indent=2) + "\n"
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


def run(paths: list[Path], model_dir: Path, fmt: str) -> int:
    files = expand(paths)
    missing = [p for p in paths if not p.exists()]
    results, errors = classify(model_dir, [f for f in files if f.exists()])
    errors = [f"{p}: no such file or folder" for p in missing] + errors
    sys.stdout.write(render(results, fmt))
    for line in errors:
        print(f"error: {line}", file=sys.stderr)
    return 1 if errors else 0
