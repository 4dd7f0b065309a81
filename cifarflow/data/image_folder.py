"""Image-folder sources: `train/<class>/*.png|jpg` and `test/<class>/*.png|jpg`, 32x32 RGB."""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from cifarflow.data import cifar_binary as cb
from cifarflow.errors import InputError

EXTENSIONS = {".png", ".jpg", ".jpeg"}
SPLITS = ("train", "test")


def is_image_folder(path: Path) -> bool:
    return path.is_dir() and all((path / split).is_dir() for split in SPLITS)


def list_images(root: Path) -> tuple[list[str], dict[str, list[tuple[Path, int]]]]:
    """Class names (sorted folder names of train/) and, per split, (file, label) in a fixed order."""
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    if not 1 <= len(classes) <= cb.NUM_LABELS:
        raise InputError(f"{root / 'train'}: found {len(classes)} class folders; expected 1-{cb.NUM_LABELS}")
    listing: dict[str, list[tuple[Path, int]]] = {}
    for split in SPLITS:
        found = sorted(p.name for p in (root / split).iterdir() if p.is_dir())
        if found != classes:
            raise InputError(
                f"{root / split}: class folders {found} differ from train's {classes}; both splits need the same classes"
            )
        files = []
        for label, name in enumerate(classes):
            folder = root / split / name
            files += [(p, label) for p in sorted(folder.iterdir()) if p.suffix.lower() in EXTENSIONS]
        if not files:
            raise InputError(f"{root / split}: no .png/.jpg images found")
        listing[split] = files
    return classes, listing


def _decode(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            if image.size != (cb.WIDTH, cb.HEIGHT):
                raise InputError(f"{path}: image is {image.size[0]}x{image.size[1]}, expected 32x32")
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"{path}: unreadable image ({exc})") from None


def read_image_folder(root: Path) -> tuple[dict[str, bytes], str]:
    """The batches folder's files for an image folder, and a sha256 of every file read."""
    classes, listing = list_images(root)
    digest = hashlib.sha256()
    arrays = {}
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for split, files in listing.items():
            for path, _ in files:  # the content hash covers names, labels and bytes
                data = path.read_bytes()
                digest.update(f"{path.relative_to(root).as_posix()}\0{len(data)}\0".encode())
                digest.update(data)
            images = np.stack(list(pool.map(_decode, [p for p, _ in files])))
            arrays[split] = (images, np.array([label for _, label in files], dtype=np.uint8))
    files = cb.batch_files(*arrays["train"], *arrays["test"], classes)
    return files, digest.hexdigest()
