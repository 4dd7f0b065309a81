"""Shared fixtures: tiny synthetic archives in the real binary layout, params, a local HTTP server."""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from cifarflow.config import Params, resolve
from cifarflow.data import cifar_binary as cb
from cifarflow.data.synth import synth_archive_bytes, synth_files

REPO = Path(__file__).resolve().parents[1]
TRAIN, TEST = 200, 50  # tiny: every test stays fast


@pytest.fixture(scope="session")
def archive_bytes() -> bytes:
    return synth_archive_bytes(TRAIN, TEST, seed=1)


@pytest.fixture
def archive(tmp_path: Path, archive_bytes: bytes) -> Path:
    path = tmp_path / "cifar-10-binary.tar.gz"
    path.write_bytes(archive_bytes)
    return path


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_params(**data: Any) -> Params:
    """Params with the given `data` keys; everything else default."""
    return resolve({"data": data})


def tar_gz(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    """A .tar.gz of hand-made members, for malicious and broken archives."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", format=tarfile.GNU_FORMAT) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def valid_members(files: dict[str, bytes] | None = None) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    files = files or synth_files(TRAIN, TEST, seed=1)
    return [(tarfile.TarInfo(f"{cb.FOLDER}/{name}"), data) for name, data in sorted(files.items())]


class Server(http.server.ThreadingHTTPServer):
    """Serves `files`; `drop_after` closes the first response to a path after that many bytes."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.files: dict[str, bytes] = {}
        self.drop_after: dict[str, int] = {}
        self.log: list[dict[str, Any]] = []

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


class Handler(http.server.BaseHTTPRequestHandler):
    server: Server

    def log_message(self, *args: Any) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        data = self.server.files.get(self.path)
        entry: dict[str, Any] = {"path": self.path, "range": self.headers.get("Range")}
        self.server.log.append(entry)
        if data is None:
            entry["status"] = 404
            self.send_error(404)
            return
        start = 0
        if entry["range"]:
            start = int(entry["range"].removeprefix("bytes=").split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            entry["status"] = 206
        else:
            self.send_response(200)
            entry["status"] = 200
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        cut = self.server.drop_after.pop(self.path, None)
        if cut is not None:
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)  # the connection drops mid-file
            return
        self.wfile.write(body)


@pytest.fixture
def http_server() -> Iterator[Server]:
    server = Server()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def write_params(root: Path, raw: dict[str, Any]) -> Path:
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def tree_files(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under root."""
    return {p.relative_to(root).as_posix(): sha256(p.read_bytes()) for p in sorted(root.rglob("*")) if p.is_file()}


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env
