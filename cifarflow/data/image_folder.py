"""Image-folder sources: `train/<class>/*.png|jpg` and `test/<class>/*.png|jpg`, 32x32 RGB.

Every image file's size is checked (max_image_bytes) before a byte of it is hashed or decoded."""

from __future__ import annotations

import hashlib
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from cifarflow.data import cifar_binary as cb
from cifarflow.data.image_file import EXTENSIONS, Budget, check_image_bytes, decode, pixel_limit
from cifarflow.errors import InputError
from cifarflow.openfile import file_kind, open_regular

SPLITS = ("train", "test")
HASH_READ = 1 << 20


def is_image_folder(path: Path) -> bool:
    return path.is_dir() and all((path / split).is_dir() for split in SPLITS)


def scan(folder: Path, budget: Budget, root: Path) -> list[os.DirEntry[str]]:
    """A folder's entries in name order, each counted against `budget` (an InputError naming `root`
    once over it)."""
    entries = []
    try:
        with os.scandir(folder) as listing:
            for entry in listing:
                if not budget.take():
                    raise InputError(budget.message(root))
                entries.append(entry)
    except OSError as exc:
        raise InputError(f"{folder}: unreadable folder ({exc.strerror})") from None
    return sorted(entries, key=lambda e: e.name)


def _inside(path: str, is_symlink: bool, real_root: str) -> None:
    """A symlink may point elsewhere in the folder, never out of it: an image folder from elsewhere
    must not pull other files of this machine into the dataset."""
    if is_symlink:
        target = os.path.realpath(path)
        if os.path.commonpath([target, real_root]) != real_root:
            raise InputError(
                f"{path}: a symlink to {target}, outside the image folder {real_root}; copy it into the folder instead"
            )


def _classes(folder: Path, budget: Budget, root: Path, real_root: str) -> list[str]:
    names = []
    for entry in scan(folder, budget, root):
        try:
            is_dir = entry.is_dir()  # follows a symlink, which _inside keeps within the folder; nothing recurses
        except OSError as exc:  # a symlink loop
            raise InputError(f"{entry.path}: unreadable ({exc.strerror})") from None
        if is_dir:
            if entry.name.startswith("."):  # .ipynb_checkpoints would become class 0 and shift every label
                raise InputError(f"{entry.path}: a hidden folder among the class folders; remove it or move it out")
            _inside(entry.path, entry.is_symlink(), real_root)
            names.append(entry.name)
    return names


def list_images(root: Path, max_files: int, max_pixels: int | None = None) -> tuple[list[str], dict[str, list[tuple[Path, int]]]]:
    """Class names (sorted folder names of train/) and, per split, (file, label) in a fixed order.
    Every image entry must be a regular file (or a symlink to one inside the folder), and with
    `max_pixels` no larger than max_image_bytes(max_pixels)."""
    real_root = os.path.realpath(root)
    for split in SPLITS:
        _inside(str(root / split), os.path.islink(root / split), real_root)
    budget = Budget(max_files)
    classes = _classes(root / "train", budget, root, real_root)
    if not 1 <= len(classes) <= cb.NUM_LABELS:
        raise InputError(f"{root / 'train'}: found {len(classes)} class folders; expected 1-{cb.NUM_LABELS}")
    cb.check_class_names(classes, f"{root / 'train'} (its class folders)")
    listing: dict[str, list[tuple[Path, int]]] = {}
    for split in SPLITS:
        found = classes if split == "train" else _classes(root / split, budget, root, real_root)
        if found != classes:
            raise InputError(
                f"{root / split}: class folders {found} differ from train's {classes}; both splits need the same classes"
            )
        files = []
        for label, name in enumerate(classes):
            before = len(files)
            for entry in scan(root / split / name, budget, root):
                if os.path.splitext(entry.name)[1].lower() not in EXTENSIONS:
                    continue
                _inside(entry.path, entry.is_symlink(), real_root)
                try:
                    info = entry.stat()  # follows a symlink; a loop or a dangling one is an OSError
                except OSError as exc:
                    raise InputError(f"{entry.path}: unreadable ({exc.strerror})") from None
                if not stat.S_ISREG(info.st_mode):
                    raise InputError(f"{entry.path}: is a {file_kind(info.st_mode)}, not an image file")
                if max_pixels is not None:  # before any file is hashed: a 200 GB sparse "image" costs a stat
                    check_image_bytes(entry.path, info.st_size, max_pixels)
                files.append((root / split / name / entry.name, label))
            if len(files) == before:  # a class with no examples would be learned as never happening
                raise InputError(f"{root / split / name}: no .png/.jpg images in this class folder")
        listing[split] = files
    return classes, listing


def _hash_file(digest: hashlib._Hash, path: Path, rel: str, max_pixels: int) -> None:
    """Feed `rel`, the size and the bytes of `path` to `digest`, streamed: no file is held whole, and
    none larger than an image within `max_pixels` may be (checked again on the open file)."""
    try:
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            check_image_bytes(path, size, max_pixels)
            digest.update(f"{rel}\0{size}\0".encode())
            done = 0
            while done < size and (block := f.read(min(HASH_READ, size - done))):
                digest.update(block)
                done += len(block)
    except OSError as exc:  # a FIFO or device swapped in is a NotRegularFile (InputError) from open_regular
        raise InputError(f"{path}: unreadable ({exc.strerror})") from None
    if done != size:
        raise InputError(f"{path}: changed while being read ({done} of {size} bytes)")


def read_image_folder(root: Path, *, max_files: int, max_pixels: int, max_chunks: int) -> tuple[dict[str, bytes], str]:
    """The batches folder's files for an image folder, and a sha256 of every file read. At most
    `max_files` entries are listed, no file over max_image_bytes(max_pixels) is read, and no image over
    `max_pixels` pixels or (a PNG) `max_chunks` chunks is decoded."""
    classes, listing = list_images(root, max_files, max_pixels)
    digest = hashlib.sha256()
    arrays = {}
    # Entered once here for every thread: the limit and the warning filters are process-wide.
    with pixel_limit(max_pixels), ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for split, files in listing.items():
            for path, _ in files:  # the content hash covers names, labels and bytes
                _hash_file(digest, path, path.relative_to(root).as_posix(), max_pixels)
            images = np.stack(
                list(pool.map(lambda p: decode(p, max_pixels, resize=False, max_chunks=max_chunks), [p for p, _ in files]))
            )
            arrays[split] = (images, np.array([label for _, label in files], dtype=np.uint8))
    files = cb.batch_files(*arrays["train"], *arrays["test"], classes)
    return files, digest.hexdigest()
