"""Shared fixtures: tiny synthetic archives in the real binary layout, params, a local HTTP server."""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from cifarflow.data import cifar_binary as cb
from cifarflow.data.synth import synth_archive_bytes, synth_files
from cifarflow.executables import beside_python
from cifarflow.settings import Params, resolve

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def no_stderr_filter_in_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """`cli.main` called in the test process must not put the process's fd 2 through the native-stderr
    filter (a child process, for the rest of the session, under pytest's capture and mutmut's
    bookkeeping of its children): the tests of the filter run the CLI in a subprocess."""
    from cifarflow import native_stderr

    monkeypatch.setattr(native_stderr, "quiet_tensorflow", lambda: None)


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto`: one worker more than the cores, at most 4. Much of a test's time is spent waiting
    (on a server, a killed process, a subprocess's start), which the extra worker fills; beyond 4
    the session's memory (a TensorFlow per worker) grows for little."""
    return min(4, (os.cpu_count() or 1) + 1)


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


# A minimal valid recipe, for tests of the params rules.
RECIPE = {
    "model": "lenet",
    "epochs": 1,
    "batch_size": 8,
    "optimizer": {"name": "adam", "learning_rate": 0.001},
    "normalization": "center",
}


def recorded_gate(tolerance: float = 0.01, min_accuracy: float = 0.0, manifest: str = "m" * 64) -> Any:
    """The promotion policy as `cifarflow promote` applies it under the registry's lock, with the
    champion "re-scored" as the accuracy its version recorded: the registry's mechanics without TensorFlow."""
    from cifarflow import policy
    from cifarflow.settings import ExportParams

    rules = ExportParams(min_accuracy=min_accuracy, tolerance=tolerance)

    def decide(card: dict, champion: Any, rolled_back: dict | None) -> policy.Verdict:
        scored = policy.Champion(champion.name, champion.digest, champion.facts["test_accuracy"]) if champion else None
        return policy.decide(policy.Candidate.from_card(card), scored, rules, rolled_back, manifest)

    return decide


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TIMELESS_PNG_CHUNKS = {b"IHDR", b"IDAT", b"IEND", b"pHYs", b"PLTE", b"tRNS"}  # pixels and geometry only


def png_chunk_types(data: bytes) -> list[bytes]:
    """The chunk types of a PNG, in order (its structure, read without any image library)."""
    assert data.startswith(PNG_SIGNATURE), data[:8]
    types, offset = [], len(PNG_SIGNATURE)
    while offset < len(data):
        length = int.from_bytes(data[offset : offset + 4], "big")
        types.append(data[offset + 4 : offset + 8])
        offset += 12 + length  # length, type, data, crc
    return types


def assert_same_png_later(render: Any) -> None:
    """`render()` gives a PNG with nothing in it but pixels and geometry (no time, text or software
    stamp), and the same bytes again more than a second later (a clock's second has changed)."""
    first = render()
    assert set(png_chunk_types(first)) <= TIMELESS_PNG_CHUNKS, png_chunk_types(first)
    time.sleep(1.1)
    assert render() == first


def learnable_image_folder(root: Path, train: int = 2000, test: int = 500, seed: int = 0, mislabel: int = 15) -> Path:
    """The smoke profile's generated images written as an image folder (train/<class>/*.png,
    test/<class>/*.png): the same learnable task, but a source that counts as real data, for tests of
    what only real data may do (be blessed, be promoted without --force)."""
    from PIL import Image

    files = synth_files(train, test, seed, mislabel)
    classes = cb.parse_meta(files[cb.META_FILE])
    batches = {"train": b"".join(files[name] for name in cb.TRAIN_FILES), "test": files[cb.TEST_FILE]}
    for split, data in batches.items():
        images, labels = cb.decode_records(data, split)
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            folder = root / split / classes[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{i:05d}.png")
    return root


def verdict_reasons(card: dict[str, Any], failed_only: bool = False) -> list[str]:
    """A model card's verdict, as its checks' reasons (only the failed ones with `failed_only`)."""
    return [c["reason"] for c in card["verdict"]["checks"] if not (failed_only and c["passed"])]


def make_params(**data: Any) -> Params:
    """Params with the given `data` keys; everything else default."""
    return resolve({"data": data})


def resolve_raw(changes: dict[str, Any]) -> Params:
    """The project's params.yaml (its recipes, the full profile) with `changes` merged in, resolved."""
    from cifarflow.settings import deep_merge

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    return resolve(deep_merge({k: v for k, v in raw.items() if k != "profiles"}, changes))


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

    def do_GET(self) -> None:
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
    """The environment for subprocesses: this venv's tools (dvc, cifarflow) first on PATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


# --- DVC workspaces -----------------------------------------------------------------------------


def project_files() -> list[str]:
    """The files a clone of the project would have (those git tracks), with the uncommitted edits to
    them being tested: never a stray file of a used checkout (a dvc.lock left by the README's steps)."""
    from cifarflow.workspace import project_files as tracked

    return tracked(REPO)


def run_in(workspace: Path, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command in a workspace, with the workspace's own copy of the package importable."""
    import subprocess

    env = cli_env()
    env["PYTHONPATH"] = str(workspace) + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run(list(cmd), cwd=workspace, env=env, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {done.returncode}\n{done.stdout}\n{done.stderr}")
    return done


def set_params(workspace: Path, **changes: Any) -> None:
    """Edit params.yaml the way a user would; dotted keys, e.g. set_params(ws, **{"data.shards": 3})."""
    from cifarflow.params_file import set_keys

    set_keys(workspace / "params.yaml", changes)


def new_workspace(root: Path) -> Path:
    """A git + DVC workspace holding the project's files, as a fresh clone would."""
    import shutil

    root.mkdir(parents=True)
    for rel in project_files():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, root / rel)
    run_in(root, "git", "init", "-q")
    run_in(root, "git", "add", "-A")
    run_in(root, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "workspace")
    return root


def built_once(factory: pytest.TempPathFactory, name: str, build: Callable[[Path], object]) -> Path:
    """`build(folder)` run once per test session however many pytest-xdist workers ask: the first
    builds under a file lock in the session's folder, the others wait for it and reuse the folder
    (or fail with its error, rather than building again)."""
    from filelock import FileLock

    shared = factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # pytest-N/, the folder above each worker's own
    folder, failed, built = shared / name, shared / f"{name}.failed", shared / f"{name}.built"
    with FileLock(shared / f"{name}.lock"):
        if failed.exists():
            raise AssertionError(f"{name}: failed to build in another worker of this session:\n{failed.read_text()}")
        if not built.exists():
            try:
                build(folder)
            except BaseException as error:
                failed.write_text(f"{type(error).__name__}: {error}")
                raise
            built.touch()
    return folder


@pytest.fixture(scope="session")
def smoke_workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One smoke-profile workspace per test session, after a full `dvc repro`. Do not modify:
    use the `workspace` fixture for a private copy."""
    return built_once(tmp_path_factory, "smoke", build_smoke) / "project" / "runs" / "smoke"


def build_smoke(folder: Path) -> None:
    project = new_workspace(folder / "project")
    done = make(project, "pipeline", "PROFILE=smoke")  # the README's quickstart: its own copy, runs/smoke/
    (project / "make-pipeline-smoke.log").write_text(done.stdout + done.stderr)


MAKES: set[subprocess.Popen[str]] = set()  # `make`s under way: killed if the session ends first


def make(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`make` in a project copy, with this session's venv standing in for the one make would create."""
    venv = Path(sys.executable).parent.parent
    cmd = ["make", "-C", str(project), f"VENV={venv}", "-o", f"{venv}/bin/.installed", *args]
    process = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(), start_new_session=True
    )
    MAKES.add(process)
    try:
        stdout, stderr = process.communicate()
    finally:
        MAKES.discard(process)
    if process.returncode != 0:
        raise AssertionError(f"make {' '.join(args)} exited {process.returncode}\n{stdout[-3000:]}\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(cmd, process.returncode, stdout, stderr)


def pytest_collection_finish(session: pytest.Session) -> None:
    """The smoke workspace takes minutes to build and most of it on one core: one worker starts it
    now, in a thread, while the tests that do not need it run; the first that does waits for it."""
    if os.environ.get("PYTEST_XDIST_WORKER", "gw0") != "gw0" or session.config.option.collectonly:
        return
    if any("smoke_workspace" in getattr(item, "fixturenames", ()) for item in session.items):
        factory = session.config._tmp_path_factory  # type: ignore[attr-defined]  # the session's, as fixtures get it
        threading.Thread(target=built_once, args=(factory, "smoke", build_smoke), daemon=True).start()


@pytest.fixture
def workspace(smoke_workspace: Path, tmp_path: Path) -> Path:
    """A private copy of the smoke workspace (git, DVC cache and outputs included)."""
    import shutil

    copy = tmp_path / "ws"
    shutil.copytree(smoke_workspace, copy, symlinks=True)
    return copy


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shards of a tiny synthetic dataset (250 train / 50 val / 50 test), shared by the session."""
    return built_once(tmp_path_factory, "tiny", build_tiny) / "shards"


def build_tiny(root: Path) -> None:
    from cifarflow.data import download, preprocess, validate

    params = make_params(source="synth:train=300,test=50,seed=4", md5=None, val_size=50, shards=2)
    download.run(params, root / "raw", root / "cache")
    preprocess.run(params, root / "raw", root / "shards")
    checked = root / "validation"
    validate.run(make_params(), root / "shards", checked / "metrics.json", checked / "report.md", checked / "verdict.json")


@pytest.fixture(scope="session")
def verdict(tiny_shards: Path) -> Path:
    """Training requires the validate stage's verdict: the session's tiny shards', made with them."""
    return tiny_shards.parent / "validation" / "verdict.json"


def train_params(arch: str = "lenet", **recipe: Any) -> Params:
    """Params with one tiny recipe, `arch`, for trainer tests."""
    base = {
        "model": "lenet",
        "variant": "tiny",
        "epochs": 2,
        "batch_size": 32,
        "optimizer": {"name": "adam", "learning_rate": 0.002},
        "normalization": "minmax",
    }
    return resolve(
        {
            "data": {"source": "synth:train=300,test=50", "md5": None, "val_size": 50, "shards": 2},
            "archs": [arch],
            "train": {arch: {**base, **recipe}},
        }
    )


# --- Prefect ----------------------------------------------------------------------------------


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Prefect's console handlers write to whatever sys.stderr was when Prefect set up logging: in a
    test, pytest's capture file, which pytest closes at exit. Prefect still logs after that (the
    temporary server's atexit `stop`: "Stopping temporary server on ..."), which printed a "Logging
    error ... I/O operation on closed file" traceback after the summary. Point them at the real
    stderr, and keep only warnings and errors: the teardown's INFO chatter is not news. And a smoke
    build still under way is stopped if the session was (Ctrl-C, -x), and otherwise waited for: this
    worker may be done while another one waits for the build it started."""
    import logging

    stopped = exitstatus == pytest.ExitCode.INTERRUPTED or session.shouldfail or session.shouldstop
    for process in list(MAKES):
        if stopped:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    if "prefect" not in sys.modules:
        return
    from prefect.logging.handlers import PrefectConsoleHandler

    loggers = [logging.getLogger(), *(v for v in logging.Logger.manager.loggerDict.values() if isinstance(v, logging.Logger))]
    for handler in {h for logger in loggers for h in logger.handlers if isinstance(h, PrefectConsoleHandler)}:
        handler.setStream(sys.__stderr__)
        handler.console.file = sys.__stderr__
        handler.setLevel(max(handler.level, logging.WARNING))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prefect_env(api_url: str, home: Path) -> dict[str, str]:
    return {
        **cli_env(),
        "PREFECT_API_URL": api_url,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_DATABASE_TIMEOUT": "60",  # SQLite's lock wait: the flows' bursts of writes (as run_flow sets)
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """`prefect server start` on a free port with its own PREFECT_HOME (SQLite); stopped after. Defined
    here, once: a fixture imported into several test modules is a separate fixture in each, so each
    would start its own server, and Prefect's process-wide event client stays bound to the first one
    (the task runs of later in-process flows would land there)."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = prefect_env(api, home) | {"PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2"}
    log = open(home / "server.log", "w")
    server = subprocess.Popen(
        [beside_python("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{api}/health", timeout=2).ok:
                break
        except requests.RequestException:
            time.sleep(0.5)
    else:
        server.kill()
        raise AssertionError(f"prefect server did not start:\n{(home / 'server.log').read_text()[-3000:]}")
    try:
        yield env
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
