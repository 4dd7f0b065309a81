"""Hostile inputs to download, extract, image folders and predict: every attack ends in a bounded,
actionable error naming the param or file (or in the next mirror), never a hang, a traceback or
unbounded memory. Real files (FIFOs, /dev/zero, bombs) and a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import bz2
import gzip
import http.server
import io
import json
import logging
import lzma
import os
import re
import struct
import subprocess
import sys
import tarfile
import textwrap
import threading
import time
import tracemalloc
import urllib.parse
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import TRAIN, cli_env, make_params, sha256, write_params
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from cifarflow import predict
from cifarflow.cli import main
from cifarflow.data import cifar_binary as cb
from cifarflow.data import download, fetch, image_file
from cifarflow.data.extract import read_batches
from cifarflow.data.image_file import decode, pixel_limit
from cifarflow.errors import InputError, SourceUnavailableError
from cifarflow.settings import DataParams

MB = 1 << 20


# --- a local HTTP server whose every path can misbehave in its own way ---------------------------

Route = Callable[["Handler"], None]


class Server(http.server.ThreadingHTTPServer):
    """`routes` maps a path (query ignored) to what the handler does; `sent` counts the body bytes
    the client accepted per path, so a test can tell how much of a body was really read."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.routes: dict[str, Route] = {}
        self.sent: dict[str, int] = {}
        self.requests: list[dict[str, Any]] = []

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


class Handler(http.server.BaseHTTPRequestHandler):
    server: Server  # HTTP/1.0: one response per connection, so a body may end by closing

    def log_message(self, *args: Any) -> None:
        pass

    @property
    def route(self) -> str:
        return urllib.parse.urlsplit(self.path).path

    def do_GET(self) -> None:
        self.server.requests.append(
            {"path": self.path, "range": self.headers.get("Range"), "accept_encoding": self.headers.get("Accept-Encoding")}
        )
        action = self.server.routes.get(self.route)
        try:
            if action is None:
                self.send_error(404)
            else:
                action(self)
        except OSError:  # the client hung up: for most of these tests, that is the point
            pass

    def write_counted(self, chunks: Iterator[bytes]) -> None:
        for chunk in chunks:
            self.wfile.write(chunk)
            self.wfile.flush()
            self.server.sent[self.route] = self.server.sent.get(self.route, 0) + len(chunk)


def body(data: bytes, *, status: int = 200, headers: dict[str, str] | None = None, length: bool = True) -> Route:
    def action(h: Handler) -> None:
        h.send_response(status)
        for key, value in (headers or {}).items():
            h.send_header(key, value)
        if length:
            h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.write_counted(iter([data[i : i + 65536] for i in range(0, len(data), 65536)]))

    return action


def ranged(data: bytes) -> Route:
    """Serves Range requests with 206, like a real static server."""

    def action(h: Handler) -> None:
        start = int((h.headers.get("Range") or "bytes=0-").removeprefix("bytes=").split("-")[0])
        h.send_response(206 if start else 200)
        if start:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.send_header("Content-Length", str(len(data) - start))
        h.end_headers()
        h.write_counted(iter([data[start:]]))

    return action


def zeros(total: int, *, announce: int | None = None) -> Route:
    """`total` zero bytes; no Content-Length unless `announce` (then that value, true or not)."""

    def action(h: Handler) -> None:
        h.send_response(200)
        if announce is not None:
            h.send_header("Content-Length", str(announce))
        h.end_headers()
        block = bytes(65536)
        h.write_counted(block for _ in range(total // len(block)))

    return action


def redirect(location: str, status: int = 302) -> Route:
    def action(h: Handler) -> None:
        h.send_response(status)
        h.send_header("Location", location)
        h.send_header("Content-Length", "0")
        h.end_headers()

    return action


def trickle(head: bytes, tail: bytes, every: float) -> Route:
    """Writes `head` at once, then `tail` one byte every `every` seconds: never silent long enough
    for a socket timeout, never done either."""

    def action(h: Handler) -> None:
        h.wfile.write(head)
        h.wfile.flush()
        for i in range(len(tail)):
            time.sleep(every)
            h.wfile.write(tail[i : i + 1])
            h.wfile.flush()

    return action


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def run(tmp_path: Path, **data: Any) -> dict:
    data.setdefault("retries", 0)
    return download.run(make_params(**data), tmp_path / "raw", tmp_path / "cache", tmp_path / "run.json", backoff_s=0.01)


def run_info(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "run.json").read_text())


def leftovers(tmp_path: Path) -> list[str]:
    cache = tmp_path / "cache"
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


# --- crafted archives and images -----------------------------------------------------------------


def tar_bomb(path: Path, members: list[tuple[str, int, bytes]], level: int = 1) -> Path:
    """A .tar.gz of members (name, size, tar type) whose data is all zeros, written in a stream:
    megabytes on disk, any size decompressed, never held in memory here."""
    comp = zlib.compressobj(level, zlib.DEFLATED, 31)
    zero = memoryview(bytes(MB))
    with open(path, "wb") as out:
        for name, size, kind in members:
            info = tarfile.TarInfo(name)
            info.size, info.type = size, kind
            out.write(comp.compress(info.tobuf(tarfile.GNU_FORMAT)))
            left = size + (-size % 512)
            while left:
                out.write(comp.compress(zero[: min(left, MB)]))
                left -= min(left, MB)
        out.write(comp.compress(bytes(1024)) + comp.flush())
    return path


def many_headers(count: int) -> bytes:
    """A .tar.gz of `count` empty-file headers, like the review's 2.2 MB archive that took 50 s: one
    gzip member of 1000 headers, repeated (concatenated gzip members are one stream to a reader)."""
    return gzip.compress(tarfile.TarInfo("junk").tobuf(tarfile.USTAR_FORMAT) * 1000, 9) * (count // 1000)


def header_with_checksum(buf: bytearray) -> bytes:
    chksum = 256 + sum(buf[:148]) + sum(buf[156:512])
    buf[148:155] = b"%06o\x00" % chksum
    return bytes(buf)


def png_bomb(path: Path, width: int, height: int) -> Path:
    """A valid all-black 1-bit PNG: a few KB on disk, width x height pixels once decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = bytes(1 + (width + 7) // 8)
    comp = zlib.compressobj(9)
    idat = b"".join([comp.compress(row) for _ in range(height)] + [comp.flush()])
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
        + chunk(b"IDAT", idat)
        + chunk(b"IEND", b"")
    )
    return path


def image_folder(root: Path, per_class: int = 2, classes: tuple[str, ...] = ("cat", "dog")) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root


def peak_traced(fn: Callable[[], Any]) -> tuple[BaseException | None, int]:
    """What `fn` raised, and the peak of Python allocations (all threads) while it ran."""
    tracemalloc.start()
    try:
        fn()
        raised = None
    except Exception as exc:  # returned for the test to inspect
        raised = exc
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return raised, peak


PRELUDE = """
import json, resource, sys
# The code before the fix read /dev/zero and decoded bombs whole: fail with MemoryError, not the machine.
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
from pathlib import Path
from cifarflow import predict
from cifarflow.data import download
from cifarflow.errors import CifarflowError
from conftest import make_params
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
def grown_mb():
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
"""


def isolated(tmp_path: Path, code: str, timeout: float = 40) -> Any:
    """Run `code` in a fresh Python (timeout and memory-limited: the unfixed code hangs on a FIFO);
    it prints one JSON line last."""
    env = cli_env()
    env["PYTHONPATH"] = str(Path(__file__).parent) + os.pathsep + env["PYTHONPATH"]
    done = subprocess.run(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- 1. checksum first: nothing unverified is decompressed ---------------------------------------


def test_wrong_checksum_is_found_before_decompressing(tmp_path: Path) -> None:
    """A small archive that inflates to 256 MB, with a wrong md5: refused having hashed its few
    hundred KB, never inflated (the review measured 2.1 GB for this)."""
    bomb = tar_bomb(tmp_path / "bomb.tgz", [(f"{cb.FOLDER}/data_batch_1.bin", 256 * MB, tarfile.REGTYPE)])
    assert bomb.stat().st_size < 2 * MB
    raised, peak = peak_traced(lambda: run(tmp_path, source=str(bomb), md5="0" * 32))
    assert isinstance(raised, InputError) and "md5 mismatch" in str(raised), raised
    assert peak < 16 * MB, f"{peak / MB:.0f} MB allocated: the archive was decompressed before the checksum"


# --- 2. caps on decompression, members, download size --------------------------------------------


@pytest.mark.parametrize(
    "layout",
    [
        pytest.param([(f"{cb.FOLDER}/data_batch_1.bin", 64 * MB, tarfile.REGTYPE)], id="one-big-expected-member"),
        pytest.param(
            [("padding.bin", 64 * MB, tarfile.REGTYPE), (f"{cb.FOLDER}/test_batch.bin", 3073, tarfile.REGTYPE)],
            id="big-skipped-member",
        ),
        pytest.param([(f"{cb.FOLDER}/x{i}", MB, tarfile.REGTYPE) for i in range(40)], id="many-small-members"),
    ],
)
def test_gzip_bomb_stops_at_max_extract_mb(tmp_path: Path, layout: list) -> None:
    bomb = tar_bomb(tmp_path / "bomb.tgz", layout)
    raised, peak = peak_traced(lambda: run(tmp_path, source=str(bomb), md5=None, allow_unverified=True, max_extract_mb=8))
    assert isinstance(raised, InputError), raised
    assert "over data.max_extract_mb=8; raise it if this archive is genuine" in str(raised)
    assert peak < 24 * MB, f"{peak / MB:.0f} MB allocated for an 8 MB cap"


class CountingReader(io.BytesIO):
    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.consumed = 0

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        self.consumed += len(data)
        return data


def test_a_million_headers_stop_at_max_members(tmp_path: Path) -> None:
    """The review's 2.2 MB archive of a million headers took 50 s; it now stops at the cap, having
    read a small part of the file."""
    blob = many_headers(1_000_000)
    (tmp_path / "headers.tgz").write_bytes(blob)
    started = time.monotonic()
    with pytest.raises(InputError, match=r"more than 1,000 members, over data.max_members=1000"):
        run(tmp_path, source=str(tmp_path / "headers.tgz"), md5=None, allow_unverified=True, max_members=1000)
    assert time.monotonic() - started < 30
    reader = CountingReader(blob)
    with pytest.raises(InputError, match="data.max_members=1000"):
        read_batches(reader, MB, "headers", max_members=1000)
    assert reader.consumed < len(blob) // 4, "the archive was read far past the cap"


@pytest.mark.parametrize(
    "kind",
    [tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK],
    ids=["pax", "global-pax", "gnu-long-name", "gnu-long-link"],
)
def test_huge_metadata_header_is_refused_unread(tmp_path: Path, kind: bytes) -> None:
    """tarfile reads a pax or long-name header's data whole before yielding anything: 64 MB of it is
    refused from the header, with the default caps, before a byte of it is read."""
    bomb = tar_bomb(tmp_path / "bomb.tgz", [("././@LongLink", 64 * MB, kind)])
    raised, peak = peak_traced(lambda: run(tmp_path, source=str(bomb), md5=None, allow_unverified=True))
    assert isinstance(raised, InputError), raised
    assert "a pax or long-name header of 67,108,864 bytes (at most 1,048,576); refusing" in str(raised)
    assert peak < 16 * MB, f"{peak / MB:.0f} MB allocated for a refused header"


def test_chained_pax_headers_are_input_error(tmp_path: Path) -> None:
    """tarfile follows chained pax headers recursively: 3000 of them were a RecursionError inside it."""
    record = b"13 comment=x\n"
    pax = tarfile.TarInfo("././@PaxHeader")
    pax.type, pax.size = tarfile.XHDTYPE, len(record)
    block = pax.tobuf(tarfile.USTAR_FORMAT) + record + bytes(512 - len(record))
    (tmp_path / "pax.tgz").write_bytes(gzip.compress(block * 3000 + bytes(1024)))
    with pytest.raises(InputError, match="more than 32 pax or long-name headers in a row; refusing"):
        run(tmp_path, source=str(tmp_path / "pax.tgz"), md5=None, allow_unverified=True)


def test_sparse_member_is_refused(tmp_path: Path) -> None:
    """A GNU sparse member stores nothing and declares 64 MB: zeros out of nothing."""
    info = tarfile.TarInfo(f"{cb.FOLDER}/data_batch_1.bin")
    info.type, info.size = tarfile.GNUTYPE_SPARSE, 0
    header = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    header[483:495] = tarfile.itn(64 * MB, 12, tarfile.GNU_FORMAT)  # the real size the sparse map expands to
    (tmp_path / "sparse.tgz").write_bytes(gzip.compress(header_with_checksum(header) + bytes(1024)))
    with pytest.raises(InputError, match="is a sparse file; refusing"):
        run(tmp_path, source=str(tmp_path / "sparse.tgz"), md5=None, allow_unverified=True)


def test_body_without_length_stops_at_max_download_mb(tmp_path: Path, server: Server) -> None:
    server.routes["/endless.tgz"] = zeros(128 * MB)
    with pytest.raises(InputError, match=r"sent more than 1,048,576 bytes, over data.max_download_mb=1; raise it"):
        run(tmp_path, source=server.url("/endless.tgz"), sha256="0" * 64, md5=None, max_download_mb=1)
    assert server.sent.get("/endless.tgz", 0) < 64 * MB, "the client kept reading past the cap"
    assert leftovers(tmp_path) == [], "no .part over the cap is kept"


def test_announced_length_over_cap_is_refused_unread(tmp_path: Path, server: Server) -> None:
    server.routes["/huge.tgz"] = zeros(64 * MB, announce=2 << 30)
    with pytest.raises(InputError, match=r"announces 2,147,483,648 bytes, over data.max_download_mb=1"):
        run(tmp_path, source=server.url("/huge.tgz"), sha256="0" * 64, md5=None, retries=3, max_download_mb=1)
    assert len(server.requests) == 1, "a cap violation is not retried"
    assert server.sent.get("/huge.tgz", 0) < 48 * MB


def test_resumed_part_counts_toward_max_download_mb(tmp_path: Path, server: Server) -> None:
    blob = os.urandom(3 * MB // 2)
    server.routes["/big.bin"] = ranged(blob)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / f"{sha256(blob)}.part").write_bytes(blob[: 9 * MB // 10])  # a previous run's part
    with pytest.raises(InputError, match="over data.max_download_mb=1"):
        run(tmp_path, source=server.url("/big.bin"), sha256=sha256(blob), md5=None, max_download_mb=1)
    assert server.requests[0]["range"] == f"bytes={9 * MB // 10}-"
    assert leftovers(tmp_path) == []


# --- 3. HTTP: raw bytes, deadline, redirects, protocol errors ------------------------------------


def test_gzip_content_encoding_keeps_the_bytes_as_sent(tmp_path: Path, archive_bytes: bytes, server: Server) -> None:
    """A server labelling a .tar.gz `Content-Encoding: gzip` (a common misconfiguration): the file is
    the bytes sent, which is what the checksum is for; nothing is inflated on the way in."""
    server.routes["/a.tgz"] = body(archive_bytes, headers={"Content-Encoding": "gzip"})
    manifest = run(tmp_path, source=server.url("/a.tgz"), sha256=sha256(archive_bytes), md5=None)
    assert manifest["counts"]["train"] == TRAIN
    assert server.requests[0]["accept_encoding"] == "identity"


def test_trickling_body_stops_at_deadline(tmp_path: Path, server: Server) -> None:
    head = b"HTTP/1.0 200 OK\r\nContent-Length: 80\r\n\r\n"
    server.routes["/slow.tgz"] = trickle(head, b"x" * 80, every=0.3)  # never 3 s silent: no socket timeout
    started = time.monotonic()
    with pytest.raises(SourceUnavailableError, match=r"not complete within data.deadline_s=2 .*raise data.deadline_s"):
        run(tmp_path, source=server.url("/slow.tgz"), sha256="0" * 64, md5=None, timeout_s=3, deadline_s=2, retries=3)
    assert time.monotonic() - started < 30


def test_trickling_headers_stop_at_deadline(tmp_path: Path, server: Server) -> None:
    server.routes["/slow.tgz"] = trickle(b"HTTP/1.0 200 OK\r\nX-Slow: ", b"y" * 80 + b"\r\n\r\n", every=0.3)
    started = time.monotonic()
    with pytest.raises(SourceUnavailableError, match=r"data.deadline_s=2"):
        run(tmp_path, source=server.url("/slow.tgz"), sha256="0" * 64, md5=None, timeout_s=3, deadline_s=2, retries=3)
    assert time.monotonic() - started < 30


def test_stalled_tls_handshake_stops_at_deadline(tmp_path: Path) -> None:
    """A server that accepts and never answers the TLS hello: the deadline, not the 30 s socket
    timeout, ends it (the watchdog shuts the socket down mid-handshake)."""
    import socket

    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[Any] = []
    threading.Thread(target=lambda: [accepted.append(listener.accept()) for _ in range(4)], daemon=True).start()
    started = time.monotonic()
    try:
        with pytest.raises(SourceUnavailableError, match=r"not complete within data.deadline_s=2"):
            run(
                tmp_path,
                source=f"https://127.0.0.1:{listener.getsockname()[1]}/a.tgz",
                sha256="0" * 64,
                md5=None,
                timeout_s=30,
                deadline_s=2,
                retries=2,
            )
    finally:
        listener.close()
    assert time.monotonic() - started < 20


def hops(server: Server, archive: bytes) -> None:
    for i in range(12):  # every hop a new URL: not a loop, just too many
        server.routes[f"/hop/{i}"] = redirect(f"/hop/{i + 1}")
    server.routes["/hop/12"] = body(archive)
    server.routes["/bad.tgz"] = redirect("/hop/0")


BROKEN_MIRRORS: dict[str, tuple[Callable[[Server, bytes], None], str]] = {
    "redirect-loop": (lambda s, a: s.routes.update({"/bad.tgz": redirect("/bad.tgz")}), r"redirect loop"),
    "redirect-ping-pong": (
        lambda s, a: s.routes.update({"/bad.tgz": redirect("/b"), "/b": redirect("/bad.tgz", 307)}),
        r"redirect loop",
    ),
    "redirect-to-file": (
        lambda s, a: s.routes.update({"/bad.tgz": redirect("file:///etc/passwd")}),
        r"redirected to a file: URL .*only http\(s\) redirects",
    ),
    "redirect-to-ftp": (
        lambda s, a: s.routes.update({"/bad.tgz": redirect("ftp://127.0.0.1/x.tgz", 301)}),
        r"redirected to a ftp: URL",
    ),
    "too-many-redirects": (hops, r"more than 5 redirects"),
    "206-without-range": (
        lambda s, a: s.routes.update(
            {"/bad.tgz": body(a, status=206, headers={"Content-Range": f"bytes 0-{len(a) - 1}/{len(a)}"})}
        ),
        r"HTTP 206 .* without Range",
    ),
    "206-without-content-range": (lambda s, a: s.routes.update({"/bad.tgz": body(a, status=206)}), r"HTTP 206 .* without Range"),
    "broken-content-encoding": (
        lambda s, a: s.routes.update({"/bad.tgz": body(b"\x1f\x8bnot gzip at all" * 100, headers={"Content-Encoding": "gzip"})}),
        r"sha256 mismatch",
    ),
    "gzip-bomb-content-encoding": (
        lambda s, a: s.routes.update({"/bad.tgz": body(gzip.compress(bytes(32 * MB), 1), headers={"Content-Encoding": "gzip"})}),
        r"sha256 mismatch",
    ),
    "deflate-content-encoding": (
        lambda s, a: s.routes.update({"/bad.tgz": body(zlib.compress(a), headers={"Content-Encoding": "deflate"})}),
        r"sha256 mismatch",
    ),
    "204-no-content": (
        lambda s, a: s.routes.update({"/bad.tgz": body(b"", status=204, length=False)}),
        r"HTTP 204 .*expected 200",
    ),
}


@pytest.mark.parametrize("attack", list(BROKEN_MIRRORS))
def test_broken_mirror_moves_on_to_the_next(tmp_path: Path, archive_bytes: bytes, server: Server, attack: str) -> None:
    setup, reason = BROKEN_MIRRORS[attack]
    setup(server, archive_bytes)
    server.routes["/good.tgz"] = body(archive_bytes)
    manifest = run(
        tmp_path, source=[server.url("/bad.tgz"), server.url("/good.tgz")], sha256=sha256(archive_bytes), md5=None, retries=1
    )
    assert manifest["counts"]["train"] == TRAIN
    failed = run_info(tmp_path)["failed_mirrors"]
    assert len(failed) == 1 and failed[0].startswith(server.url("/bad.tgz")) and re.search(reason, failed[0]), failed
    assert all(r["path"] != "/etc/passwd" for r in server.requests)


def test_gzip_bomb_encoding_is_not_inflated(tmp_path: Path, server: Server) -> None:
    """32 MB of zeros sent gzip-encoded (32 KB): the .part holds the 32 KB, checked and dropped."""
    encoded = gzip.compress(bytes(32 * MB), 1)
    server.routes["/bomb.tgz"] = body(encoded, headers={"Content-Encoding": "gzip"})
    with pytest.raises(InputError, match=rf"sha256 mismatch.*actual {sha256(encoded)}"):
        run(tmp_path, source=server.url("/bomb.tgz"), sha256="0" * 64, md5=None)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("bad_url", ["http://[::1/x.tgz", "http://127.0.0.1:99999/x.tgz", "http://:80/x.tgz"])
def test_bad_url_mirror_moves_on(tmp_path: Path, archive_bytes: bytes, server: Server, bad_url: str) -> None:
    server.routes["/good.tgz"] = body(archive_bytes)
    manifest = run(tmp_path, source=[bad_url, server.url("/good.tgz")], sha256=sha256(archive_bytes), md5=None)
    assert manifest["counts"]["train"] == TRAIN
    assert len(run_info(tmp_path)["failed_mirrors"]) == 1


# --- 4. a cap or checksum failure of one mirror; all failed -------------------------------------


def test_capped_local_mirror_moves_on(tmp_path: Path, archive: Path) -> None:
    bomb = tar_bomb(tmp_path / "bomb.tgz", [(f"{cb.FOLDER}/data_batch_1.bin", 16 * MB, tarfile.REGTYPE)])
    manifest = run(tmp_path, source=[str(bomb), str(archive)], md5=None, allow_unverified=True, max_extract_mb=4)
    assert manifest["counts"]["train"] == TRAIN
    [failed] = run_info(tmp_path)["failed_mirrors"]
    assert failed.startswith(str(bomb)) and "data.max_extract_mb=4" in failed


def test_capped_http_mirror_moves_on(tmp_path: Path, archive_bytes: bytes, server: Server) -> None:
    server.routes["/endless.tgz"] = zeros(16 * MB)
    server.routes["/good.tgz"] = body(archive_bytes)
    manifest = run(
        tmp_path,
        source=[server.url("/endless.tgz"), server.url("/good.tgz")],
        sha256=sha256(archive_bytes),
        md5=None,
        max_download_mb=1,
    )
    assert manifest["counts"]["train"] == TRAIN
    assert "data.max_download_mb=1" in run_info(tmp_path)["failed_mirrors"][0]


def test_all_mirrors_failing_on_caps_is_exit_2_listing_each(tmp_path: Path, server: Server, capsys) -> None:
    server.routes["/endless.tgz"] = zeros(16 * MB)
    bomb = tar_bomb(tmp_path / "bomb.tgz", [(f"{cb.FOLDER}/data_batch_1.bin", 16 * MB, tarfile.REGTYPE)])
    params = write_params(
        tmp_path,
        {
            "data": {
                "source": [server.url("/endless.tgz"), str(bomb)],
                "md5": None,
                "allow_unverified": True,
                "max_download_mb": 1,
                "max_extract_mb": 4,
                "retries": 0,
            }
        },
    )
    code = main(["--params", str(params), "download", "--out", str(tmp_path / "raw"), "--cache", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert code == 2
    assert f"{server.url('/endless.tgz')}: the server sent more than" in err and "data.max_download_mb=1" in err
    assert f"{bomb}: " in err and "data.max_extract_mb=4" in err


# --- 5. FIFOs, devices and sockets are refused unopened ------------------------------------------


def test_special_files_as_source_are_refused_unopened(tmp_path: Path, archive: Path, archive_bytes: bytes) -> None:
    os.mkfifo(tmp_path / "fifo.tgz")
    (tmp_path / "zero.tgz").symlink_to("/dev/zero")
    result = isolated(
        tmp_path,
        f"""
        sources = ["fifo.tgz", "/dev/zero", "zero.tgz", Path("fifo.tgz").resolve().as_uri(), {str(archive)!r}]
        params = make_params(source=sources, sha256={sha256(archive_bytes)!r}, md5=None)
        download.run(params, Path("raw"), Path("cache"), Path("run.json"))
        info = json.loads(Path("run.json").read_text())
        try:
            download.run(make_params(source=sources[:4], sha256={sha256(archive_bytes)!r}, md5=None), Path("raw2"),
                         Path("cache"))
            code = 0
        except CifarflowError as exc:
            code = exc.exit_code
        print(json.dumps({{"failed": info["failed_mirrors"], "all_bad_exit": code}}))
    """,
    )
    failed = result["failed"]
    assert [f.split(":")[0] for f in failed[:3]] == ["fifo.tgz", "/dev/zero", "zero.tgz"]
    assert "is a FIFO (named pipe), not an archive file or an image folder" in failed[0]
    assert "is a character device" in failed[1] and "is a character device" in failed[2]
    assert failed[3].startswith("file://") and "FIFO" in failed[3]
    assert result["all_bad_exit"] == 2


SPECIAL_ENTRIES: dict[str, tuple[Callable[[Path, Path], None], str]] = {
    "fifo": (lambda target, outside: os.mkfifo(target), "is a FIFO (named pipe), not an image file"),
    "dev-zero-link": (lambda target, outside: target.symlink_to("/dev/zero"), "a symlink to /dev/zero, outside the image"),
    "link-outside": (lambda target, outside: target.symlink_to(outside), "outside the image folder"),
    "dangling-link": (lambda target, outside: target.symlink_to(target.parent / "gone.png"), "unreadable (No such file"),
    "link-loop": (lambda target, outside: target.symlink_to(target), "unreadable (Too many levels of symbolic links)"),
    "folder-named-png": (lambda target, outside: target.mkdir(), "is a folder, not an image file"),
}


@pytest.fixture(scope="module")
def special_entry_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Each hostile entry in its own image folder, all read by one fresh Python (the code before the
    fix blocked on the FIFO and read /dev/zero without end)."""
    tmp = tmp_path_factory.mktemp("special")
    Image.new("RGB", (32, 32)).save(tmp / "private.png")
    for entry, (make, _) in SPECIAL_ENTRIES.items():
        root = image_folder(tmp / entry)
        make(root / "train" / "cat" / "bad.png", tmp / "private.png")
        (root / "train" / "cat" / "loop").symlink_to(root / "train")  # a folder symlink loop: never walked
    return isolated(
        tmp,
        f"""
        results = {{}}
        for entry in {list(SPECIAL_ENTRIES)!r}:
            try:
                download.run(make_params(source=entry, md5=None), Path(entry + "-raw"), Path("cache"))
                results[entry] = {{"code": 0}}
            except CifarflowError as exc:
                results[entry] = {{"code": exc.exit_code, "message": str(exc)}}
        print(json.dumps(results))
    """,
    )


@pytest.mark.parametrize("entry", list(SPECIAL_ENTRIES))
def test_image_folder_special_entries_are_input_errors(special_entry_results: dict[str, Any], entry: str) -> None:
    result = special_entry_results[entry]
    assert result["code"] == 2, result
    assert f"{entry}/train/cat/bad.png: " in result["message"] and SPECIAL_ENTRIES[entry][1] in result["message"], result


def test_image_folder_stops_at_max_members(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "folder", per_class=4)
    with pytest.raises(InputError, match=r"more than 10 files and folders, over data.max_members=10"):
        run(tmp_path, source=str(root), md5=None, max_members=10)


# --- 6. image bombs -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "cap"),
    [((15000, 15000), None), ((12000, 12000), None), ((100, 100), 1024)],
    ids=["15000px-pillow-bomb-error", "12000px-over-default-cap", "100px-over-small-cap"],
)
def test_image_folder_bomb_is_input_error_naming_file(tmp_path: Path, size: tuple[int, int], cap: int | None) -> None:
    root = image_folder(tmp_path / "folder")
    png_bomb(root / "test" / "dog" / "bomb.png", *size)
    params = {"max_image_pixels": cap} if cap else {}
    with pytest.raises(InputError, match=r"test/dog/bomb.png: .*over data.max_image_pixels"):
        run(tmp_path, source=str(root), md5=None, **params)


def test_predict_expand_refuses_special_paths_and_never_loops(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(photos / "sub" / "a.png")
    os.mkfifo(photos / "sub" / "pipe.png")
    (photos / "sub" / "up").symlink_to(photos)  # a folder symlink loop
    (photos / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    os.mkfifo(tmp_path / "given.png")
    files, errors = predict.expand([photos, tmp_path / "given.png", Path("/dev/zero"), tmp_path / "missing.png"])
    assert files == [photos / "sub" / "a.png"]
    assert any(e.startswith(f"{photos / 'sub' / 'pipe.png'}: is a FIFO") for e in errors), errors
    assert any(e.startswith(f"{photos / 'dangling.jpg'}: cannot read") for e in errors), errors
    assert f"{tmp_path / 'given.png'}: is a FIFO (named pipe), not an image file or folder" in errors
    assert "/dev/zero: is a character device, not an image file or folder" in errors
    assert f"{tmp_path / 'missing.png'}: no such file or folder" in errors


def test_predict_one_bad_image_does_not_abort_the_batch(tmp_path: Path, monkeypatch, capsys) -> None:
    good = tmp_path / "good.png"
    Image.new("RGB", (32, 32), (200, 10, 10)).save(good)
    png_bomb(tmp_path / "bomb.png", 15000, 15000)  # Pillow's own DecompressionBombError
    png_bomb(tmp_path / "huge.png", 5000, 5000)  # over the cap below, under Pillow's default
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
    Image.new("RGB", (32, 32)).save(tmp_path / "notpng.png", format="BMP")  # a decoder outside PNG/JPEG
    os.mkfifo(tmp_path / "pipe.png")
    classes = list(cb.CIFAR10_CLASSES)
    monkeypatch.setattr(predict, "load_model", lambda model_dir: (classes, FakeServed(len(classes))))
    code = predict.run([tmp_path], tmp_path / "model", "json", 4096 * 4096)
    out, err = capsys.readouterr()
    assert code == 1
    assert [Path(r["path"]).name for r in json.loads(out)] == ["good.png"]
    assert re.search(r"bomb.png: image over data.max_image_pixels=16777216", err)
    assert re.search(r"huge.png: image over data.max_image_pixels=16777216", err)
    for name in ("corrupt.png: not a readable image", "notpng.png: not a readable image", "pipe.png: is a FIFO"):
        assert name in err, err


def test_predict_huge_png_is_refused_before_decoding(tmp_path: Path) -> None:
    """A 12000x12000 PNG (18 KB on disk) took 1.4 GB to decode; the header check refuses it first."""
    png_bomb(tmp_path / "huge.png", 12000, 12000)
    Image.new("RGB", (32, 32)).save(tmp_path / "ok.png")
    result = isolated(
        tmp_path,
        """
        errors = []
        names = [n for batch, _ in predict.batches([Path("huge.png"), Path("ok.png")], 4096 * 4096, errors) for n in batch]
        print(json.dumps({"names": names, "errors": errors, "grown_mb": grown_mb()}))
    """,
    )
    assert result["names"] == ["ok.png"] and "huge.png: image over data.max_image_pixels" in result["errors"][0]
    assert result["grown_mb"] < 100, f"{result['grown_mb']:.0f} MB: the image was decoded"


def png_with_empty_chunks(path: Path, chunks: int) -> None:
    """A valid 32x32 PNG with `chunks` empty private ancillary chunks (12 bytes each) before its pixels."""
    import struct
    import zlib

    good = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(good, format="PNG")
    data = good.getvalue()
    ihdr_end = 8 + 12 + 13  # the signature, then IHDR: always first, 13 bytes of data
    empty = struct.pack(">I", 0) + b"zzZz" + struct.pack(">I", zlib.crc32(b"zzZz"))
    path.write_bytes(data[:ihdr_end] + empty * chunks + data[ihdr_end:])


def test_a_png_of_millions_of_empty_chunks_is_refused_before_any_decoder_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """2,000,000 empty chunks (24 MB, within the size cap of a 4096x4096 image) took Pillow ~38 s to
    parse; they are counted from their headers, up to data.max_image_chunks, and refused unparsed."""
    png_with_empty_chunks(tmp_path / "few.png", 200)
    assert image_file.decode(tmp_path / "few.png", 4096, resize=False, max_chunks=1000)[0, 0].tolist() == [200, 10, 10]
    with pytest.raises(InputError, match=r"few.png: a PNG of more than 100 chunks, over data.max_image_chunks=100; refused"):
        image_file.decode(tmp_path / "few.png", 4096, resize=False, max_chunks=100)
    png_with_empty_chunks(tmp_path / "slow.png", 2_000_000)
    monkeypatch.setattr(image_file.Image, "open", lambda *a, **k: pytest.fail("a decoder ran on the chunk bomb"))
    limit = DataParams.model_fields["max_image_chunks"].default
    with pytest.raises(InputError, match=rf"slow.png: a PNG of more than {limit:,} chunks"):
        image_file.decode(tmp_path / "slow.png", 4096 * 4096, resize=True, max_chunks=limit)


# --- 7. secrets in URLs ---------------------------------------------------------------------------


def test_signed_urls_never_reach_logs_messages_or_run_info(
    tmp_path: Path, archive_bytes: bytes, server: Server, caplog, capsys
) -> None:
    closed = Server()  # a port where nothing listens
    dead = f"http://127.0.0.1:{closed.server_address[1]}/a.tgz?X-Amz-Signature=SECRET2"
    closed.server_close()
    server.routes["/gone.tgz"] = body(b"", status=404)
    server.routes["/hop"] = redirect("file:///srv/a.tgz?token=SECRET3")
    server.routes["/loop"] = redirect("/loop?X-Amz-Signature=SECRET4")
    server.routes["/ok.tgz"] = body(archive_bytes)
    sources = [
        server.url("/gone.tgz?X-Amz-Signature=SECRET1"),
        dead,
        server.url("/hop?sig=SECRET3a"),
        server.url("/loop?X-Amz-Signature=SECRET4a"),
        server.url("/ok.tgz?X-Amz-Signature=SECRET5"),
    ]
    with caplog.at_level(logging.DEBUG):
        run(tmp_path, source=sources, sha256=sha256(archive_bytes), md5=None, retries=1)
        with pytest.raises(SourceUnavailableError) as raised:
            run(tmp_path / "again", source=sources[:4], sha256=sha256(archive_bytes), md5=None, retries=1)
    info = (tmp_path / "run.json").read_text()
    seen = "\n".join([info, str(raised.value), caplog.text, *capsys.readouterr()])
    assert "SECRET" not in seen, [line for line in seen.splitlines() if "SECRET" in line]
    assert "X-Amz-Signature" not in seen
    assert len(json.loads(info)["failed_mirrors"]) == 4 and "retry 1/1" in caplog.text
    assert fetch.shown_name(sources[-1]) == "ok.tgz"


# --- hypothesis: any bytes, any layout: InputError or a bounded result, nothing else -------------

COMPRESS = {"tar": lambda b: b, "gz": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress}
CAPS = {"max_extract_bytes": 64 << 10, "max_members": 20}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=3000), kind=st.sampled_from(sorted(COMPRESS)))
def test_random_bytes_as_archive_are_input_error(data: bytes, kind: str) -> None:
    with pytest.raises(InputError):
        read_batches(io.BytesIO(COMPRESS[kind](data)), 32 << 10, "fuzz", **CAPS)


NAMES = st.sampled_from(
    [f"{cb.FOLDER}/{name}" for name in cb.EXPECTED_FILES]
    + ["../evil", "/abs", "a/../../b", "C:x", "\\\\server\\x", "x" * 150, cb.FOLDER, ".", "", "ok/file", "./" + cb.FOLDER]
)
TYPES = st.sampled_from(
    [
        tarfile.REGTYPE,
        tarfile.AREGTYPE,
        tarfile.DIRTYPE,
        tarfile.SYMTYPE,
        tarfile.LNKTYPE,
        tarfile.CHRTYPE,
        tarfile.FIFOTYPE,
        tarfile.CONTTYPE,
        tarfile.XHDTYPE,
        tarfile.GNUTYPE_LONGNAME,
        b"Z",
    ]
)
MEMBERS = st.lists(st.tuples(NAMES, TYPES, st.binary(max_size=20000)), max_size=30)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    members=MEMBERS,
    kind=st.sampled_from(sorted(COMPRESS)),
    cut=st.none() | st.integers(0, 60000),
    flip=st.none() | st.tuples(st.integers(0, 60000), st.integers(1, 255)),
    fmt=st.sampled_from([tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT]),
)
def test_random_tar_layouts_are_input_error_or_bounded(
    members: list, kind: str, cut: int | None, flip: tuple[int, int] | None, fmt: int
) -> None:
    buffer = io.BytesIO()
    try:
        with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
            for name, kind_, data in members:
                info = tarfile.TarInfo(name)
                info.type, info.size = kind_, len(data)
                tar.addfile(info, io.BytesIO(data))
    except ValueError:  # tarfile refuses to write some names in some formats: nothing to read then
        return
    raw = bytearray(buffer.getvalue())
    if flip is not None and flip[0] < len(raw):
        raw[flip[0]] ^= flip[1]
    blob = COMPRESS[kind](bytes(raw[:cut] if cut is not None else raw))
    try:
        files = read_batches(io.BytesIO(blob), 32 << 10, "fuzz", **CAPS)
    except InputError:
        return
    assert set(files) == set(cb.EXPECTED_FILES)
    assert sum(map(len, files.values())) <= CAPS["max_extract_bytes"]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=2000), prefix=st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a"]))
def test_random_bytes_as_image_are_that_files_error(tmp_path: Path, data: bytes, prefix: bytes) -> None:
    path = tmp_path / "fuzz.png"
    path.write_bytes(prefix + data)
    try:
        with pixel_limit(4096):
            image = decode(path, 4096, resize=True, max_chunks=100)
    except InputError as exc:
        assert str(exc).startswith(f"{path}: ")
        return
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8


# --- 8. size caps on local files, generated archives, predict's labels and walk, redaction -------


def sparse(path: Path, size: int) -> Path:
    """`truncate -s SIZE path`: a file of `size` bytes that takes no disk space."""
    path.write_bytes(b"")
    os.truncate(path, size)
    return path


def test_huge_sparse_files_are_refused_by_their_size(tmp_path: Path) -> None:
    """`truncate -s 200G`: as a local archive (path or file://) over data.max_download_mb=1, as an image
    in an image folder, and given to predict: each refused from its size, before a byte is hashed or
    decoded (before the fix the archive and the image-folder file were hashed, 200 GB each)."""
    size = 200 << 30
    sparse(tmp_path / "huge.tar.gz", size)
    sparse(image_folder(tmp_path / "folder") / "train" / "cat" / "x.png", size)
    result = isolated(
        tmp_path,
        """
        import time
        out = {}
        capped = {"sha256": "0" * 64, "md5": None, "max_download_mb": 1}
        for name, source, data in [("path", "huge.tar.gz", capped), ("file-url", Path("huge.tar.gz").resolve().as_uri(), capped),
                                   ("folder", "folder", {"md5": None})]:
            started = time.monotonic()
            try:
                download.run(make_params(source=source, **data), Path(name + "-raw"), Path("cache"))
                out[name] = {"code": 0}
            except CifarflowError as exc:
                out[name] = {"code": exc.exit_code, "message": str(exc), "seconds": time.monotonic() - started}
        errors = []
        files = [Path("folder/train/cat/x.png"), Path("folder/train/cat/0.png")]
        names = [n for batch, _ in predict.batches(files, 4096 * 4096, errors) for n in batch]
        out["predict"] = {"names": names, "errors": errors}
        print(json.dumps(out))
    """,
        timeout=60,
    )
    for name in ("path", "file-url"):
        assert result[name]["code"] == 2, result[name]
        assert "214,748,364,800 bytes, over data.max_download_mb=1" in result[name]["message"], result[name]
        assert result[name]["seconds"] < 5, result[name]
    folder = result["folder"]
    assert folder["code"] == 2 and folder["seconds"] < 5, folder
    assert re.search(
        r"folder/train/cat/x\.png: 214,748,364,800 bytes, over the [\d,]+ bytes an image within "
        r"data\.max_image_pixels=16777216",
        folder["message"],
    ), folder
    assert result["predict"]["names"] == ["folder/train/cat/0.png"], result["predict"]
    [error] = result["predict"]["errors"]
    assert error.startswith("folder/train/cat/x.png: 214,748,364,800 bytes") and "data.max_image_pixels" in error


def test_synth_archive_is_synth_data_whatever_serves_it(tmp_path: Path, server: Server) -> None:
    """An archive from `cifarflow synth-archive` (its marker member) is kind "synth" from a path, a
    file:// URL, http (verified or not): export never blesses a model trained on it without --force.
    The same batches without the marker are an "archive"; the marker never reaches the outputs."""
    from cifarflow.data.synth import synth_files, write_synth_archive

    write_synth_archive(tmp_path / "synth.tgz", TRAIN, 50, seed=5)
    blob = (tmp_path / "synth.tgz").read_bytes()
    cb.write_archive(tmp_path / "plain.tgz", synth_files(TRAIN, 50, seed=5))  # the same data, unmarked
    server.routes["/synth.tgz"] = body(blob)
    verified = {"sha256": sha256(blob), "md5": None, "retries": 0}
    cases = {
        "path": (str(tmp_path / "synth.tgz"), verified),
        "file-url": ((tmp_path / "synth.tgz").as_uri(), verified),
        "http": (server.url("/synth.tgz"), verified),
        "http-unverified": (server.url("/synth.tgz"), {"md5": None, "allow_unverified": True, "retries": 0}),
        "plain": (str(tmp_path / "plain.tgz"), {"md5": None, "allow_unverified": True}),
    }
    kinds = {}
    for name, (source, data) in cases.items():
        manifest = download.run(
            make_params(source=source, **data), tmp_path / name, tmp_path / "cache", tmp_path / f"{name}.json", backoff_s=0.01
        )
        kinds[name] = manifest["kind"]
        assert sorted(os.listdir(tmp_path / name / cb.FOLDER)) == sorted(cb.EXPECTED_FILES)
    assert kinds == {"path": "synth", "file-url": "synth", "http": "synth", "http-unverified": "synth", "plain": "archive"}
    assert any("generated archive" in note for note in json.loads((tmp_path / "http.json").read_text())["notes"])
    files = {f: (tmp_path / "path" / cb.FOLDER / f).read_bytes() for f in cb.EXPECTED_FILES}
    assert files == {f: (tmp_path / "plain" / cb.FOLDER / f).read_bytes() for f in cb.EXPECTED_FILES}


class FakeTensor:
    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def numpy(self) -> np.ndarray:
        return self.array


class FakeServed:
    """A served model without TensorFlow: every image gets the same scores, falling from the first class."""

    def __init__(self, classes: int) -> None:
        self.scores = np.linspace(1, 0, classes, dtype=np.float32)

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        return np.tile(self.scores, (len(images), 1))


def fake_tensorflow(monkeypatch: pytest.MonkeyPatch, scores: list[float], calls: list[str] | None = None) -> None:
    """predict.load_model's tensorflow, without TensorFlow: every image gets `scores`."""
    import types

    def serving(images: np.ndarray) -> dict[str, FakeTensor]:
        if calls is not None:
            calls.append(f"serve {len(images)}")
        return {"probs": FakeTensor(np.tile(np.array(scores, np.float32), (len(images), 1)))}

    serving.structured_input_signature = ((), {"images": types.SimpleNamespace(dtype=np.uint8)})  # what export declares
    loaded = types.SimpleNamespace(signatures={"serving_default": serving})
    fake = types.SimpleNamespace(constant=np.asarray, uint8=np.uint8, saved_model=types.SimpleNamespace(load=lambda path: loaded))
    monkeypatch.setitem(sys.modules, "tensorflow", fake)
    # an export of no real SavedModel: its served files are not checked, its card is not read
    monkeypatch.setattr(predict, "open_export", lambda export: predict.ServedModel(Path(export) / "saved_model"))
    monkeypatch.setattr(predict, "read_card", lambda export: {})


def test_predict_reads_a_class_name_with_a_space_in_its_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """A class named `sea lion` (parse_meta allows it): labels.json is a JSON list, so the labels after
    it keep their place (labels.txt's .split() once made "dog" into "lion")."""
    model = tmp_path / "model"
    (model / "saved_model").mkdir(parents=True)
    (model / "labels.json").write_text(json.dumps(["cat", "sea lion", "dog"]))
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    fake_tensorflow(monkeypatch, [0.1, 0.2, 0.7])
    assert predict.run([tmp_path / "a.png"], model, "json", 4096 * 4096) == 0
    [result] = json.loads(capsys.readouterr().out)
    assert result["label"] == "dog" and [t["label"] for t in result["top3"]] == ["dog", "sea lion", "cat"]


def test_predict_walk_stops_at_max_members(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """A folder with more files than data.max_members: the walk stops there with an error line (the
    others found are still classified); `cifarflow predict /proc` ends at the cap too."""
    photos = tmp_path / "photos"
    for sub in ("a", "b"):
        (photos / sub).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (32, 32)).save(photos / sub / f"{i}.png")
    classes = list(cb.CIFAR10_CLASSES)
    monkeypatch.setattr(predict, "load_model", lambda model_dir: (classes, FakeServed(len(classes))))
    code = predict.run([photos], tmp_path / "model", "json", 4096 * 4096, max_files=5)
    out, err = capsys.readouterr()
    assert code == 1
    assert f"{photos}: more than 5 files and folders, over data.max_members=5; stopped there" in err, err
    assert 0 < len(json.loads(out)) < 5
    started = time.monotonic()
    files, errors = predict.expand([Path("/proc")], max_files=1000)
    assert time.monotonic() - started < 10
    assert len(files) <= 1000 and "/proc: more than 1,000 files and folders, over data.max_members=1000" in errors[-1]


def test_predict_streams_images_through_the_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Images are read a batch at a time and classified as they come, not all loaded first."""
    for i in range(5):
        Image.new("RGB", (32, 32), (i, 0, 0)).save(tmp_path / f"{i}.png")
    model = tmp_path / "model"
    (model / "saved_model").mkdir(parents=True)
    (model / "labels.json").write_text(json.dumps(list(cb.CIFAR10_CLASSES)))
    calls: list[str] = []
    fake_tensorflow(monkeypatch, list(np.linspace(1, 0, 10)), calls)
    real_decode = predict.decode
    monkeypatch.setattr(
        predict,
        "decode",
        lambda path, max_pixels, **kw: calls.append("load") or real_decode(path, max_pixels, **kw),
    )
    monkeypatch.setattr(predict, "SERVING_BATCH", 2)
    results, errors = predict.classify(model, sorted(tmp_path.glob("*.png")), 4096 * 4096)
    assert errors == [] and len(results) == 5
    assert calls == ["load", "load", "serve 2", "load", "load", "serve 2", "load", "serve 1"]


def test_secrets_in_local_sources_never_reach_messages(tmp_path: Path, archive: Path, caplog) -> None:
    """A URL config does not recognise (`HTTP://bob:pw@host/x.tgz`: upper case) is a local path to
    download; its message showed the source and its realpath, password included. Only the redacted
    label is shown now, also for an image folder whose path holds `user:password@`."""
    data = make_params(md5=None, allow_unverified=True).data
    with pytest.raises(download.MirrorFailed) as raised:
        download.obtain("HTTP://bob:SECRET1@host/x.tgz?token=SECRET2", data, tmp_path / "cache")
    assert str(raised.value).startswith("REDACTED@host/x.tgz?REDACTED: no such file or folder"), raised.value
    assert download.shown("HTTP:/bob:SECRET1@host/x.tgz") == "REDACTED@host/x.tgz"
    root = image_folder(tmp_path / "u:SECRET3@host")
    (root / "test" / "dog" / "broken.png").write_bytes(b"not a png")
    with caplog.at_level(logging.DEBUG), pytest.raises(InputError) as failed:
        run(tmp_path, source=[str(root), str(tmp_path / "a?sig=SECRET4")], md5=None)
    message = str(failed.value)
    assert "REDACTED@host/test/dog/broken.png: not a readable image" in message, message
    assert "a?REDACTED: no such file or folder" in message, message
    run(tmp_path, source=[str(tmp_path / "gone@x?sig=SECRET5"), str(archive)], md5=None, allow_unverified=True)
    seen = "\n".join([str(raised.value), message, caplog.text, (tmp_path / "run.json").read_text()])
    assert "SECRET" not in seen, [line for line in seen.splitlines() if "SECRET" in line]


# --- 9. images read as they are: every Pillow mode, against an independent conversion ------------


def jfif_rgb(ycbcr: np.ndarray) -> np.ndarray:
    """JPEG's YCbCr -> RGB (JFIF, full range), in floating point: the reference for Pillow's fixed point."""
    y, cb, cr = (ycbcr[..., i].astype(np.float64) for i in range(3))
    rgb = np.stack([y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128), y + 1.772 * (cb - 128)], -1)
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


def mode_cases() -> dict[str, tuple[Any, np.ndarray]]:
    """mode -> (an image of that mode, the RGB it holds, computed here without Pillow's conversions)."""
    rng = np.random.default_rng(5)
    grey = rng.integers(0, 256, (32, 32), dtype=np.uint8)
    rgb = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (32, 32), dtype=np.uint8)
    bits = grey > 127
    wide = rng.integers(0, 65536, (32, 32), dtype=np.uint16)
    wide[0, :4] = [0, 128, 129, 65535]  # the rounding edges: 0, 0, 1, 255
    palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    indexed = Image.fromarray(grey, "L").convert("P")  # a palette image whose entries we set
    indexed.putpalette(palette.flatten().tolist())
    with_alpha = indexed.convert("PA")
    with_alpha.putalpha(Image.fromarray(alpha))
    ycbcr = rng.integers(16, 240, (32, 32, 3), dtype=np.uint8)
    three = lambda a: np.repeat(a[..., None], 3, axis=-1)  # noqa: E731
    return {
        "1": (Image.fromarray(bits), three(np.where(bits, 255, 0).astype(np.uint8))),
        "L": (Image.fromarray(grey, "L"), three(grey)),
        "LA": (Image.fromarray(np.stack([grey, alpha], -1), "LA"), three(grey)),  # alpha dropped: the grey as stored
        "P": (indexed, palette[grey]),
        "PA": (with_alpha, palette[grey]),
        "RGB": (Image.fromarray(rgb, "RGB"), rgb),
        "RGBA": (Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), rgb),
        "YCbCr": (Image.fromarray(ycbcr, "YCbCr"), jfif_rgb(ycbcr)),
        "I;16": (Image.fromarray(wide), three(np.round(wide / 257).astype(np.uint8))),
    }


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "YCbCr", "I;16"])
def test_every_accepted_mode_keeps_its_pixel_values(mode: str) -> None:
    image, expected = mode_cases()[mode]
    assert image.mode == mode
    got = np.asarray(image_file.to_rgb(image, f"x.{mode}"))
    assert got.shape == (32, 32, 3) and got.dtype == np.uint8
    tolerance = 1 if mode == "YCbCr" else 0  # Pillow's fixed-point JFIF rounds a few values the other way
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= tolerance, mode


@pytest.mark.parametrize(
    ("mode", "why"),
    [("CMYK", "colour profile"), ("I", "32-bit integer pixels"), ("F", "floating-point pixels"), ("HSV", "pixel mode 'HSV'")],
)
def test_modes_that_cannot_be_converted_faithfully_are_that_files_error(mode: str, why: str) -> None:
    with pytest.raises(InputError, match=rf"^x.img: .*{re.escape(why)}"):
        image_file.to_rgb(Image.new(mode, (32, 32)), "x.img")


def test_a_16_bit_png_is_read_as_its_values_not_as_white(tmp_path: Path) -> None:
    """A 16-bit grey PNG (Pillow's I;16) was converted as if its values were 8-bit: all 255."""
    wide = (np.arange(32 * 32, dtype=np.uint32).reshape(32, 32) * 64).astype(np.uint16)
    Image.fromarray(wide).save(tmp_path / "grey16.png")
    got = image_file.decode(tmp_path / "grey16.png", 4096, resize=False, max_chunks=100)
    assert np.array_equal(got[..., 0], np.round(wide / 257).astype(np.uint8)) and (got == 255).mean() < 0.01
    Image.new("CMYK", (32, 32)).save(tmp_path / "cmyk.jpg")
    with pytest.raises(InputError, match="cmyk.jpg: CMYK pixels need the image's colour profile"):
        image_file.decode(tmp_path / "cmyk.jpg", 4096, resize=True, max_chunks=100)
