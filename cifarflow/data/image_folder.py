"""Image-folder sources: `train/<class>/*.png|jpg` and `test/<class>/*.png|jpg`, 32x32 RGB.

Every image file's size is checked (max_image_bytes) before a byte of it is hashed or decoded."""

from __future__ import annotations

import hashlib
import os
import stat
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from cifarflow.data import cifar_binary as cb
from cifarflow.data.extract import file_kind, open_regular
from cifarflow.data.layout import HEIGHT, WIDTH
from cifarflow.errors import InputError

EXTENSIONS = {".png", ".jpg", ".jpeg"}
FORMATS = ("PNG", "JPEG")  # the only decoders Pillow may pick, whatever the bytes claim to be
SPLITS = ("train", "test")
HASH_READ = 1 << 20
IMAGE_SLACK = 1 << 20  # metadata, palettes, poor compression: bytes an image file may hold beyond its pixels


def max_image_bytes(max_pixels: int) -> int:
    """The largest file a PNG/JPEG within `max_pixels` can be: 4 bytes a pixel (RGBA, uncompressed)
    plus IMAGE_SLACK. A larger one cannot be a legitimate image under the pixel cap."""
    return max_pixels * 4 + IMAGE_SLACK


def check_image_bytes(path: Path | str, size: int, max_pixels: int) -> None:
    """InputError naming `path` and the param if `size` bytes is more than an image may be."""
    cap = max_image_bytes(max_pixels)
    if size > cap:
        raise InputError(
            f"{path}: {size:,} bytes, over the {cap:,} bytes an image within "
            f"data.max_image_pixels={max_pixels} may have (4 bytes a pixel + 1 MiB); refused unread"
        )


@contextmanager
def pixel_limit(max_pixels: int) -> Iterator[None]:
    """Pillow's decompression-bomb limit set to `max_pixels`, and its warning (over the limit, under
    twice it) made an error, for the duration; both are process-wide, so both are restored after."""
    before = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = before


def is_image_folder(path: Path) -> bool:
    return path.is_dir() and all((path / split).is_dir() for split in SPLITS)


class _Budget:
    """Counts the folder entries listed, so a folder of millions of files stops at data.max_members."""

    def __init__(self, root: Path, limit: int) -> None:
        self.root, self.limit, self.count = root, limit, 0

    def scan(self, folder: Path) -> list[os.DirEntry[str]]:
        entries = []
        try:
            with os.scandir(folder) as listing:
                for entry in listing:
                    self.count += 1
                    if self.count > self.limit:
                        raise InputError(
                            f"{self.root}: more than {self.limit:,} files and folders, over "
                            f"data.max_members={self.limit}; raise it if this image folder is genuine"
                        )
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


def _classes(folder: Path, budget: _Budget, real_root: str) -> list[str]:
    names = []
    for entry in budget.scan(folder):
        try:
            is_dir = entry.is_dir()  # follows a symlink, which _inside keeps within the folder; nothing recurses
        except OSError as exc:  # a symlink loop
            raise InputError(f"{entry.path}: unreadable ({exc.strerror})") from None
        if is_dir:
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
    budget = _Budget(root, max_files)
    classes = _classes(root / "train", budget, real_root)
    if not 1 <= len(classes) <= cb.NUM_LABELS:
        raise InputError(f"{root / 'train'}: found {len(classes)} class folders; expected 1-{cb.NUM_LABELS}")
    listing: dict[str, list[tuple[Path, int]]] = {}
    for split in SPLITS:
        found = classes if split == "train" else _classes(root / split, budget, real_root)
        if found != classes:
            raise InputError(
                f"{root / split}: class folders {found} differ from train's {classes}; both splits need the same classes"
            )
        files = []
        for label, name in enumerate(classes):
            for entry in budget.scan(root / split / name):
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
        if not files:
            raise InputError(f"{root / split}: no .png/.jpg images found")
        listing[split] = files
    return classes, listing


def _decode(path: Path, max_pixels: int) -> np.ndarray:
    """The image as (32, 32, 3) uint8. Its byte size is checked before it is opened by Pillow, and its
    pixel size from the header before any pixel is decoded."""
    try:
        with open_regular(path) as f:
            check_image_bytes(path, os.fstat(f.fileno()).st_size, max_pixels)
            with Image.open(f, formats=FORMATS) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise InputError(f"{path}: image is {width}x{height}, over data.max_image_pixels={max_pixels}")
                if image.size != (WIDTH, HEIGHT):
                    raise InputError(f"{path}: image is {width}x{height}, expected 32x32")
                return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):  # Pillow's check, at open
        raise InputError(
            f"{path}: image over data.max_image_pixels={max_pixels}, refused before decoding "
            "(an image-folder image must be 32x32)"
        ) from None
    except Exception as exc:  # whatever a decoder raises on hostile bytes: this file is bad input
        raise InputError(f"{path}: unreadable image ({exc.__class__.__name__}: {str(exc)[:200]})") from None


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


def read_image_folder(root: Path, *, max_files: int, max_pixels: int) -> tuple[dict[str, bytes], str]:
    """The batches folder's files for an image folder, and a sha256 of every file read. At most
    `max_files` entries are listed, no file over max_image_bytes(max_pixels) is read and no image over
    `max_pixels` is decoded."""
    classes, listing = list_images(root, max_files, max_pixels)
    digest = hashlib.sha256()
    arrays = {}
    # Set once here, not per thread (the limit and the warning filters are process-wide).
    with pixel_limit(max_pixels), ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for split, files in listing.items():
            for path, _ in files:  # the content hash covers names, labels and bytes
                _hash_file(digest, path, path.relative_to(root).as_posix(), max_pixels)
            images = np.stack(list(pool.map(lambda p: _decode(p, max_pixels), [p for p, _ in files])))
            arrays[split] = (images, np.array([label for _, label in files], dtype=np.uint8))
    files = cb.batch_files(*arrays["train"], *arrays["test"], classes)
    return files, digest.hexdigest()
