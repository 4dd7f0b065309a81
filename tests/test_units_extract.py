"""Unit tests of cifarflow.data.extract: bounded, validating reads of (hostile) tar archives, in memory."""

from __future__ import annotations

import bz2
import io
import lzma
import os
import stat
import tarfile
from pathlib import Path

import pytest
from conftest import tar_gz, valid_members

from cifarflow import openfile
from cifarflow.data import cifar_binary as cb
from cifarflow.data import extract
from cifarflow.data.synth import synth_files
from cifarflow.errors import InputError

FILES = synth_files(20, 10, seed=3)
BIG = 1 << 30


def tar_bytes(members: list[tuple[tarfile.TarInfo, bytes | None]], fmt: int = tarfile.GNU_FORMAT) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def member(name: str, data: bytes | None = b"x", **attrs: object) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    for key, value in attrs.items():
        setattr(info, key, value)
    return info, data


def read(data: bytes, **kw: object) -> extract.Archive:
    return extract.read_archive(io.BytesIO(data), kw.pop("max_member_bytes", BIG), "arc", **kw)  # type: ignore[arg-type]


def test_file_kind_names_every_type() -> None:
    assert openfile.file_kind(stat.S_IFREG | 0o644) == "regular file"
    assert openfile.file_kind(stat.S_IFDIR) == "folder"
    assert openfile.file_kind(stat.S_IFIFO) == "FIFO (named pipe)"
    assert openfile.file_kind(stat.S_IFCHR) == "character device"
    assert openfile.file_kind(stat.S_IFBLK) == "block device"
    assert openfile.file_kind(stat.S_IFSOCK) == "socket"
    assert openfile.file_kind(stat.S_IFLNK) == "symlink"
    assert openfile.file_kind(0) == "special file"


def test_open_regular_opens_files_and_refuses_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    with openfile.open_regular(path) as f:
        assert f.read() == b"abc"
        assert os.get_blocking(f.fileno())
    with pytest.raises(openfile.NotRegularFile, match=rf"^{tmp_path}: is a folder, not a regular file$"):
        openfile.open_regular(tmp_path)
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(InputError, match=r"fifo: is a FIFO \(named pipe\), not a regular file"):
        openfile.open_regular(tmp_path / "fifo")


def test_a_valid_archive_yields_its_expected_files_in_any_compression() -> None:
    raw = tar_bytes(valid_members(FILES))
    for data in (raw, tar_gz(valid_members(FILES)), bz2.compress(raw), lzma.compress(raw)):
        archive = read(data)
        assert archive.files == {k: v for k, v in FILES.items() if k in cb.EXPECTED_FILES} and archive.marker is None
    assert extract.read_batches(io.BytesIO(raw), BIG) == archive.files


def test_files_at_the_top_level_count_other_folders_do_not() -> None:
    top = [member(name, data) for name, data in FILES.items()]
    assert set(read(tar_bytes(top)).files) == set(cb.EXPECTED_FILES)
    nested = [member(f"other/{name}", data) for name, data in FILES.items()]
    with pytest.raises(
        InputError,
        match=r"^arc: missing data_batch_1.bin, .*; a CIFAR-10 binary archive holds cifar-10-batches-bin/\{data_batch_1.bin, ",
    ):
        read(tar_bytes(nested))


def test_unwanted_and_folder_members_are_skipped_but_counted() -> None:
    members = [
        member("cifar-10-batches-bin", None, type=tarfile.DIRTYPE),
        member("cifar-10-batches-bin/readme.html", b"hi"),
        *valid_members(FILES),
    ]
    assert set(read(tar_bytes(members)).files) == set(cb.EXPECTED_FILES)
    assert read(tar_bytes(members), max_members=len(members)).marker is None
    with pytest.raises(
        InputError,
        match=rf"^arc: more than {len(members) - 1:,} members, over data.max_members={len(members) - 1}; "
        rf"a CIFAR-10 archive holds 8 \(its folder and 7 files\)$",
    ):
        read(tar_bytes(members), max_members=len(members) - 1)


def test_the_marker_of_a_generated_archive_is_read_not_required() -> None:
    marked = [*valid_members(FILES), member(f"{cb.FOLDER}/{cb.SYNTH_MARKER}", b"  generated thing  \nsecond line\n")]
    assert read(tar_bytes(marked)).marker == "generated thing"
    empty = [*valid_members(FILES), member(f"{cb.FOLDER}/{cb.SYNTH_MARKER}", b"")]
    assert read(tar_bytes(empty)).marker == ""
    exact = [*valid_members(FILES), member(f"{cb.FOLDER}/{cb.SYNTH_MARKER}", b"m" * cb.MAX_MARKER_BYTES)]
    assert read(tar_bytes(exact)).marker == "m" * 200
    big = [*valid_members(FILES), member(f"{cb.FOLDER}/{cb.SYNTH_MARKER}", b"m" * (cb.MAX_MARKER_BYTES + 1))]
    with pytest.raises(
        InputError, match=r"is 4,097 bytes; the marker of a generated archive holds one line \(at most 4,096 bytes\)"
    ):
        read(tar_bytes(big))
    twice = [*marked, member(f"{cb.FOLDER}/{cb.SYNTH_MARKER}", b"again")]
    with pytest.raises(InputError, match=rf"^arc: member {cb.SYNTH_MARKER} appears twice$"):
        read(tar_bytes(twice))


def test_a_batch_file_twice_is_refused() -> None:
    members = [*valid_members(FILES), member(f"{cb.FOLDER}/{cb.TEST_FILE}", b"zz")]
    with pytest.raises(InputError, match=r"^arc: member test_batch.bin appears twice$"):
        read(tar_bytes(members))


@pytest.mark.parametrize(
    ("name", "attrs", "message"),
    [
        ("/etc/x", {}, "has an absolute path"),
        ("\\x", {}, "has an absolute path"),
        ("C:x", {}, "has an absolute path"),
        ("a/../b", {}, r"contains '\.\.' \(path traversal\)"),
        ("a\\..\\b", {}, r"contains '\.\.'"),
        ("l", {"type": tarfile.SYMTYPE, "linkname": "/etc/passwd"}, r"is a link \(to '/etc/passwd'\)"),
        ("h", {"type": tarfile.LNKTYPE, "linkname": "x"}, r"is a link \(to 'x'\)"),
        ("c", {"type": tarfile.CHRTYPE}, "is a device or fifo"),
        ("b", {"type": tarfile.BLKTYPE}, "is a device or fifo"),
        ("f", {"type": tarfile.FIFOTYPE}, "is a device or fifo"),
        ("s", {"type": b"V"}, "is not a regular file or folder"),
        ("x:", {}, "has an absolute path"),
    ],
)
def test_check_member_refuses_escapes_links_and_specials(name: str, attrs: dict, message: str) -> None:
    info = tarfile.TarInfo(name)
    for key, value in attrs.items():
        setattr(info, key, value)
    with pytest.raises(
        InputError, match=rf"^arc: member {name[:200]!r}".replace("\\", "\\\\").replace("(", "\\(") + f" {message}"
    ):
        extract.check_member(info, "arc", 100)


def test_check_member_accepts_plain_names_and_bounds_the_size() -> None:
    for name in ("a", "a/b..c", "..a", "x", "a/b/c", "ab:"):
        extract.check_member(tarfile.TarInfo(name), "arc", 0)
    folder = tarfile.TarInfo("d")
    folder.type = tarfile.DIRTYPE
    extract.check_member(folder, "arc", 0)
    info = tarfile.TarInfo("a")
    info.size = 3 << 20
    extract.check_member(info, "arc", 3 << 20)
    with pytest.raises(
        InputError, match=r"^arc: member 'a' is 3145728 bytes, over the limit of 3145727 \(data.max_member_mb=2; raise it"
    ):
        extract.check_member(info, "arc", (3 << 20) - 1)
    long = tarfile.TarInfo("n" * 300)
    long.type = tarfile.SYMTYPE
    long.linkname = "t" * 300
    with pytest.raises(InputError) as caught:
        extract.check_member(long, "arc", 1)
    assert f"member {'n' * 200!r} is a link (to {'t' * 200!r})" in str(caught.value)


def test_check_member_refuses_sparse_members() -> None:
    info = tarfile.TarInfo("s")
    info.sparse = [(0, 1)]
    with pytest.raises(InputError, match=r"^arc: member 's' is a sparse file; refusing to read this archive$"):
        extract.check_member(info, "arc", 100)


def test_the_decompressed_size_is_capped_by_headers_and_by_counting() -> None:
    raw = tar_bytes(valid_members(FILES))
    needed = len(raw)
    assert read(tar_gz(valid_members(FILES)), max_extract_bytes=needed).files
    first, data = member(f"{cb.FOLDER}/{cb.TEST_FILE}", b"d" * 20000)
    ends = 512 + len(data)
    with pytest.raises(
        InputError,
        match=rf"^arc: member '{first.name}' ends at byte {ends:,} of the decompressed "
        rf"archive, over data.max_extract_mb=0; raise it if this archive is genuine$",
    ):
        read(tar_bytes([(first, data)]), max_extract_bytes=ends - 1)
    counted = extract._Counted(io.BytesIO(b"x" * 100), 10 << 20, "lab")
    assert counted.read(4) == b"xxxx" and counted.read() == b"x" * 96 and counted.count == 100
    tight = extract._Counted(io.BytesIO(b"x" * 100), 50, "lab")
    assert tight.read(50) == b"x" * 50
    with pytest.raises(
        InputError,
        match=r"^lab: decompresses to more than 50 bytes, over data.max_extract_mb=0; raise it if this archive is genuine$",
    ):
        tight.read(None)
    asked = extract._Counted(io.BytesIO(b"y" * 100), 20, "lab")
    with pytest.raises(InputError):
        asked.read()
    assert asked.count == 21  # never more than one byte past the cap is decompressed


def test_member_data_is_read_to_its_declared_size() -> None:
    data = bytes(range(256)) * 10000
    archive = read(
        tar_bytes(
            [
                *[(i, d) for i, d in valid_members(FILES) if not i.name.endswith(cb.TEST_FILE)],
                member(f"{cb.FOLDER}/{cb.TEST_FILE}", data),
            ]
        )
    )
    assert archive.files[cb.TEST_FILE] == data


def test_truncated_and_garbage_archives_are_input_errors() -> None:
    raw = tar_gz(valid_members(FILES))
    with pytest.raises(InputError, match=r"^arc: not a readable tar archive, or truncated \("):
        read(raw[: len(raw) // 2])
    with pytest.raises(InputError, match=r"not a readable tar archive, or truncated \(ReadError: "):
        read(b"\x00garbage" * 100)


def test_huge_or_chained_metadata_headers_are_refused() -> None:
    pax = tarfile.TarInfo(f"{cb.FOLDER}/{cb.TEST_FILE}")
    pax.pax_headers = {"comment": "c" * (extract.MAX_META_BYTES + 10)}
    data = tar_bytes([(pax, b"x")], fmt=tarfile.PAX_FORMAT)
    with pytest.raises(
        InputError, match=r"^arc: a pax or long-name header of [\d,]+ bytes \(at most 1,048,576\); refusing to read this archive$"
    ):
        read(data)
    small = tarfile.TarInfo(f"{cb.FOLDER}/x")
    small.pax_headers = {"comment": "c" * 1000}
    assert len(read(tar_bytes([(small, b"x"), *valid_members(FILES)], fmt=tarfile.PAX_FORMAT)).files) == 7


def test_missing_paths_and_unreadable_files_name_the_label(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"^nope: cannot open \(No such file or directory\)$"):
        extract.read_archive(tmp_path / "nope.tgz", BIG, "nope")
    path = tmp_path / "a.tgz"
    path.write_bytes(tar_gz(valid_members(FILES)))
    assert set(extract.read_archive(path, BIG).files) == set(cb.EXPECTED_FILES)
    with pytest.raises(InputError, match=rf"^{tmp_path}: is a folder"):
        extract.read_archive(tmp_path, BIG)


def test_read_batches_passes_its_label_and_caps_on() -> None:
    raw = tar_bytes(valid_members(FILES))
    with pytest.raises(InputError, match=r"^lab: decompresses to more than 1,000 bytes"):
        extract.read_batches(io.BytesIO(raw), BIG, "lab", max_extract_bytes=1000)
    with pytest.raises(InputError, match=r"^lab: more than 2 members"):
        extract.read_batches(io.BytesIO(raw), BIG, "lab", max_members=2)
