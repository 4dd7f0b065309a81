"""Atomic writes and file hashing: a killed stage never leaves a half file that looks finished."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cifarflow.openfile import open_regular

CHUNK = 1 << 20  # 1 MiB reads: large enough that hashing runs at memory speed


def sha256_file(path: Path) -> str:
    return hash_file(path, "sha256")


def hash_file(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open_regular(path) as f:  # a FIFO where a shard belongs is an error, never a hang
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


# Temp siblings are named `.<target>.<pid>.<random><kind>`: the PID says whose they are, so a
# later writer of the same target can tell a killed process's leftovers (63-342 MB for the
# shards) from a live writer's. `.<target>.<random><kind>` is the name before PIDs were added.
TEMP_KINDS = (".tmp", ".old", ".tmp.keras")
_RANDOM = r"[a-z0-9_]{8}"  # tempfile's names: 8 of "a-z0-9_"
_OURS: set[str] = set()  # this process's temps still in use: a leftover with our PID is an earlier process's


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: nothing is sent, only the existence check
    except ProcessLookupError:
        return False
    except OverflowError:  # not a PID this system can have
        return False
    except OSError:  # EPERM (another user's process) or anything unclear: treat as alive, keep its files
        return True
    return True


def _stale(temp: Path, pid: str | None) -> bool:
    if pid is None:  # named before temps carried a PID: no process of this code owns it
        return True
    if int(pid) == os.getpid():  # PIDs repeat across containers: ours only if this process made it
        return os.path.abspath(temp) not in _OURS
    return not _pid_alive(int(pid))


def stale_temps(path: Path) -> list[Path]:
    """Temp siblings of `path` left by processes that no longer run (or by versions without PIDs)."""
    path = Path(path)
    kinds = "|".join(re.escape(k) for k in TEMP_KINDS)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(?:(\d+)\.)?{_RANDOM}(?:{kinds})")
    try:
        siblings = list(path.parent.iterdir())
    except FileNotFoundError:
        return []
    stale = []
    for sibling in siblings:
        match = pattern.fullmatch(sibling.name)
        if match and _stale(sibling, match[1]):
            stale.append(sibling)
    return sorted(stale)


def remove_stale_temps(path: Path) -> None:
    """Delete what `stale_temps` finds; a live process's temps are never touched."""
    for stale in stale_temps(path):
        try:
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale)
            else:
                stale.unlink()
        except FileNotFoundError:  # another writer of the same target cleaned it first
            pass


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _umask()  # read once: os.umask can only be read by setting it


def _mode_for(path: Path, default: int) -> int:
    """The permission bits `path` has now, or `default` less the umask for a new file or folder."""
    try:
        return os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        return default & ~UMASK


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}."


@contextmanager
def temp_sibling(path: Path, kind: str = ".tmp") -> Iterator[Path]:
    """A fresh PID-named temp file next to `path`, deleted on exit; nothing is renamed."""
    if kind not in TEMP_KINDS:
        raise ValueError(f"temp kind {kind!r} is not one of {TEMP_KINDS}: its leftovers would never be cleaned")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=kind, dir=path.parent)
    os.close(fd)
    _OURS.add(os.path.abspath(tmp))
    try:
        yield Path(tmp)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        _OURS.discard(os.path.abspath(tmp))


@contextmanager
def naming(path: Path) -> Iterator[None]:
    """An OSError raised inside without a file name (a full disk under `f.write`: Python's file
    objects name no file) gets `path`, so its message says which output could not be written."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None:
            exc.filename = str(path)
        raise


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp path next to `path`; rename it onto `path` only if the block succeeds.
    First removes the temps that killed writers of `path` left behind."""
    path = Path(path)
    remove_stale_temps(path)
    with temp_sibling(path) as tmp, naming(path):
        yield tmp
        os.chmod(tmp, _mode_for(path, 0o666))  # mkstemp makes 0600: keep the file's mode, or the usual one
        os.replace(tmp, path)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def dumps_json(obj: Any) -> str:
    """Canonical JSON: sorted keys and a trailing newline, so equal content gives equal bytes."""
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def write_json_atomic(path: Path, obj: Any) -> None:
    write_bytes_atomic(path, dumps_json(obj).encode())


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a fresh temp directory; it replaces `path` only if the block succeeds.

    On failure the temp directory is removed and an existing `path` is left as it was. First
    removes the temp and `.old` directories that killed writers of `path` left behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent))
    _OURS.add(os.path.abspath(tmp))
    try:
        with naming(path):
            yield tmp
        os.chmod(tmp, _mode_for(path, 0o777))  # mkdtemp makes 0700
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".old", dir=path.parent))
            _OURS.add(os.path.abspath(old))
            os.replace(path, old / "x")
            os.replace(tmp, path)
            shutil.rmtree(old)
            _OURS.discard(os.path.abspath(old))
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
        _OURS.discard(os.path.abspath(tmp))


def split_headline(record: dict[str, Any], fields: dict[str, tuple[str, ...]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metrics, details) of a stage's record: `fields` names the keys `dvc metrics show` gets, and of
    a block (a dict) which of its fields (an empty tuple: the key's value itself). The rest is details."""
    metrics: dict[str, Any] = {}
    details: dict[str, Any] = {}
    for key, value in record.items():
        keep = fields.get(key)
        if keep is None:
            details[key] = value
        elif not keep:
            metrics[key] = value
        else:
            metrics[key] = {k: v for k, v in value.items() if k in keep}
            if rest := {k: v for k, v in value.items() if k not in keep}:
                details[key] = rest
    return metrics, details
