"""Safe, bounded reading of a CIFAR-10 archive: every member is checked before anything is read.

Nothing is extracted by tarfile itself: the expected batch files are read into memory and
written by the caller under fixed names, so a member name can never choose where bytes go.
Decompression happens here, outside tarfile, so that every decompressed byte (skipped members
and tar headers included) is counted against data.max_extract_mb and every header against
data.max_members: a gzip bomb or a million-header tar stops at the cap, not at the end of memory.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from cifarflow.data import cifar_binary as cb
from cifarflow.errors import InputError
from cifarflow.openfile import open_regular
from cifarflow.settings import DataParams

DEFAULT_MAX_EXTRACT = DataParams.model_fields["max_extract_mb"].default << 20
DEFAULT_MAX_MEMBERS = DataParams.model_fields["max_members"].default
READ = 1 << 20  # member bytes per read: the cap is checked between reads, not after a whole member
# Compressed formats by magic number; anything else is read as a plain tar.
DECOMPRESSORS: tuple[tuple[bytes, Callable[[IO[bytes]], IO[bytes]]], ...] = (
    (b"\x1f\x8b", lambda f: gzip.GzipFile(fileobj=f, mode="rb")),
    (b"BZh", bz2.BZ2File),
    (b"\xfd7zXZ\x00", lzma.LZMAFile),
)
MAX_META_BYTES = 1 << 20  # one pax or GNU long-name header holds names and attributes, never megabytes
MAX_META_CHAIN = 32  # such headers in a row before a member
META_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)
WANTED = frozenset((*cb.EXPECTED_FILES, cb.SYNTH_MARKER))  # read; every other member is skipped (but counted)


class _BadHeader(Exception):
    """A metadata header that tarfile would read whole, or follow recursively, past sane bounds."""


class _CheckedTarInfo(tarfile.TarInfo):
    """tarfile reads the data of a pax or GNU long-name header into memory in one piece, and follows
    chains of them recursively, all before it yields the member they describe: this is where both
    can be bounded. (_proc_member is tarfile's hook for each header read, subclassed via tarinfo=.)"""

    def _proc_member(self, archive: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in META_TYPES:
            chain = getattr(archive, "_cifarflow_meta_chain", 0) + 1
            archive._cifarflow_meta_chain = chain  # headers in a row, kept on the archive being read
            if self.size > MAX_META_BYTES:
                raise _BadHeader(f"a pax or long-name header of {self.size:,} bytes (at most {MAX_META_BYTES:,})")
            if chain > MAX_META_CHAIN:
                raise _BadHeader(f"more than {MAX_META_CHAIN} pax or long-name headers in a row")
        else:
            archive._cifarflow_meta_chain = 0
        return super()._proc_member(archive)


class _Counted:
    """The decompressed tar stream, counted: a read past `limit` bytes in total is an InputError,
    and no read ever asks the decompressor for more than the cap leaves."""

    def __init__(self, inner: IO[bytes], limit: int, label: str) -> None:
        self.inner, self.limit, self.label, self.count = inner, limit, label, 0

    def read(self, size: int | None = -1) -> bytes:
        left = self.limit + 1 - self.count  # one byte more than allowed proves the cap was passed
        data = self.inner.read(left if size is None or size < 0 else min(size, left))
        self.count += len(data)
        if self.count > self.limit:
            raise InputError(
                f"{self.label}: decompresses to more than {self.limit:,} bytes, over "
                f"data.max_extract_mb={self.limit >> 20}; raise it if this archive is genuine"
            )
        return data


def check_member(member: tarfile.TarInfo, archive: str, max_member_bytes: int) -> None:
    """Reject absolute paths, '..', links, devices, sparse and oversized members, naming the member."""
    name = member.name
    where = f"{archive}: member {name[:200]!r}"
    # Plain string tests, not pathlib: this runs once per header, up to data.max_members times.
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise InputError(f"{where} has an absolute path; refusing to read this archive")
    if ".." in name.replace("\\", "/").split("/"):
        raise InputError(f"{where} contains '..' (path traversal); refusing to read this archive")
    if member.issym() or member.islnk():
        raise InputError(f"{where} is a link (to {member.linkname[:200]!r}); refusing to read this archive")
    if member.ischr() or member.isblk() or member.isfifo() or member.isdev():
        raise InputError(f"{where} is a device or fifo; refusing to read this archive")
    if not (member.isfile() or member.isdir()):
        raise InputError(f"{where} is not a regular file or folder; refusing to read this archive")
    if member.issparse():  # its declared size is not what the archive holds: zeros out of nothing
        raise InputError(f"{where} is a sparse file; refusing to read this archive")
    if member.size > max_member_bytes:
        raise InputError(
            f"{where} is {member.size} bytes, over the limit of {max_member_bytes} "
            f"(data.max_member_mb={max_member_bytes >> 20}; raise it if this archive is genuine)"
        )


@dataclass(frozen=True)
class Archive:
    files: dict[str, bytes]  # the expected batch files, by file name
    marker: str | None  # the first line of cb.SYNTH_MARKER when the archive holds it (a generated archive)


def read_batches(
    archive: Path | IO[bytes],
    max_member_bytes: int,
    label: str | None = None,
    *,
    max_extract_bytes: int = DEFAULT_MAX_EXTRACT,
    max_members: int = DEFAULT_MAX_MEMBERS,
) -> dict[str, bytes]:
    """The expected batch files of a .tar(.gz|.bz2|.xz) archive, by file name, reading at most
    `max_extract_bytes` decompressed bytes and `max_members` headers."""
    return read_archive(archive, max_member_bytes, label, max_extract_bytes=max_extract_bytes, max_members=max_members).files


def read_archive(
    archive: Path | IO[bytes],
    max_member_bytes: int,
    label: str | None = None,
    *,
    max_extract_bytes: int = DEFAULT_MAX_EXTRACT,
    max_members: int = DEFAULT_MAX_MEMBERS,
) -> Archive:
    """read_batches, and whether the archive is a generated one: the cb.SYNTH_MARKER member is read
    when present (at most cb.MAX_MARKER_BYTES), never required."""
    label = label or str(archive)
    if isinstance(archive, Path):
        try:
            with open_regular(archive) as f:
                return read_archive(f, max_member_bytes, label, max_extract_bytes=max_extract_bytes, max_members=max_members)
        except OSError as exc:
            raise InputError(f"{label}: cannot open ({exc.strerror or exc})") from None
    files: dict[str, bytes] = {}
    marker: bytes | None = None
    try:
        head = archive.read(6)
        archive.seek(0)
        opener = next((cls for magic, cls in DECOMPRESSORS if head.startswith(magic)), None)
        raw = opener(archive) if opener else archive
        stream = _Counted(raw, max_extract_bytes, label)
        # Stream mode: tarfile reads forward only, through our counter, and never seeks back.
        with tarfile.open(fileobj=stream, mode="r|", tarinfo=_CheckedTarInfo) as tar:
            for count, member in enumerate(tar, 1):
                if count > max_members:
                    raise InputError(
                        f"{label}: more than {max_members:,} members, over data.max_members="
                        f"{max_members}; a CIFAR-10 archive holds {len(cb.EXPECTED_FILES) + 1} (its folder and "
                        f"{len(cb.EXPECTED_FILES)} files)"
                    )
                check_member(member, label, max_member_bytes)
                if member.isfile() and member.offset_data + member.size > max_extract_bytes:
                    # Known from the header alone: fail before decompressing (or skipping) the data.
                    raise InputError(
                        f"{label}: member {member.name[:200]!r} ends at byte "
                        f"{member.offset_data + member.size:,} of the decompressed archive, over "
                        f"data.max_extract_mb={max_extract_bytes >> 20}; raise it if this archive is genuine"
                    )
                if not member.isfile() or member.name.rpartition("/")[2] not in WANTED:
                    continue
                path = PurePosixPath(member.name)
                if str(path.parent) not in (cb.FOLDER, "."):
                    continue
                if path.name in files or (path.name == cb.SYNTH_MARKER and marker is not None):
                    raise InputError(f"{label}: member {path.name} appears twice")
                if path.name != cb.SYNTH_MARKER:
                    files[path.name] = _read_member(tar, member, label)
                elif member.size > cb.MAX_MARKER_BYTES:
                    raise InputError(
                        f"{label}: member {member.name[:200]!r} is {member.size:,} bytes; the marker of a "
                        f"generated archive holds one line (at most {cb.MAX_MARKER_BYTES:,} bytes)"
                    )
                else:
                    marker = _read_member(tar, member, label)
    except (InputError, MemoryError):
        raise
    except _BadHeader as exc:
        raise InputError(f"{label}: {exc}; refusing to read this archive") from None
    except RecursionError:  # tarfile follows chained pax/GNU headers recursively
        raise InputError(f"{label}: too many chained tar headers; not a readable tar archive") from None
    except Exception as exc:  # whatever tarfile, gzip, bz2 or lzma raise on hostile bytes is bad input
        raise InputError(
            f"{label}: not a readable tar archive, or truncated ({exc.__class__.__name__}: {str(exc)[:200]})"
        ) from None
    missing = [f for f in cb.EXPECTED_FILES if f not in files]
    if missing:
        raise InputError(
            f"{label}: missing {', '.join(missing)}; a CIFAR-10 binary archive holds "
            f"{cb.FOLDER}/{{{', '.join(cb.EXPECTED_FILES)}}}"
        )
    if marker is None:
        return Archive(files, None)
    lines = marker.decode("utf-8", "replace").splitlines()
    return Archive(files, lines[0].strip()[:200] if lines else "")


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo, label: str) -> bytes:
    handle = tar.extractfile(member)
    assert handle is not None  # isfile() members always have data
    blocks, size = [], 0
    while block := handle.read(min(READ, member.size - size + 1)):
        size += len(block)
        if size > member.size:  # cannot happen for a non-sparse member; never trust it blindly
            raise InputError(f"{label}: member {member.name[:200]!r} holds more than its declared {member.size} bytes")
        blocks.append(block)
    if size != member.size:
        raise InputError(f"{label}: member {member.name[:200]!r} is truncated ({size} of {member.size} bytes)")
    return b"".join(blocks)
