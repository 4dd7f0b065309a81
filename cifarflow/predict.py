"""`cifarflow predict PATH...`: classify PNG/JPEG files and folders with an exported SavedModel.

A bad file is an error line naming it; the others are still classified, and the exit code is
1 at the end. Images that are not 32x32 are resized, with a warning. Inputs are untrusted: a
FIFO or device is refused unopened, folders are walked without following directory symlinks and
stop at data.max_members files and folders, a file larger than an image within
data.max_image_pixels can be is refused unread, and an image over data.max_image_pixels is refused
from its header, before any pixel is decoded. Images go through the model SERVING_BATCH at a time: at most
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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cifarflow.contract import LABELS, SAVED_MODEL, read_card
from cifarflow.data.cifar_binary import check_class_names
from cifarflow.data.image_file import EXTENSIONS, Budget, decode, pixel_limit
from cifarflow.errors import InputError
from cifarflow.openfile import file_kind, read_regular
from cifarflow.serving import SERVING_BATCH, ServedModel, open_export
from cifarflow.settings import DataParams
from cifarflow.sources import SYNTH

log = logging.getLogger(__name__)
DEFAULT_MAX_FILES = DataParams.model_fields["max_members"].default
DEFAULT_MAX_CHUNKS = DataParams.model_fields["max_image_chunks"].default
MAX_LABELS_BYTES = 1 << 20  # labels.json names at most a few hundred classes


@dataclass
class Prediction:
    path: str
    label: str
    confidence: float
    top3: list[tuple[str, float]] = field(default_factory=list)


def expand(paths: list[Path], max_files: int = DEFAULT_MAX_FILES) -> tuple[list[Path], list[str]]:
    """Files as given; folders searched recursively for images, in sorted order. Also one error line
    per path that is missing or neither a regular file nor a folder (a FIFO, a device, a socket), and
    one when more than `max_files` paths and folder entries were met (the rest are not looked at)."""
    files: list[Path] = []
    errors: list[str] = []
    budget = Budget(max_files)
    for path in paths:
        if not budget.take():
            errors.append(budget.message(path))
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
            errors.append(budget.message(path))
            break
    return files, errors


def _walk(folder: Path, budget: Budget) -> tuple[list[Path], list[str]]:
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
                    if not budget.take():
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
    """labels.json: the class names in label order, as a JSON list (a name may hold spaces, `sea lion`;
    none can split into two), checked by the rules the data stages apply to them."""
    data = read_regular(Path(path), MAX_LABELS_BYTES, what="a JSON list of class names")
    try:
        names = json.loads(data)
    except (ValueError, RecursionError):
        raise InputError(f"{path}: not JSON; expected a list of class names") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise InputError(f"{path}: expected a JSON list of class names")
    check_class_names(names, str(path))
    return names


def load_model(model_dir: Path) -> tuple[list[str], ServedModel]:
    """The export's class names and its served model, once the export is checked to serve what its
    card claims (serving.check_served: no file swapped, added or removed)."""
    saved, labels_file = Path(model_dir) / SAVED_MODEL, Path(model_dir) / LABELS
    if not saved.is_dir() or not labels_file.is_file():
        raise InputError(f"{model_dir}: no {SAVED_MODEL}/ and {LABELS}; run export (or pass --model)")
    served = open_export(model_dir)
    if read_card(model_dir).get("data_source_kind") == SYNTH:
        log.warning(
            "%s was trained and tested on generated data (data.source synth:..., as in the smoke profile), "
            "not on photographs: its labels for real images mean nothing",
            model_dir,
        )
    return read_labels(labels_file), served


def batches(
    files: list[Path], max_pixels: int, errors: list[str], max_chunks: int = DEFAULT_MAX_CHUNKS
) -> Iterator[tuple[list[str], np.ndarray]]:
    """The readable images, SERVING_BATCH at a time, with their names; one error line per unreadable file is
    appended to `errors`. Files are read as the batches are used: one batch in memory at a time."""
    names: list[str] = []
    images: list[np.ndarray] = []
    for path in files:
        try:
            with pixel_limit(max_pixels):  # per file: the generator's consumer runs between files
                images.append(decode(path, max_pixels, resize=True, max_chunks=max_chunks))
        except InputError as exc:
            errors.append(str(exc))
            continue
        names.append(str(path))
        if len(images) >= SERVING_BATCH:
            yield names, np.stack(images)
            names, images = [], []
    if images:
        yield names, np.stack(images)


def classify(
    model_dir: Path, files: list[Path], max_pixels: int, max_chunks: int = DEFAULT_MAX_CHUNKS
) -> tuple[list[Prediction], list[str]]:
    """Predictions for the readable files, and one error line per unreadable one. The images go
    through the model a batch at a time, as they are read."""
    classes, model = load_model(model_dir)
    results: list[Prediction] = []
    errors: list[str] = []
    for names, images in batches(files, max_pixels, errors, max_chunks):
        probs = model.probabilities(images)
        if not np.isfinite(probs).all():
            raise InputError(f"{model_dir}: the model gives non-finite outputs (NaN or infinite); it is broken: export it again")
        if probs.ndim != 2 or probs.shape[1] != len(classes):
            raise InputError(
                f"{model_dir}: the model gives {probs.shape[-1]} scores per image but {LABELS} names "
                f"{len(classes)} classes; export the model again"
            )
        for name, row in zip(names, probs, strict=True):
            order = np.argsort(-row)[:3]
            results.append(
                Prediction(name, classes[order[0]], float(row[order[0]]), [(classes[i], round(float(row[i]), 4)) for i in order])
            )
    return results, errors


# A spreadsheet runs a cell that starts with one of these as a formula (OWASP's CSV injection list).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def shown(text: str | Path) -> str:
    """`text` as one printable line: bytes that are not UTF-8 (a file name may hold any) as \\xNN, and
    every control, line-separator, bidi or other non-printable character as its escape (\\n, \\x1b,
    \\u202e): no name can start a line of its own, move the cursor, reorder text or fail to encode."""
    decoded = os.fsencode(str(text)).decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in decoded)


def csv_cell(text: str) -> str:
    """A cell a spreadsheet shows as text: one that would start a formula gets a leading apostrophe."""
    return f"'{text}" if text.startswith(FORMULA_STARTS) else text


def render(results: list[Prediction], fmt: str) -> str:
    """The predictions as a table, JSON or CSV; every path and label shown escaped (`shown`), and CSV
    cells kept from being run as formulas (`csv_cell`)."""
    results = [Prediction(shown(r.path), shown(r.label), r.confidence, [(shown(lb), p) for lb, p in r.top3]) for r in results]
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
                allow_nan=False,
            )
            + "\n"
        )
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["path", "label", "confidence", "top3"])
        for r in results:
            top = " ".join(f"{label}:{p:.4f}" for label, p in r.top3)
            writer.writerow([csv_cell(r.path), csv_cell(r.label), f"{r.confidence:.4f}", csv_cell(top)])
        return buffer.getvalue()
    width = max([len(r.path) for r in results] + [4])
    lines = [f"{'path':<{width}}  {'label':<10}  {'conf':>6}  top-3"]
    for r in results:
        top = ", ".join(f"{label} {p:.2f}" for label, p in r.top3)
        lines.append(f"{r.path:<{width}}  {r.label:<10}  {r.confidence:>6.3f}  {top}")
    return "\n".join(lines) + "\n"


def run(
    paths: list[Path],
    model_dir: Path,
    fmt: str,
    max_image_pixels: int,
    max_files: int = DEFAULT_MAX_FILES,
    max_chunks: int = DEFAULT_MAX_CHUNKS,
) -> int:
    """Classify `paths` (at most `max_files` files and folder entries, data.max_members; images within
    data.max_image_pixels and data.max_image_chunks)."""
    files, errors = expand(paths, max_files)
    results, unreadable = classify(model_dir, files, max_image_pixels, max_chunks) if files else ([], [])
    errors += unreadable
    if results or fmt != "table":  # JSON and CSV stay well-formed when empty; a table with no rows is not shown
        sys.stdout.write(render(results, fmt))
    sys.stdout.flush()  # a full or closed output is found here, as the CLI's error, not at exit
    for line in errors:
        print(f"error: {shown(line)}", file=sys.stderr)
    return 1 if errors else 0
