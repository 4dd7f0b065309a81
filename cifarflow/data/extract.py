"""Safe reading of a CIFAR-10 archive: every member is checked before anything is read.

Nothing is extracted by tarfile itself: the expected batch files are read into memory and
written by the caller under fixed names, so a member name can never choose where bytes go.
"""

from __future__ import annotations

import tarfile
import zlib
from pathlib import Path, PurePosixPath
from typing import IO

from cifarflow.data import cifar_binary as cb
from cifarflow.errors import InputError


def check_member(member: tarfile.TarInfo, archive: str, max_member_bytes: int) -> None:
    """Reject absolute paths, '..', links, devices and oversized members, naming the member."""
    name = member.name
    where = f"{archive}: member {name!r}"
    if name.startswith(("/", "\\")) or PurePosixPath(name).is_absolute() or (len(name) > 1 and name[1] == ":"):
        raise InputError(f"{where} has an absolute path; refusing to read this archive")
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        raise InputError(f"{where} contains '..' (path traversal); refusing to read this archive")
    if member.issym() or member.islnk():
        raise InputError(f"{where} is a link (to {member.linkname!r}); refusing to read this archive")
    if member.ischr() or member.isblk() or member.isfifo() or member.isdev():
        raise InputError(f"{where} is a device or fifo; refusing to read this archive")
    if not (member.isfile() or member.isdir()):
        raise InputError(f"{where} is not a regular file or folder; refusing to read this archive")
    if member.size > max_member_bytes:
        raise InputError(
            f"{where} is {member.size} bytes, over the limit of {max_member_bytes} "
            f"(raise data.max_member_mb if this archive is genuine)"
        )


def read_batches(archive: Path | IO[bytes], max_member_bytes: int, label: str | None = None) -> dict[str, bytes]:
    """The expected batch files of a .tar(.gz|.bz2|.xz) archive, by file name."""
    label = label or str(archive)
    files: dict[str, bytes] = {}
    try:
        opened = (tarfile.open(fileobj=archive, mode="r:*") if not isinstance(archive, Path)
                  else tarfile.open(archive, mode="r:*"))
        with opened as tar:
            for member in tar:
                check_member(member, label, max_member_bytes)
                path = PurePosixPath(member.name)
                if not member.isfile() or path.name not in cb.EXPECTED_FILES:
                    continue
                if str(path.parent) not in (cb.FOLDER, "."):
                    continue
                if path.name in files:
                    raise InputError(f"{label}: member {path.name} appears twice")
                handle = tar.extractfile(member)
                assert handle is not None  # isfile() members always have data
                files[path.name] = handle.read()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise InputError(f"{label}: not a readable tar archive, or truncated ({exc})") from None
    missing = [f for f in cb.EXPECTED_FILES if f not in files]
    if missing:
        raise InputError(
            f"{label}: missing {', '.join(missing)}; a CIFAR-10 binary archive holds "
            f"{cb.FOLDER}/{{{', '.join(cb.EXPECTED_FILES)}}}"
        )
    return files
