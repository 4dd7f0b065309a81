"""Unit tests of cifarflow.data.download: checksums, caps, redaction, mirrors and the manifest, in process."""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import pytest
from conftest import make_params, tar_gz, valid_members
from test_units_fetch import Scripted, server  # noqa: F401  (the scripted 127.0.0.1 server fixture)

from cifarflow.data import cifar_binary as cb
from cifarflow.data import download as dl
from cifarflow.data.extract import Archive
from cifarflow.data.synth import synth_files
from cifarflow.errors import ConfigError, InputError, SourceUnavailableError
from cifarflow.settings import DataParams

FILES = synth_files(20, 10, seed=5)
BLOB = tar_gz(valid_members(FILES))
MD5, SHA = hashlib.md5(BLOB).hexdigest(), hashlib.sha256(BLOB).hexdigest()


def data(**kw: object) -> DataParams:
    return DataParams(**{"source": "a.tgz", "md5": None, **kw})  # type: ignore[arg-type]


def test_digests_hash_in_one_pass_and_refuse_oversized_files(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"abc" * 100_000)
    want = {"md5": hashlib.md5(path.read_bytes()).hexdigest(), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    assert dl.digests(path) == want
    assert dl.digests(path, ("sha256",)) == {"sha256": want["sha256"]}
    assert dl.digests(path, data=data(max_download_mb=1)) == want
    path.write_bytes(b"x" * ((1 << 20) + 1))
    with pytest.raises(
        dl.MirrorFailed, match=r"^lab: 1,048,577 bytes, over data.max_download_mb=1 \(the most a download may bring"
    ) as caught:
        dl.digests(path, data=data(max_download_mb=1), label="lab")
    assert caught.value.bad_input
    with pytest.raises(dl.MirrorFailed, match=rf"^{path}: 1,048,577 bytes"):
        dl.digests(path, data=data(max_download_mb=1))
    path.write_bytes(b"x" * (1 << 20))
    assert dl.digests(path, ("md5",), data(max_download_mb=1)) == {"md5": hashlib.md5(b"x" * (1 << 20)).hexdigest()}


def test_a_file_growing_past_the_cap_while_read_is_stopped() -> None:
    class Growing(io.BytesIO):
        def fileno(self) -> int:  # fstat says empty, like /proc files do
            return os.open(os.devnull, os.O_RDONLY)

    with pytest.raises(
        dl.MirrorFailed,
        match=r"^g: more than 1,048,576 bytes read, over data.max_download_mb=1 \(the file grew while being read\)",
    ) as caught:
        dl._digests(Growing(b"x" * ((1 << 20) + 1)), ("sha256",), data(max_download_mb=1), "g")
    assert caught.value.bad_input
    assert dl._digests(Growing(b"x" * (1 << 20)), ("sha256",), data(max_download_mb=1), "g") == {
        "sha256": hashlib.sha256(b"x" * (1 << 20)).hexdigest()
    }
    assert dl._digests(io.BytesIO(b"x" * (3 << 20)), ("md5",)) == {"md5": hashlib.md5(b"x" * (3 << 20)).hexdigest()}


def test_caps_and_content_algorithms_follow_params() -> None:
    assert dl.caps(data(max_extract_mb=3, max_members=7)) == {"max_extract_bytes": 3 << 20, "max_members": 7}
    assert dl.content_algorithms(data()) == ("sha256",)
    assert dl.content_algorithms(data(md5="0" * 32)) == ("md5", "sha256")


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("https://u:pw@host/a.tgz?sig=1", "https://REDACTED@host/a.tgz?REDACTED"),
        ("data/a.tgz", "data/a.tgz"),
        ("u:pw@host/x", "REDACTED@host/x"),
        ("a@b@c/x?q=1", "REDACTED@c/x?REDACTED"),
        ("x?y", "x?REDACTED"),
        ("x?", "x?REDACTED"),
    ],
)
def test_shown_hides_userinfo_and_queries(source: str, expected: str) -> None:
    assert dl.shown(source) == expected


def test_scrubbed_replaces_every_spelling_of_a_secret_local_source(tmp_path: Path) -> None:
    source = str(tmp_path / "u:pw@x" / ".." / "a?t=1")
    text = f"open {source} failed; also {os.path.realpath(source)} and other:secret@y"
    out = dl._scrubbed(text, source)
    assert "pw" not in out and "t=1" not in out and "secret" not in out
    assert dl.shown(source) in out
    assert dl._scrubbed("plain a.tgz: bad", "a.tgz") == "plain a.tgz: bad"
    assert dl._scrubbed("https://u:p@h/x failed", "https://u:p@h/x") == "https://REDACTED@h/x failed"


def test_check_digests_names_the_mismatch() -> None:
    good = {"md5": MD5, "sha256": SHA}
    dl.check_digests(good, data(md5=MD5, sha256=SHA), "l")
    dl.check_digests({"sha256": SHA}, data(sha256=SHA), "l")
    with pytest.raises(dl.MirrorFailed, match=rf"^l: md5 mismatch: expected {'0' * 32} \(data.md5\), actual {MD5}$") as caught:
        dl.check_digests(good, data(md5="0" * 32, sha256=SHA), "l")
    assert caught.value.bad_input
    with pytest.raises(dl.MirrorFailed, match=rf"^l: sha256 mismatch: expected {'1' * 64} \(data.sha256\), actual {SHA}$"):
        dl.check_digests(good, data(md5=MD5, sha256="1" * 64), "l")


def test_read_verified_checks_before_decompressing(tmp_path: Path) -> None:
    path = tmp_path / "a.tgz"
    path.write_bytes(BLOB)
    archive, content = dl.read_verified(path, data(sha256=SHA), "lab")
    assert archive.files == {k: v for k, v in FILES.items() if k in cb.EXPECTED_FILES} and content == {"sha256": SHA}
    assert dl.verify(path, data(md5=MD5), "lab") == {"md5": MD5, "sha256": SHA}
    with pytest.raises(dl.MirrorFailed, match="sha256 mismatch"):
        dl.read_verified(path, data(sha256="2" * 64), "lab")
    with pytest.raises(InputError, match=r"more than 1 members, over data.max_members=1"):
        dl.read_verified(path, data(sha256=SHA, max_members=1), "lab")
    with pytest.raises(dl.MirrorFailed, match=r"^lab: cannot read \(FileNotFoundError: No such file or directory\)$") as caught:
        dl.read_verified(tmp_path / "none", data(), "lab")
    assert not caught.value.bad_input
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(
        dl.MirrorFailed, match=r"^lab: not a regular file \(changed while being opened\); refused unread$"
    ) as caught:
        dl.read_verified(tmp_path / "fifo", data(), "lab")
    assert caught.value.bad_input


def test_obtained_kind_follows_the_synth_marker() -> None:
    plain = dl._obtained(Archive({"a": b""}, None), {"sha256": "s"}, "lab", ["n"])
    assert (plain.kind, plain.files, plain.content, plain.origin, plain.notes) == (
        "archive",
        {"a": b""},
        {"sha256": "s"},
        "lab",
        ["n"],
    )
    notes = ["first"]
    marked = dl._obtained(Archive({}, "made by x"), {}, "lab", notes)
    assert marked.kind == "synth"
    assert marked.notes == ["first", f"generated archive ({cb.FOLDER}/{cb.SYNTH_MARKER}: 'made by x'): kind synth"]
    assert notes == ["first"]
    assert dl._obtained(Archive({}, None), {}, "lab").notes == []


def test_checked_turns_checksum_rules_into_config_errors() -> None:
    dl._checked(data(sha256=SHA), "archive", "a.tgz")
    # "data:", not "params.yaml: data:": --params may name another file
    with pytest.raises(ConfigError, match=r"^data: no checksum for the archive source a.tgz"):
        dl._checked(data(), "archive", "a.tgz")


def test_synth_sources_are_generated_in_process(tmp_path: Path) -> None:
    got = dl.obtain("synth:train=20,test=10,seed=5", data(source="synth:train=20,test=10,seed=5", val_size=5, shards=1), tmp_path)
    assert got.kind == "synth" and got.files[cb.TEST_FILE] == FILES[cb.TEST_FILE]
    assert got.origin == "synth:train=20,test=10,seed=5" and len(got.content["sha256"]) == 64 and set(got.content) == {"sha256"}
    mislabelled = "synth:train=20,test=10,seed=5,mislabel=50"  # the same images, half the labels changed
    noisy = dl.obtain(mislabelled, data(source=mislabelled, val_size=5, shards=1), tmp_path)
    assert noisy.files[cb.TEST_FILE] != got.files[cb.TEST_FILE]


def test_local_archives_need_a_checksum_and_are_verified(tmp_path: Path) -> None:
    path = tmp_path / "a.tgz"
    path.write_bytes(BLOB)
    got = dl.obtain(str(path), data(sha256=SHA), tmp_path / "cache")
    assert got.kind == "archive" and got.content == {"sha256": SHA} and got.origin == str(path)
    assert dl.obtain(path.as_uri(), data(md5=MD5), tmp_path / "cache").content == {"md5": MD5, "sha256": SHA}
    with pytest.raises(ConfigError, match="no checksum"):
        dl.obtain(str(path), data(), tmp_path)


def test_local_sources_that_are_missing_or_special_are_this_mirrors_bad_input(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(dl.MirrorFailed, match=rf"^{tmp_path}/none: no such file or folder$") as caught:
        dl.obtain(str(tmp_path / "none"), data(), tmp_path)
    assert caught.value.bad_input
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        dl.MirrorFailed, match=r"^none: no such file or folder \(a relative path is read from the working directory\)$"
    ):
        dl.obtain("none", data(), tmp_path)
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(
        dl.MirrorFailed, match=r"^fifo: is a FIFO \(named pipe\), not an archive file or an image folder \(refused unread"
    ) as caught:
        dl.obtain("fifo", data(), tmp_path)
    assert caught.value.bad_input
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        InputError, match=r"^empty: a folder source must hold train/<class>/\*.png\|jpg and test/<class>/\*.png\|jpg$"
    ):
        dl.obtain("empty", data(), tmp_path)
    with pytest.raises(dl.MirrorFailed, match=r"cannot read \(File name too long\)") as caught:
        dl.obtain("x" * 5000, data(), tmp_path)
    assert caught.value.bad_input


def test_http_downloads_are_cached_by_checksum(server: Scripted, tmp_path: Path) -> None:  # noqa: F811
    server.replies["/a.tgz"] = [(200, {}, BLOB)]
    cache = tmp_path / "cache"
    got = dl.obtain(server.url("/a.tgz?sig=secret"), data(sha256=SHA), cache, backoff_s=0)
    assert got.kind == "archive" and got.content == {"sha256": SHA} and "secret" not in got.origin
    assert (cache / f"{SHA}.tar.gz").read_bytes() == BLOB and not (cache / f"{SHA}.part").exists()
    assert dl.obtain(server.url("/a.tgz"), data(sha256=SHA), cache).content == {"sha256": SHA}
    assert len(server.requests) == 1  # the second came from the cache
    (cache / f"{SHA}.tar.gz").write_bytes(b"damaged")
    dl.obtain(server.url("/a.tgz"), data(sha256=SHA), cache, backoff_s=0)
    assert len(server.requests) == 2 and (cache / f"{SHA}.tar.gz").read_bytes() == BLOB
    keyed = dl.fetch_http(server.url("/a.tgz"), data(md5=MD5), cache, 0)
    assert keyed == (cache / f"{MD5}.tar.gz", {"md5": MD5, "sha256": SHA})


def test_a_wrong_http_download_is_never_kept(server: Scripted, tmp_path: Path) -> None:  # noqa: F811
    server.replies["/a.tgz"] = [(200, {}, BLOB)]
    with pytest.raises(dl.MirrorFailed, match=r"^http://127.0.0.1:\d+/a.tgz\?REDACTED: sha256 mismatch") as caught:
        dl.fetch_http(server.url("/a.tgz?k=v"), data(sha256="3" * 64), tmp_path, 0)
    assert caught.value.bad_input and list(tmp_path.iterdir()) == []


def test_http_failures_are_mirror_failures_bad_input_only_for_caps(server: Scripted, tmp_path: Path) -> None:  # noqa: F811
    server.replies["/gone"] = [(404, {}, b"")]
    with pytest.raises(dl.MirrorFailed, match=r"^http://127.0.0.1:\d+/gone: HTTP 404 Not Found$") as caught:
        dl._fetch(server.url("/gone"), tmp_path / "p", data(retries=0), 0)
    assert not caught.value.bad_input
    server.replies["/big"] = [(200, {}, b"x" * ((1 << 20) + 1))]
    with pytest.raises(dl.MirrorFailed, match="over data.max_download_mb=1") as caught:
        dl._fetch(server.url("/big"), tmp_path / "p", data(max_download_mb=1), 0)
    assert caught.value.bad_input


def test_unverified_http_downloads_keep_nothing(server: Scripted, tmp_path: Path) -> None:  # noqa: F811
    server.replies["/a.tgz"] = [(200, {}, BLOB)]
    got = dl.obtain(server.url("/a.tgz"), data(source="https://h/a.tgz", allow_unverified=True), tmp_path, backoff_s=0)
    assert (
        got.kind == "archive" and got.content == {"sha256": SHA} and got.notes == ["unverified download (data.allow_unverified)"]
    )
    assert list(tmp_path.iterdir()) == []


def test_https_sources_are_downloaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = tmp_path / "fetched.tgz"
    archive.write_bytes(BLOB)
    calls = []
    monkeypatch.setattr(dl, "fetch_http", lambda *args: calls.append(args[0]) or (archive, {"sha256": SHA}))
    got = dl.obtain("https://mirror.example/a.tgz", data(sha256=SHA), tmp_path / "cache", backoff_s=0)
    assert calls == ["https://mirror.example/a.tgz"] and got.kind == "archive"


BOMB = tar_gz(valid_members({**FILES, "padding": bytes(3 << 20)}))  # 3 MiB of zeros: a few KiB compressed


@pytest.mark.parametrize("verified", [True, False])
def test_http_archives_are_read_within_the_extract_and_member_caps(
    server: Scripted,  # noqa: F811
    tmp_path: Path,
    verified: bool,
) -> None:
    server.replies["/bomb.tgz"] = [(200, {}, BOMB)]
    checksum = {"sha256": hashlib.sha256(BOMB).hexdigest()} if verified else {"allow_unverified": True}
    with pytest.raises(InputError, match="max_extract_mb"):
        dl.obtain(server.url("/bomb.tgz"), data(max_extract_mb=1, **checksum), tmp_path, backoff_s=0)
    server.replies["/a.tgz"] = [(200, {}, BLOB)]
    checksum = {"sha256": SHA} if verified else {"allow_unverified": True}
    with pytest.raises(InputError, match="max_members"):
        dl.obtain(server.url("/a.tgz"), data(max_members=2, **checksum), tmp_path, backoff_s=0)


def test_unverified_downloads_retry_transient_errors(server: Scripted, tmp_path: Path) -> None:  # noqa: F811
    server.replies["/a.tgz"] = [(503, {}, b""), (200, {}, BLOB)]
    got = dl.obtain(server.url("/a.tgz"), data(allow_unverified=True, retries=1), tmp_path, backoff_s=0)
    assert got.content == {"sha256": SHA} and len(server.requests) == 2


def test_validate_batches_counts_records_and_checks_labels() -> None:
    summary = dl.validate_batches(dict(FILES))
    assert summary["counts"] == {"train": 20, "test": 10}
    assert summary["records"][cb.TEST_FILE] == 10 and sum(summary["records"][f] for f in cb.TRAIN_FILES) == 20
    assert summary["classes"] == cb.parse_meta(FILES[cb.META_FILE])
    few = {**FILES, cb.META_FILE: b"a\nb\n"}
    with pytest.raises(InputError, match=r"^data_batch_1.bin: label \d but batches.meta.txt names only 2 classes$"):
        dl.validate_batches(few)


def test_run_tries_mirrors_in_order_and_writes_the_manifest(tmp_path: Path) -> None:
    good = tmp_path / "a.tgz"
    good.write_bytes(BLOB)
    params = make_params(source=[str(tmp_path / "missing.tgz"), str(good)], md5=None, sha256=SHA, val_size=5, shards=1)
    summary = dl.run(params, tmp_path / "out", tmp_path / "cache", runinfo=tmp_path / "ri.json")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert (
        manifest["kind"] == "archive"
        and manifest["content"] == {"sha256": SHA}
        and manifest["counts"] == {"train": 20, "test": 10}
    )
    assert summary["counts"] == manifest["counts"]
    assert sorted(p.name for p in (tmp_path / "out" / cb.FOLDER).iterdir()) == sorted(cb.EXPECTED_FILES)
    info = json.loads((tmp_path / "ri.json").read_text())
    assert (
        info["origin"] == str(good)
        and info["failed_mirrors"] == [f"{tmp_path}/missing.tgz: no such file or folder"]
        and info["notes"] == []
    )


def test_run_fails_with_every_mirrors_reason(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tgz"
    bad.write_bytes(b"not an archive")
    params = make_params(
        source=[str(tmp_path / "missing.tgz"), str(bad)],
        md5=None,
        sha256=hashlib.sha256(b"not an archive").hexdigest(),
        val_size=5,
        shards=1,
    )
    with pytest.raises(
        InputError,
        match=r"^could not obtain CIFAR-10 from data.source:\n  .*missing.tgz: "
        r"no such file or folder\n  .*bad.tgz: not a readable tar archive",
    ) as caught:
        dl.run(params, tmp_path / "out", tmp_path / "cache")
    assert str(caught.value).endswith(dl.SOURCE_HINT) and not (tmp_path / "out").exists()
    broken = {**FILES, cb.TEST_FILE: b"x"}
    blob = tar_gz(valid_members(broken))
    (tmp_path / "b.tgz").write_bytes(blob)
    params = make_params(source=str(tmp_path / "b.tgz"), md5=None, sha256=hashlib.sha256(blob).hexdigest(), val_size=5, shards=1)
    with pytest.raises(InputError, match=rf"\n  {tmp_path}/b.tgz: test_batch.bin: 1 bytes is not a whole number"):
        dl.run(params, tmp_path / "out", tmp_path / "cache")


def test_run_without_bad_input_is_source_unavailable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def unreachable(source: str, *args: object) -> None:
        raise dl.MirrorFailed(f"{source}: connection refused")

    monkeypatch.setattr(dl, "obtain", unreachable)
    params = make_params(source=["https://a/x.tgz", "https://b/y.tgz"], md5=MD5)
    with pytest.raises(
        SourceUnavailableError,
        match=r"^could not obtain CIFAR-10 from data.source:\n  https://a/x.tgz: "
        r"connection refused\n  https://b/y.tgz: connection refused\n",
    ):
        dl.run(params, tmp_path / "out", tmp_path / "cache")

    def unreadable(source: str, *args: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(dl, "obtain", unreadable)
    with pytest.raises(SourceUnavailableError, match=r"\n  https://a/x.tgz: PermissionError: \[Errno 13\] Permission denied\n"):
        dl.run(params, tmp_path / "out", tmp_path / "cache")


def test_prefixed_adds_the_label_once() -> None:
    assert dl._prefixed("a.tgz", "a.tgz: broken") == "a.tgz: broken"
    assert dl._prefixed("a.tgz", "broken") == "a.tgz: broken"
    assert dl._prefixed("u:pw@h/a.tgz", "u:pw@h/a.tgz: broken") == "REDACTED@h/a.tgz: broken"
