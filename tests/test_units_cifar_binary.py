"""Unit tests of cifarflow.data.cifar_binary: the CIFAR-10 binary record layout, in memory."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest

from cifarflow.data import cifar_binary as cb
from cifarflow.errors import InputError


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


def test_records_are_a_label_byte_then_chw_planes() -> None:
    img = np.zeros((1, 32, 32, 3), np.uint8)
    img[0, 0, 1, 0], img[0, 2, 0, 1], img[0, 31, 31, 2] = 7, 8, 9  # red (0,1), green (2,0), blue (31,31)
    data = cb.encode_records(img, np.array([3]))
    assert len(data) == cb.RECORD_BYTES == 3073
    assert data[0] == 3 and data[1 + 1] == 7 and data[1 + 1024 + 2 * 32] == 8 and data[3072] == 9
    decoded, labels = cb.decode_records(data, "x")
    assert decoded.shape == (1, 32, 32, 3) and decoded.flags["C_CONTIGUOUS"]
    assert np.array_equal(decoded, img) and labels.tolist() == [3] and labels.dtype == np.uint8


def test_encode_decode_round_trip_many() -> None:
    imgs, labels = images(5), np.array([0, 9, 1, 5, 9], np.int64)
    decoded, got = cb.decode_records(cb.encode_records(imgs, labels), "x")
    assert np.array_equal(decoded, imgs) and got.tolist() == [0, 9, 1, 5, 9]


def test_check_records_refuses_partial_records_and_bad_labels() -> None:
    good = cb.encode_records(images(3), np.array([1, 2, 9]))
    assert cb.check_records(good, "b").tolist() == [1, 2, 9]
    assert cb.check_records(memoryview(good), "b").tolist() == [1, 2, 9]
    for size in (0, 1, cb.RECORD_BYTES - 1, cb.RECORD_BYTES + 1):
        with pytest.raises(InputError, match=rf"^b: {size} bytes is not a whole number of 3073-byte records \(truncated"):
            cb.check_records(good[:size] if size <= len(good) else good + b"x" * (size - len(good)), "b")
    bad = bytearray(good)
    bad[cb.RECORD_BYTES] = 10
    bad[2 * cb.RECORD_BYTES] = 255
    with pytest.raises(InputError, match=r"^b: record 1 has label 10, valid labels are 0-9 \(2 bad records\)$"):
        cb.check_records(bytes(bad), "b")


def test_meta_is_one_class_per_line_trailing_blanks_allowed() -> None:
    assert cb.parse_meta(b"cat\ndog\n\n\n") == ["cat", "dog"]
    with pytest.raises(InputError, match=r"class name ' cat ' holds .* leading or trailing space"):
        cb.parse_meta(b" cat \ndog\n")  # a space could make two names one, or shift nothing visibly
    assert cb.parse_meta(cb.format_meta(["a", "b"])) == ["a", "b"]
    assert cb.format_meta(("a", "b")) == b"a\nb\n\n"
    assert cb.parse_meta("\n".join(f"c{i}" for i in range(10)).encode()) == [f"c{i}" for i in range(10)]
    with pytest.raises(InputError, match=r"^m.txt: not UTF-8 text; expected one class name per line$"):
        cb.parse_meta(b"\xff", "m.txt")
    for data in (b"", b"\n\n", b"a\n\nb", "\n".join(f"c{i}" for i in range(11)).encode()):
        with pytest.raises(InputError, match=r"^batches.meta.txt: expected 1-10 non-empty class names; got"):
            cb.parse_meta(data)
    with pytest.raises(InputError, match=r"class names 'a' and 'a' are the same name"):
        cb.parse_meta(b"a\na\n")


def write_folder(
    folder: Path, train: int = 12, test: int = 4, classes: tuple[str, ...] = ("a", "b", "c")
) -> tuple[np.ndarray, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    tr, te = images(train, 1), images(test, 2)
    files = cb.batch_files(tr, np.arange(train) % len(classes), te, np.arange(test) % len(classes), classes)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return tr, te


def test_batch_files_split_train_in_five_near_equal_batches() -> None:
    files = cb.batch_files(images(12), np.zeros(12, np.uint8), images(3), np.ones(3, np.uint8), ["a", "b"])
    assert list(files) == [*cb.TRAIN_FILES, cb.TEST_FILE, cb.META_FILE]
    assert [len(files[f]) // cb.RECORD_BYTES for f in cb.TRAIN_FILES] == [3, 3, 2, 2, 2]
    assert len(files[cb.TEST_FILE]) == 3 * cb.RECORD_BYTES and files[cb.META_FILE] == b"a\nb\n\n"


def test_read_raw_returns_validated_splits_in_order(tmp_path: Path) -> None:
    tr, te = write_folder(tmp_path)
    train, test, classes = cb.read_raw(tmp_path)
    assert classes == ["a", "b", "c"] and len(train) == 12 and len(test) == 4
    assert np.array_equal(train.images, tr) and np.array_equal(test.images, te)
    assert train.labels.tolist() == [i % 3 for i in range(12)] and train.index.tolist() == list(range(12))
    assert train.index.dtype == np.int64
    part = train.take(np.array([5, 0]))
    assert part.index.tolist() == [5, 0] and part.labels.tolist() == [2, 0] and np.array_equal(part.images[1], tr[0])


def test_read_raw_names_the_missing_or_broken_file(tmp_path: Path) -> None:
    write_folder(tmp_path)
    (tmp_path / cb.TEST_FILE).unlink()
    (tmp_path / cb.META_FILE).unlink()
    with pytest.raises(InputError, match=rf"{tmp_path}: missing test_batch.bin, batches.meta.txt$"):
        cb.read_raw(tmp_path)
    write_folder(tmp_path)
    (tmp_path / "data_batch_3.bin").write_bytes(b"x" * 10)
    with pytest.raises(InputError, match=r"data_batch_3.bin: 10 bytes"):
        cb.read_raw(tmp_path)
    write_folder(tmp_path)
    (tmp_path / cb.META_FILE).write_bytes(b"a\nb\n")  # 2 classes, labels go to 2
    with pytest.raises(InputError, match=rf"{tmp_path}: train has label 2 but batches.meta.txt names 2 classes"):
        cb.read_raw(tmp_path)
    write_folder(tmp_path, classes=("a", "b", "c"))
    (tmp_path / cb.TEST_FILE).write_bytes(cb.encode_records(images(1), np.array([3])))
    with pytest.raises(InputError, match=r"test has label 3 but batches.meta.txt names 3 classes"):
        cb.read_raw(tmp_path)


def test_write_archive_is_deterministic_and_in_the_official_layout(tmp_path: Path) -> None:
    files = {"b.bin": b"bb", "a.bin": b"a"}
    buffer = io.BytesIO()
    cb.write_archive(buffer, files)
    cb.write_archive(tmp_path / "x.tgz", files)
    assert (tmp_path / "x.tgz").read_bytes() == buffer.getvalue()
    assert buffer.getvalue()[4:8] == b"\0\0\0\0"  # gzip mtime 0
    with tarfile.open(fileobj=io.BytesIO(buffer.getvalue())) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == ["cifar-10-batches-bin/a.bin", "cifar-10-batches-bin/b.bin"]
        assert all(m.mtime == 0 and m.mode == 0o644 and m.isfile() for m in members)
        assert tar.extractfile(members[1]).read() == b"bb"
    with open(tmp_path / "x.tgz", "rb") as f:
        assert f.read(2) == b"\x1f\x8b"
    buffer2 = io.BytesIO()
    cb.write_archive(buffer2, {"a.bin": b"a", "b.bin": b"bb"})
    assert buffer2.getvalue() == buffer.getvalue()


def test_errors_name_the_file_they_come_from(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"^data_batch_2.bin: 5 bytes"):
        cb.decode_records(b"12345", "data_batch_2.bin")
    write_folder(tmp_path)
    (tmp_path / cb.META_FILE).write_bytes(b"a\na\n")
    with pytest.raises(InputError, match=rf"^{tmp_path}/batches.meta.txt: class names 'a' and 'a' are the same name"):
        cb.read_raw(tmp_path)


def test_archives_carry_no_file_name_in_their_gzip_header(tmp_path: Path) -> None:
    cb.write_archive(tmp_path / "named.tgz", {"a": b"x"})
    header = (tmp_path / "named.tgz").read_bytes()[:10]
    assert header[:3] == b"\x1f\x8b\x08" and header[3] == 0  # no FNAME flag: same bytes whatever the output is called
