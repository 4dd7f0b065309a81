"""The download stage: local, file:// and HTTP sources, retries with Range resume, mirrors,
checksums, safe extraction, image folders. Every failure leaves no output behind."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import TEST, TRAIN, Server, make_params, sha256, tar_gz, valid_members, write_params
from PIL import Image

from cifarflow.cli import main
from cifarflow.data import cifar_binary as cb
from cifarflow.data import download
from cifarflow.data.synth import synth_files
from cifarflow.errors import ConfigError, InputError, SourceUnavailableError


def run(tmp_path: Path, **data) -> dict:
    return download.run(make_params(**data), tmp_path / "raw", tmp_path / "cache", tmp_path / "run.json", backoff_s=0.01)


def assert_no_output(tmp_path: Path) -> None:
    assert not (tmp_path / "raw").exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".raw")]
    assert not leftovers
    cache = tmp_path / "cache"
    assert not cache.exists() or not any(cache.iterdir()), list(cache.iterdir())


def test_local_archive(tmp_path: Path, archive: Path, archive_bytes: bytes) -> None:
    manifest = run(tmp_path, source=str(archive), sha256=sha256(archive_bytes), md5=None)
    assert manifest["counts"] == {"train": TRAIN, "test": TEST}
    assert manifest["classes"] == list(cb.CIFAR10_CLASSES)
    assert manifest["content"]["sha256"] == sha256(archive_bytes)
    files = synth_files(TRAIN, TEST, seed=1)
    for name, data in files.items():
        assert (tmp_path / "raw" / cb.FOLDER / name).read_bytes() == data


def test_outputs_are_byte_identical_across_sources(
    tmp_path: Path, archive: Path, archive_bytes: bytes, http_server: Server
) -> None:
    """Whatever mirror served the content, the outputs are the same bytes."""
    run(tmp_path, source=str(archive), sha256=sha256(archive_bytes), md5=None)
    first = {p.name: p.read_bytes() for p in (tmp_path / "raw").rglob("*") if p.is_file()}
    http_server.files["/a.tgz"] = archive_bytes
    run(tmp_path, source=[http_server.url("/missing"), http_server.url("/a.tgz")], sha256=sha256(archive_bytes), md5=None)
    second = {p.name: p.read_bytes() for p in (tmp_path / "raw").rglob("*") if p.is_file()}
    assert first == second


def test_file_url(tmp_path: Path, archive: Path, archive_bytes: bytes) -> None:
    manifest = run(tmp_path, source=archive.as_uri(), md5=download.digests(archive)["md5"])
    assert manifest["counts"]["train"] == TRAIN


def test_http_download_and_cache(tmp_path: Path, archive_bytes: bytes, http_server: Server) -> None:
    http_server.files["/cifar.tgz"] = archive_bytes
    run(tmp_path, source=http_server.url("/cifar.tgz"), sha256=sha256(archive_bytes), md5=None)
    assert [e["status"] for e in http_server.log] == [200]
    run(tmp_path, source=http_server.url("/cifar.tgz"), sha256=sha256(archive_bytes), md5=None)
    assert len(http_server.log) == 1, "a verified archive in the cache is not fetched again"


def test_http_drop_mid_file_resumes_with_range(tmp_path: Path, archive_bytes: bytes, http_server: Server) -> None:
    http_server.files["/cifar.tgz"] = archive_bytes
    http_server.drop_after["/cifar.tgz"] = len(archive_bytes) // 3
    manifest = run(tmp_path, source=http_server.url("/cifar.tgz"), sha256=sha256(archive_bytes), md5=None)
    assert manifest["counts"]["train"] == TRAIN
    assert [e["status"] for e in http_server.log] == [200, 206]
    resumed_at = int(http_server.log[1]["range"].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at <= len(archive_bytes) // 3, "the retry resumed from what it had, not from zero"


def test_404_then_second_mirror(tmp_path: Path, archive_bytes: bytes, http_server: Server) -> None:
    http_server.files["/mirror2.tgz"] = archive_bytes
    run(tmp_path, source=[http_server.url("/gone.tgz"), http_server.url("/mirror2.tgz")], sha256=sha256(archive_bytes), md5=None)
    assert [(e["path"], e["status"]) for e in http_server.log] == [("/gone.tgz", 404), ("/mirror2.tgz", 200)]
    info = json.loads((tmp_path / "run.json").read_text())
    assert info["origin"].endswith("/mirror2.tgz") and "404" in info["failed_mirrors"][0]


def test_wrong_checksum_http_is_exit_2_and_leaves_nothing(
    tmp_path: Path, archive_bytes: bytes, http_server: Server, capsys
) -> None:
    http_server.files["/cifar.tgz"] = archive_bytes
    wrong = "0" * 64
    params = write_params(
        tmp_path, {"data": {"source": http_server.url("/cifar.tgz"), "sha256": wrong, "md5": None, "retries": 0}}
    )
    code = main(["--params", str(params), "download", "--out", str(tmp_path / "raw"), "--cache", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert code == 2
    assert f"expected {wrong}" in err and f"actual {sha256(archive_bytes)}" in err
    assert_no_output(tmp_path)


def test_wrong_checksum_local(tmp_path: Path, archive: Path) -> None:
    with pytest.raises(InputError, match="md5 mismatch: expected 0{32}"):
        run(tmp_path, source=str(archive), md5="0" * 32)
    assert_no_output(tmp_path)


def test_unreachable_source_names_source_and_param(tmp_path: Path, http_server: Server) -> None:
    url = http_server.url("/nothing.tgz")
    http_server.server_close()  # nothing listens there any more
    with pytest.raises(SourceUnavailableError) as raised:
        download.run(make_params(source=url, retries=1), tmp_path / "raw", tmp_path / "cache", backoff_s=0.01)
    assert url in str(raised.value) and "data.source" in str(raised.value)
    assert_no_output(tmp_path)


def test_missing_local_source(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file or folder"):
        run(tmp_path, source=str(tmp_path / "nope.tgz"), md5="0" * 32)


def test_synth_source(tmp_path: Path) -> None:
    manifest = run(tmp_path, source="synth:train=100,test=30,seed=3", md5=None, val_size=20, shards=2)
    assert manifest["kind"] == "synth" and manifest["counts"] == {"train": 100, "test": 30}


def test_existing_output_survives_a_failed_run(tmp_path: Path) -> None:
    run(tmp_path, source="synth:train=100,test=30,seed=3", md5=None, val_size=20, shards=2)
    before = (tmp_path / "raw" / "manifest.json").read_bytes()
    with pytest.raises(InputError):
        run(tmp_path, source=str(tmp_path / "nope.tgz"), md5="0" * 32)
    assert (tmp_path / "raw" / "manifest.json").read_bytes() == before


# --- malicious or broken archives ---------------------------------------------------------------


def member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


def bad_archive(tmp_path: Path, members) -> Path:
    path = tmp_path / "bad.tgz"
    path.write_bytes(tar_gz(members))
    return path


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ((member("../evil.txt"), b"x"), "path traversal"),
        ((member("cifar-10-batches-bin/../../evil"), b"x"), "path traversal"),
        ((member("/etc/evil"), b"x"), "absolute path"),
        ((member("cifar-10-batches-bin/link", tarfile.SYMTYPE, "/etc/passwd"), None), "is a link"),
        ((member("cifar-10-batches-bin/hard", tarfile.LNKTYPE, "cifar-10-batches-bin/test_batch.bin"), None), "is a link"),
        ((member("dev", tarfile.CHRTYPE), None), "device"),
        ((member("fifo", tarfile.FIFOTYPE), None), "device or fifo"),
    ],
)
def test_unsafe_members_are_refused(tmp_path: Path, extra, message: str) -> None:
    path = bad_archive(tmp_path, [extra, *valid_members()])
    with pytest.raises(InputError, match=message):
        run(tmp_path, source=str(path), allow_unverified=True, md5=None)
    assert_no_output(tmp_path)
    assert not (tmp_path.parent / "evil.txt").exists()


def test_oversized_member(tmp_path: Path) -> None:
    files = synth_files(TRAIN, TEST, seed=1)
    files["test_batch.bin"] = files["test_batch.bin"] * 400  # 20,000 records: 61 MB > 1 MB limit
    path = bad_archive(tmp_path, valid_members(files))
    with pytest.raises(InputError, match="over the limit"):
        run(tmp_path, source=str(path), allow_unverified=True, md5=None, max_member_mb=1)
    assert_no_output(tmp_path)


def test_truncated_batch_file(tmp_path: Path) -> None:
    files = synth_files(TRAIN, TEST, seed=1)
    files["data_batch_3.bin"] = files["data_batch_3.bin"][:-100]
    with pytest.raises(InputError, match=r"data_batch_3.bin: \d+ bytes is not a whole number of 3073-byte records"):
        run(tmp_path, source=str(bad_archive(tmp_path, valid_members(files))), allow_unverified=True, md5=None)
    assert_no_output(tmp_path)


def test_truncated_archive(tmp_path: Path, archive_bytes: bytes) -> None:
    path = tmp_path / "cut.tgz"
    path.write_bytes(archive_bytes[: len(archive_bytes) // 2])
    with pytest.raises(InputError, match="not a readable tar archive, or truncated"):
        run(tmp_path, source=str(path), allow_unverified=True, md5=None)
    assert_no_output(tmp_path)


def test_label_out_of_range(tmp_path: Path) -> None:
    files = synth_files(TRAIN, TEST, seed=1)
    test_batch = bytearray(files["test_batch.bin"])
    test_batch[5 * cb.RECORD_BYTES] = 12
    files["test_batch.bin"] = bytes(test_batch)
    with pytest.raises(InputError, match="test_batch.bin: record 5 has label 12, valid labels are 0-9"):
        run(tmp_path, source=str(bad_archive(tmp_path, valid_members(files))), allow_unverified=True, md5=None)
    assert_no_output(tmp_path)


def test_missing_batch(tmp_path: Path) -> None:
    files = synth_files(TRAIN, TEST, seed=1)
    del files["data_batch_5.bin"]
    with pytest.raises(InputError, match="missing data_batch_5.bin"):
        run(tmp_path, source=str(bad_archive(tmp_path, valid_members(files))), allow_unverified=True, md5=None)


def test_counts_are_reported_not_assumed(tmp_path: Path) -> None:
    manifest = run(tmp_path, source="synth:train=103,test=17,seed=3", md5=None, val_size=20, shards=2)
    assert sum(manifest["records"][f] for f in cb.TRAIN_FILES) == 103 and manifest["records"]["test_batch.bin"] == 17


# --- image folders ------------------------------------------------------------------------------


def image_folder(root: Path, per_class: int = 3, size: int = 32, classes=("cat", "dog", "frog")) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i:03d}.png")
    return root


def test_image_folder(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "folder")
    manifest = run(tmp_path, source=str(root), md5=None, allow_unverified=True)
    assert manifest["kind"] == "image-folder" and manifest["classes"] == ["cat", "dog", "frog"]
    assert manifest["counts"] == {"train": 9, "test": 9}
    train, _, _ = cb.read_raw(tmp_path / "raw" / cb.FOLDER)
    first = np.asarray(Image.open(root / "train" / "cat" / "000.png"))
    assert np.array_equal(train.images[0], first) and train.labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3


def test_image_folder_rejects_checksums(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "folder")
    with pytest.raises(ConfigError, match="set data.md5 to null"):
        run(tmp_path, source=str(root), md5="0" * 32)


def test_image_folder_wrong_size_names_file(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "folder")
    Image.fromarray(np.zeros((40, 33, 3), np.uint8)).save(root / "test" / "dog" / "big.png")
    with pytest.raises(InputError, match=r"test/dog/big.png: image is 33x40, expected 32x32"):
        run(tmp_path, source=str(root), md5=None, allow_unverified=True)
    assert_no_output(tmp_path)


def test_image_folder_unreadable_file_names_file(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "folder")
    (root / "train" / "frog" / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(InputError, match=r"train/frog/broken.jpg: not a readable image"):
        run(tmp_path, source=str(root), md5=None, allow_unverified=True)
    assert_no_output(tmp_path)
