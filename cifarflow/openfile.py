"""Opening what the project reads: regular files only, never blocking, never unbounded.

A FIFO where params.yaml, a verdict or a manifest belongs would block a plain `open()` forever,
and /dev/zero would never end; every file the project reads goes through `open_regular` (or
`read_regular`, which also caps the bytes), so such a path is an error naming it, at once.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

from cifarflow.errors import CifarflowError, InputError

KINDS = (
    (stat.S_ISDIR, "folder"),
    (stat.S_ISFIFO, "FIFO (named pipe)"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
    (stat.S_ISSOCK, "socket"),
    (stat.S_ISLNK, "symlink"),
)


def file_kind(mode: int) -> str:
    """A person's name for the type in a stat mode ("FIFO (named pipe)", "character device", ...)."""
    if stat.S_ISREG(mode):
        return "regular file"
    return next((name for test, name in KINDS if test(mode)), "special file")


class NotRegularFile(InputError):
    """A path that is a FIFO, device, socket or folder where a regular file is needed."""

    def __init__(self, path: Path | str, mode: int) -> None:
        super().__init__(f"{path}: is a {file_kind(mode)}, not a regular file")


def open_regular(path: Path | str) -> BinaryIO:
    """`path` opened for reading if it is a regular file; NotRegularFile at once for a FIFO, device or
    socket. The type is checked before the open (stat) and again on the opened descriptor (fstat),
    and the open is non-blocking, so a FIFO swapped in between cannot block it either."""
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise NotRegularFile(path, mode)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFile(path, mode)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(
    path: Path,
    limit: int,
    *,
    missing: str = "not found",
    what: str = "a file",
    error: type[CifarflowError] = InputError,
) -> bytes:
    """At most `limit` bytes of the regular file `path`, else `error` naming it: missing (with the
    hint `missing`), not a regular file, unreadable, or larger than `limit`."""
    try:
        with open_regular(path) as f:
            data = f.read(limit + 1)
    except FileNotFoundError:
        raise error(f"{path}: {missing}") from None
    except NotRegularFile as exc:
        raise error(f"{exc}; expected {what}") from None
    except OSError as exc:
        raise error(f"{path}: cannot read ({exc.strerror or exc.__class__.__name__})") from None
    if len(data) > limit:
        raise error(f"{path}: larger than {limit:,} bytes; not {what}")
    return data
