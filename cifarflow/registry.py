"""The champion registry: immutable versions, one pointer switched atomically, an append-only history.

    <registry>/REGISTRY                 written when the registry is made: a folder without it is not one
    <registry>/versions/<n>-<digest>/   a promoted export, written whole and fsynced before it appears
    <registry>/CURRENT                  the champion: JSON naming its version and the promotion that made it
    <registry>/history.jsonl            one line per promotion, rollback and clean-up ("what served when")
    <registry>/PENDING                  while a writer stages a version or removes some: which ones
    <registry>/.lock                    held by whoever changes the registry (filelock)

Readers only ever follow CURRENT, which is replaced by a rename: at every instant they see exactly
one complete champion, whatever process is killed when. Writers hold the lock; the first thing a
writer does is finish or undo what a killed writer left (staging folders, a history line not yet
written for the CURRENT it had already switched). Every filesystem change goes through `Durable`,
so a test can kill the process just before and just after each one.

The registry deletes only what it can prove it made and a writer left: the version PENDING names
(written before that version is staged) when the history never recorded it. A version nothing
records is kept and listed as unrecorded; a folder the registry did not make is refused before
anything is written; a history that is missing, emptied or cut short is an error naming it, which
`cifarflow promote --repair` rebuilds from the versions' own records, deleting nothing.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import math
import os
import re
import shutil
import signal
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cifarflow.contract import MODEL_CARD, SAVED_MODEL, read_card
from cifarflow.errors import CifarflowError, InputError
from cifarflow.policy import Verdict
from cifarflow.provenance import describe

VERSIONS, CURRENT, HISTORY, LOCK = "versions", "CURRENT", "history.jsonl", ".lock"
INCOMING, TRASH, SCORES = ".incoming", ".trash", "scores"
MARKER, PENDING = "REGISTRY", "PENDING"
MARKER_CONTENT = b'{"cifarflow_registry": 1}\n'
ARCHIVED = re.compile(r"^history-\d{8}T\d{6}Z(-\d+)?\.jsonl$")  # what `promote --archive-history` moved aside
BACKUP = re.compile(r"^history\.jsonl\.\d{8}T\d{6}Z(-\d+)?\.bak$")  # what `promote --repair` kept
VERSION_FILE = "version.json"  # inside each version: its facts and the sha256 of every file
VERSION_NAME = re.compile(r"^(\d{4,9})-([0-9a-f]{12})$")
KINDS = ("promote", "rollback", "gc", "repair", "archive")
MAX_HISTORY_BYTES = 64 << 20  # ~100,000 events: `promote --archive-history` starts a new one
MAX_POINTER_BYTES = 1 << 16  # CURRENT is a few hundred bytes; never read an unbounded file
KILL_ENV = "CIFARFLOW_REGISTRY_KILL_AT"  # tests: SIGKILL at the n-th durability point (1-based)
POINTS_ENV = "CIFARFLOW_REGISTRY_POINTS"  # tests: append the name of every durability point to this file
DEFAULT_WAIT_S = 600.0


class RegistryError(CifarflowError):
    """The registry is busy or damaged; the message says what to do."""


class PromotionRefused(InputError):
    """The candidate may not become the champion (not blessed, synthetic data, worse than the current
    champion, stale, rolled back). Exit 2; the flow records it and goes on."""

    failure_class = "refused"


# --- every change to the filesystem, with a kill point before and after ---------------------------


def complete_lines_size(path: Path, size: int, block: int = 1 << 16) -> int:
    """Bytes of `path` up to and including its last newline (0 if none), reading backwards a block at
    a time: a torn line of any length is found without reading the whole file."""
    with open(path, "rb") as f:
        end = size
        while end > 0:
            start = max(0, end - block)
            f.seek(start)
            newline = f.read(end - start).rfind(b"\n")
            if newline >= 0:
                return start + newline + 1
            end = start
    return 0


class Durable:
    """Writes, fsyncs, renames and removals, each between two numbered points where a test can kill
    the process (KILL_ENV) or list the points (POINTS_ENV). Nothing else in this module writes."""

    def __init__(self) -> None:
        self.count = 0
        kill_at = os.environ.get(KILL_ENV, "")
        self.kill_at = int(kill_at) if kill_at.isdigit() else 0
        self.points = os.environ.get(POINTS_ENV)

    def _point(self, label: str) -> None:
        self.count += 1
        if self.points:
            with open(self.points, "a") as f:
                f.write(f"{self.count} {label}\n")
        if self.count == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    @contextmanager
    def step(self, label: str) -> Iterator[None]:
        self._point(f"before {label}")
        yield
        self._point(f"after {label}")

    def mkdir(self, path: Path) -> None:
        with self.step(f"mkdir {path.name}"):
            path.mkdir(parents=True, exist_ok=True)

    def write(self, path: Path, data: bytes) -> None:
        """A new file's bytes, then its fsync: two steps, each killable."""
        with self.step(f"write {path.name}"):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
        self.fsync(path)

    def copy(self, source: Path, target: Path) -> None:
        with self.step(f"copy {target.name}"):
            shutil.copyfile(source, target)
        self.fsync(target)

    def fsync(self, path: Path) -> None:
        with self.step(f"fsync {path.name}"):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def rename(self, source: Path, target: Path) -> None:
        """Atomic replace, then the parent folder's fsync so the new name survives a power cut."""
        with self.step(f"rename {source.name} -> {target.name}"):
            os.replace(source, target)
        self.fsync(target.parent)

    def append(self, path: Path, line: str) -> None:
        """One whole line at the end; a torn last line left by a power cut is cut off first, so the new
        line never glues onto it."""
        size = path.stat().st_size if path.is_file() else 0
        if size:
            keep = complete_lines_size(path, size)
            if keep < size:
                with self.step(f"truncate {path.name}"):
                    os.truncate(path, keep)
        with self.step(f"append {path.name}"):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                os.write(fd, line.encode())
                os.fsync(fd)
            finally:
                os.close(fd)

    def remove_tree(self, path: Path) -> None:
        with self.step(f"remove {path.name}"):
            shutil.rmtree(path, ignore_errors=True)

    def remove_file(self, path: Path) -> None:
        with self.step(f"remove {path.name}"):
            path.unlink(missing_ok=True)


# --- reading: what readers (predict, export) and writers share ------------------------------------


@dataclass(frozen=True)
class Version:
    """One immutable version folder and the facts recorded when it was made."""

    name: str
    path: Path
    facts: dict[str, Any]

    @property
    def number(self) -> int:
        return int(self.name.split("-", 1)[0])

    @property
    def digest(self) -> str:
        return self.facts["weights_sha256"]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _read_json(path: Path, limit: int = MAX_POINTER_BYTES, shape: type = dict) -> Any:
    """A small JSON file of the registry (or a card), bounded and checked; damage is a RegistryError."""
    try:
        if not path.is_file():  # a FIFO or device in the registry's place: never opened
            raise RegistryError(f"{path}: not a regular file; the registry is damaged")
        with open(path, "rb") as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise RegistryError(f"{path}: larger than {limit} bytes; not a registry file")
        value = json.loads(data)
    except (ValueError, RecursionError, OSError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise RegistryError(
            f"{path}: unreadable ({exc.__class__.__name__}); the registry is damaged: restore the file "
            "from a backup, or roll back (`cifarflow promote --rollback VERSION`)"
        ) from None
    if not isinstance(value, shape):
        raise RegistryError(f"{path}: holds a {type(value).__name__}, not a {shape.__name__}; the registry is damaged")
    return value


def _dumps(value: Any, **options: Any) -> str:
    return json.dumps(value, sort_keys=True, allow_nan=False, **options)  # strict JSON: no NaN in a record


def version(registry: Path, name: str) -> Version:
    if not VERSION_NAME.match(name):
        raise RegistryError(f"{registry / CURRENT}: names {name!r}, not a version (<number>-<12 hex digits>)")
    path = registry / VERSIONS / name
    if path.is_symlink() or not (path / VERSION_FILE).is_file():
        raise RegistryError(
            f"{path}: version folder missing, a symlink, or incomplete; the registry is damaged "
            f"(restore it from a backup, or roll back to another version)"
        )
    facts = _read_json(path / VERSION_FILE)
    if not isinstance(facts.get("weights_sha256"), str) or not isinstance(facts.get("files"), dict):
        raise RegistryError(f"{path / VERSION_FILE}: lacks weights_sha256 or files; the version is damaged")
    return Version(name, path, facts)


def pointer(registry: Path) -> dict[str, Any] | None:
    """CURRENT's content (the version and the event that made it champion), or None."""
    path = Path(registry) / CURRENT
    if not os.path.lexists(path):
        return None
    found = _read_json(path)
    if not isinstance(found.get("version"), str) or not isinstance(found.get("event"), dict) or not _is_event(found["event"]):
        raise RegistryError(
            f"{path}: not a champion pointer (version and event); the registry is damaged: roll back "
            "to a version (`cifarflow promote --rollback VERSION`) to rewrite it"
        )
    return found


def _is_event(event: Any) -> bool:
    return isinstance(event, dict) and isinstance(event.get("seq"), int) and event.get("kind") in KINDS


def current(registry: Path) -> Version | None:
    """The champion, or None if nothing was ever promoted. Never a half-written version."""
    registry = Path(registry)
    found = pointer(registry)
    return None if found is None else version(registry, found["version"])


def versions(registry: Path) -> list[Version]:
    folder = Path(registry) / VERSIONS
    names = (
        sorted((p.name for p in folder.iterdir() if VERSION_NAME.match(p.name)), key=lambda n: int(n.split("-")[0]))
        if folder.is_dir()
        else []
    )
    found = []
    for name in names:  # a damaged version is listed as such, so that --list shows it and --gc can remove it
        try:
            found.append(version(Path(registry), name))
        except RegistryError as exc:
            found.append(Version(name, folder / name, {"damaged": str(exc), "weights_sha256": "", "files": {}}))
    return found


def verify(found: Version) -> list[str]:
    """Files of a version that are missing or differ from what was recorded: [] when complete."""
    if "damaged" in found.facts:
        return [found.facts["damaged"]]
    problems = []
    for rel, expected in found.facts["files"].items():
        path = found.path / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
        elif _sha256(path) != expected:
            problems.append(f"{rel}: sha256 differs")
    return problems


def history(registry: Path) -> list[dict[str, Any]]:
    """The events, oldest first. A torn last line (a power cut mid-append) is ignored: the next writer
    cuts it off, and CURRENT still holds the event it would have recorded."""
    path = Path(registry) / HISTORY
    if not os.path.lexists(path):
        return []
    try:
        if not path.is_file():
            raise RegistryError(f"{path}: not a regular file; the history is damaged")
        if path.stat().st_size > MAX_HISTORY_BYTES:
            raise RegistryError(
                f"{path}: over {MAX_HISTORY_BYTES:,} bytes; move it aside and start a new one that carries what it "
                "decides (rollbacks, what served): `cifarflow promote --archive-history`"
            )
        data = path.read_bytes()
    except OSError as exc:
        raise RegistryError(f"{path}: unreadable ({exc.__class__.__name__})") from None
    lines = data.split(b"\n")
    complete, torn = lines[:-1], lines[-1]  # the part after the last newline was never finished
    events = []
    for number, line in enumerate(complete, 1):
        try:
            event = json.loads(line)
        except (ValueError, RecursionError):
            event = None
        if not _is_event(event):
            raise RegistryError(
                f"{path}: line {number} is not an event; the history is damaged (restore it from a "
                "backup; the versions and CURRENT are intact)"
            )
        events.append(event)
    del torn
    return events


# --- writing: under the lock -----------------------------------------------------------------------


FIXED_ENTRIES = (VERSIONS, CURRENT, HISTORY, LOCK, INCOMING, TRASH, SCORES, MARKER, PENDING)


def ours(name: str) -> bool:
    """Whether an entry of a registry folder is one the registry makes (its temps included)."""
    temp = name.endswith(".tmp") and name.split(".", 1)[0] in (CURRENT, MARKER, PENDING, "history")
    return name in FIXED_ENTRIES or bool(ARCHIVED.match(name) or BACKUP.match(name)) or temp


def check_layout(registry: Path, adopting: bool = False) -> None:
    """Refuse a folder that is not a registry, before anything is written: a symlink, a file, a folder
    holding anything the registry did not make (a `versions/` of someone else's included), or one of
    registry files without the REGISTRY marker (`adopting`: promote --repair writes it)."""
    if registry.is_symlink() or (registry.exists() and not registry.is_dir()):
        raise RegistryError(f"{registry}: is a symlink or a file; the registry must be a real folder")
    if (registry / SAVED_MODEL).exists():
        raise RegistryError(
            f"{registry}: holds a champion copied by an older cifarflow (saved_model/ at the top); "
            "move it away, then promote again to start a registry there"
        )
    if not registry.is_dir() or (registry / MARKER).is_file():
        return
    entries = sorted(p.name for p in registry.iterdir())
    foreign = [name for name in entries if not ours(name)]
    if foreign:
        raise RegistryError(
            f"{registry}: holds files the registry did not make ({', '.join(foreign[:5])}"
            f"{f' and {len(foreign) - 5} more' if len(foreign) > 5 else ''}) and no {MARKER} file: export.champion_dir "
            "must name a new or empty folder, or a registry; nothing was written"
        )
    if set(entries) & {VERSIONS, CURRENT, HISTORY} and not adopting:  # a registry's content, unmarked
        raise RegistryError(
            f"{registry}: a registry without its {MARKER} file (made by an older cifarflow?): "
            "`cifarflow promote --repair` adopts it, deleting nothing"
        )


@contextmanager
def locked(registry: Path, wait_s: float = DEFAULT_WAIT_S, repairing: bool = False) -> Iterator[Durable]:
    """Hold the registry's lock (waiting up to `wait_s`), after finishing or undoing what a killed writer
    left. A new registry gets its REGISTRY marker first. `repairing`: promote --repair, which adopts
    an unmarked registry and rebuilds a lost history, so neither is an error here."""
    from filelock import FileLock, Timeout

    registry = Path(registry)
    check_layout(registry, adopting=repairing)
    io = Durable()
    io.mkdir(registry)
    lock_path = registry / LOCK
    if os.path.lexists(lock_path) and (lock_path.is_symlink() or not lock_path.is_file()):
        raise RegistryError(f"{lock_path}: not a regular file (a folder or a symlink); remove it, no promotion is running")
    content = {p.name for p in registry.iterdir()} & {VERSIONS, CURRENT, HISTORY}
    if not (registry / MARKER).is_file() and (repairing or not content):  # new, or adopted by --repair
        temp = registry / f"{MARKER}.{os.getpid()}.tmp"
        io.remove_file(temp)
        io.write(temp, MARKER_CONTENT)
        io.rename(temp, registry / MARKER)
    lock = FileLock(lock_path)
    try:
        lock.acquire(timeout=wait_s)
    except Timeout:
        raise RegistryError(
            f"{lock_path}: another promotion has held the registry for over {wait_s:.0f} s; "
            "wait for it to finish (or pass a longer --wait)"
        ) from None
    try:
        recover(registry, io, verify_history=not repairing)
        yield io
    finally:
        lock.release()


def check_history(registry: Path, events: list[dict[str, Any]], found: dict[str, Any] | None) -> None:
    """A history that lost events is an error naming it: CURRENT or a recorded version ahead of it."""
    last = events[-1]["seq"] if events else 0
    path = registry / HISTORY
    repair = (
        "restore it from a backup, or run `cifarflow promote --repair` to rebuild it from the versions' records (deletes nothing)"
    )
    if found is not None and found["event"]["seq"] > last + 1:
        raise RegistryError(
            f"{path}: {'missing or empty' if not events else 'cut short'}: it ends at event {last} but the champion "
            f"(CURRENT) was made by event {found['event']['seq']}; {repair}"
        )
    held = versions(registry)
    if not events and held and found is None:
        raise RegistryError(f"{path}: missing or empty, but versions/ holds {len(held)} version(s); {repair}")


def recover(registry: Path, io: Durable, verify_history: bool = True) -> None:
    """Finish or undo a killed writer's work: drop staging folders and temps, write the history line of
    a switch that happened, remove the version a killed promoter staged but never recorded (PENDING
    names it), and put back versions a killed clean-up moved out but never recorded removing."""
    pending = _pending(registry)
    if (registry / TRASH).is_dir():
        gc_names = set(pending.get("gc") or [])
        recorded = any(e.get("kind") == "gc" and set(e.get("removed") or []) == gc_names for e in history(registry))
        for entry in (registry / TRASH).iterdir():  # removing what a recorded clean-up removed; undoing an unrecorded one
            if not recorded and entry.name in gc_names and not (registry / VERSIONS / entry.name).exists():
                io.rename(entry, registry / VERSIONS / entry.name)
        io.remove_tree(registry / TRASH)
    if (registry / INCOMING).exists():
        io.remove_tree(registry / INCOMING)
    for temp in [*registry.glob(f"{CURRENT}.*.tmp"), *registry.glob(f"{SCORES}/.*.tmp"), *registry.glob(f"{HISTORY}.*.tmp")]:
        io.remove_file(temp)
    events, found = history(registry), pointer(registry)
    staged = pending.get("version")
    named = {e.get("to") for e in events} | ({found["version"]} if found else set())
    if staged and staged not in named and (registry / VERSIONS / staged).is_dir():
        io.remove_tree(registry / VERSIONS / staged)  # made by a promoter that died before recording it
    if pending:
        io.remove_file(registry / PENDING)
    if verify_history:
        check_history(registry, events, found)
    if found is not None and found["event"]["seq"] > (events[-1]["seq"] if events else 0):
        io.append(registry / HISTORY, _dumps({**found["event"], "recorded_late": True}) + "\n")


def _pending(registry: Path) -> dict[str, Any]:
    """What PENDING says a writer was doing (a version it staged, versions it was removing), or {}."""
    if not os.path.lexists(registry / PENDING):
        return {}
    try:
        return _read_json(registry / PENDING)
    except RegistryError:  # torn by a power cut before its rename: it names nothing for certain
        return {}


def _set_pending(registry: Path, io: Durable, **what: Any) -> None:
    temp = registry / f"{PENDING}.{os.getpid()}.tmp"
    io.remove_file(temp)
    io.write(temp, _dumps({**what, "pid": os.getpid(), "host": socket.gethostname()}).encode())
    io.rename(temp, registry / PENDING)


def unrecorded(registry: Path) -> list[str]:
    """Versions in versions/ that no history line or CURRENT names: kept, never removed, listed."""
    named = {e.get("to") for e in _events(registry)} | ({p["version"]} if (p := pointer(registry)) else set())
    return [v.name for v in versions(registry) if v.name not in named]


def _by(given: str | None = None) -> str:
    """Who promotes, as one printable line of at most 200 characters (it is shown by --list)."""
    text = given or os.environ.get("CIFARFLOW_PROMOTED_BY") or f"{getpass.getuser()}@{socket.gethostname()} pid {os.getpid()}"
    return "".join(c if c.isprintable() else " " for c in text)[:200]


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _switch(registry: Path, io: Durable, event: dict[str, Any]) -> None:
    """Point CURRENT at event["to"] (by rename: atomic), then append the event to the history."""
    temp = registry / f"{CURRENT}.{os.getpid()}.tmp"
    io.write(temp, _dumps({"version": event["to"], "event": event}, indent=2).encode() + b"\n")
    io.rename(temp, registry / CURRENT)
    io.append(registry / HISTORY, _dumps(event) + "\n")
    if os.path.lexists(registry / PENDING):  # recorded: nothing of this writer's is an orphan now
        io.remove_file(registry / PENDING)


def _next_seq(registry: Path) -> int:
    events = history(registry)
    return (events[-1]["seq"] if events else 0) + 1


def add_version(registry: Path, io: Durable, export: Path, facts: dict[str, Any]) -> Version:
    """Copy `export` into a new version folder: staged, every file and folder fsynced, then renamed
    into versions/ in one step."""
    number = max([v.number for v in versions(registry)] + [highest_version(history(registry))])
    name = f"{number + 1:04d}-{facts['weights_sha256'][:12]}"
    _set_pending(registry, io, version=name)  # before staging: recovery may remove this version, and only it
    staging = registry / INCOMING / f"{name}.{os.getpid()}.tmp"
    io.mkdir(staging)
    files: dict[str, str] = {}
    for source in sorted(export.rglob("*")):
        rel = source.relative_to(export)
        if source.is_symlink() or not (source.is_file() or source.is_dir()):
            raise InputError(f"{source}: not a regular file or folder; an export holds only files and folders")
        if source.is_dir():
            io.mkdir(staging / rel)
        else:
            io.copy(source, staging / rel)
            files[rel.as_posix()] = _sha256(staging / rel)
    for folder in sorted({(staging / rel).parent for rel in files} | {staging}, key=lambda p: -len(p.parts)):
        io.fsync(folder)
    io.write(staging / VERSION_FILE, _dumps({**facts, "files": files, "recorded_by": "promote"}, indent=2).encode() + b"\n")
    io.mkdir(registry / VERSIONS)
    io.rename(staging, registry / VERSIONS / name)
    io.remove_tree(registry / INCOMING)  # empty now
    return version(registry, name)


def highest_version(events: list[dict[str, Any]]) -> int:
    """The highest version number the history names (an archive's carried forward): never reused."""
    numbers = [int(e["to"].split("-")[0]) for e in events if e.get("to")]
    return max(numbers + [e.get("max_version", 0) for e in events if e["kind"] == "archive"], default=0)


def _events(registry: Path) -> list[dict[str, Any]]:
    """The history, plus CURRENT's event if a killed writer switched without recording it yet."""
    events, found = history(registry), pointer(registry)
    if found is not None and found["event"]["seq"] > (events[-1]["seq"] if events else 0):
        events.append(found["event"])
    return events


def rolled_back(registry: Path) -> dict[str, dict[str, Any]]:
    """Weights digests that a rollback moved away from (and no forced promotion reinstated since),
    with that rollback's event."""
    revoked: dict[str, dict[str, Any]] = {}
    for e in _events(registry):
        if e["kind"] == "archive":  # what the archived history decided, carried forward
            revoked.update(e.get("rolled_back") or {})
        elif e["kind"] == "rollback":
            revoked.pop(e.get("weights_sha256"), None)  # the weights rolled back to serve again
            if e.get("from_weights_sha256"):
                revoked[e["from_weights_sha256"]] = e
        elif e["kind"] == "promote" and (e.get("verdict") or {}).get("forced"):
            revoked.pop(e.get("weights_sha256"), None)
    return revoked


def served_before(registry: Path, champion: str) -> str | None:
    """The version that served before `champion`, skipping versions rolled back from: what a plain
    `--rollback` returns to, and what `--gc` keeps besides the champion."""
    served, revoked = serving_record(_events(registry))
    earlier = [name for name in served if name != champion and name not in revoked]
    return earlier[-1] if earlier else None


def serving_record(events: list[dict[str, Any]]) -> tuple[list[str], set[str]]:
    """(the versions that served, in order; those rolled back from and not reinstated since)."""
    revoked: set[str] = set()
    served: list[str] = []
    for e in events:  # a version reinstated after a rollback serves again
        if e["kind"] == "archive":  # the order of what served, and what was rolled back from, before it
            revoked |= set(e.get("revoked_versions") or [])
            served += list(e.get("served") or [])
        elif e["kind"] in ("promote", "repair"):
            revoked.discard(e["to"])
        elif e["kind"] == "rollback":
            revoked.discard(e["to"])
            revoked.add(e["from"])
        if e["kind"] in ("promote", "rollback", "repair") and e.get("to"):
            served.append(e["to"])
    return served, revoked


def promote(
    export: Path,
    registry: Path,
    decide: Callable[[dict[str, Any], Version | None, dict[str, Any] | None], Verdict],
    force: bool = False,
    by: str | None = None,
    wait_s: float = DEFAULT_WAIT_S,
) -> dict[str, Any]:
    """Make the export in `export` the champion if the policy allows it now: `decide(card, champion,
    rollback)` is called under the lock with the export's model card, the current champion (None if
    there is none) and the rollback event that revoked these weights (None if none), and returns
    the verdict. Returns the
    recorded event, or {"kind": "unchanged", ...} when it already is the champion. Raises
    PromotionRefused with every failed check when it may not (unless `force`)."""
    export, registry = Path(export), Path(registry)
    card = read_card(export)
    digest = card.get("weights_sha256")
    if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise InputError(f"{export / MODEL_CARD}: no weights_sha256; export again with this version of cifarflow")
    with locked(registry, wait_s) as io:
        champion = current(registry)
        if champion is not None and champion.digest == digest:
            return {"kind": "unchanged", "to": champion.name, "reason": f"{export} is already the champion"}
        verdict = decide(card, champion, rolled_back(registry).get(digest))
        if not verdict.blessed and not force:
            raise PromotionRefused(
                f"not promoting {export} ({card.get('arch')}): "
                + "; ".join(verdict.failures)
                + " (cifarflow promote --force overrides)"
            )
        facts = {
            "arch": card.get("arch"),
            "weights_sha256": digest,
            "test_accuracy": _number((card.get("test") or {}).get("accuracy")),
            "blessed": verdict.blessed,
            "provenance": card.get("provenance"),
            "profile": card.get("profile"),
            "data_source_kind": card.get("data_source_kind"),
            "data_manifest_sha256": card.get("data_manifest_sha256"),
        }
        new = add_version(registry, io, export, facts)
        event = {
            "seq": _next_seq(registry),
            "kind": "promote",
            "time": _now(),
            "by": _by(by),
            "to": new.name,
            "from": champion.name if champion else None,
            **{k: facts[k] for k in ("arch", "weights_sha256", "test_accuracy", "blessed", "provenance", "data_source_kind")},
            "verdict": {**verdict.record(), "forced": bool(force and not verdict.blessed)},
        }
        _switch(registry, io, event)
        return event


def _number(value: Any) -> float | None:
    """A finite number as recorded, else None (a record is strict JSON: no NaN)."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None


def rollback(registry: Path, to: str | None = None, by: str | None = None, wait_s: float = DEFAULT_WAIT_S) -> dict[str, Any]:
    """Make an earlier version the champion again (default: the one before the current champion).
    Recorded like a promotion; the weights rolled back from are refused by later promotions."""
    registry = Path(registry)
    with locked(registry, wait_s) as io:
        champion = current(registry)
        if champion is None:
            raise InputError(f"{registry}: no champion to roll back from; nothing was ever promoted")
        if to is None:
            to = served_before(registry, champion.name)
            if to is None:
                raise InputError(
                    f"{registry}: no version served before {champion.name} (other than ones rolled back "
                    "from); name one: cifarflow promote --rollback VERSION (see --list)"
                )
        names = {v.name: v for v in versions(registry)}
        match = [n for n in names if n == to or n.split("-")[0].lstrip("0") == str(to).lstrip("0")]
        if len(match) != 1:
            raise InputError(f"{registry}: no version {to!r}; versions: {', '.join(names) or '(none)'}")
        target = names[match[0]]
        if target.name == champion.name:
            raise InputError(f"{registry}: {target.name} is already the champion")
        problems = verify(target)
        if problems:
            raise RegistryError(f"{target.path}: damaged ({'; '.join(problems)}); choose another version")
        event = {
            "seq": _next_seq(registry),
            "kind": "rollback",
            "time": _now(),
            "by": _by(by),
            "to": target.name,
            "from": champion.name,
            "from_weights_sha256": champion.digest,
            **{
                k: target.facts.get(k)
                for k in ("arch", "weights_sha256", "test_accuracy", "blessed", "provenance", "data_source_kind")
            },
        }
        _switch(registry, io, event)
        return event


def collect_garbage(registry: Path, keep: int, wait_s: float = DEFAULT_WAIT_S) -> list[str]:
    """Remove all but the `keep` newest versions; never the champion or the version served before it."""
    if keep < 1:
        raise InputError(f"--keep {keep}: keep at least 1 version")
    registry = Path(registry)
    with locked(registry, wait_s) as io:
        champion = current(registry)
        protected = {champion.name} if champion else set()
        before = served_before(registry, champion.name) if champion else None
        if before:
            protected.add(before)
        unknown = set(unrecorded(registry))  # never the registry's to remove: listed, kept
        every = [v for v in versions(registry) if v.name not in unknown]
        newest = {v.name for v in every[-keep:]}
        removed = [v.name for v in every if v.name not in newest | protected]
        if removed:
            _set_pending(registry, io, gc=removed)  # a clean-up killed before it is recorded is undone
            io.mkdir(registry / TRASH)
            for name in removed:  # out of versions/ in one rename each, so no half-removed version is ever listed
                io.rename(registry / VERSIONS / name, registry / TRASH / name)
            io.append(
                registry / HISTORY,
                _dumps({"seq": _next_seq(registry), "kind": "gc", "time": _now(), "by": _by(), "removed": removed, "keep": keep})
                + "\n",
            )
            io.remove_tree(registry / TRASH)
            io.remove_file(registry / PENDING)
        return removed


def _stamp() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


def _free_name(registry: Path, make: Callable[[str], str]) -> str:
    """`make(suffix)` with the first suffix ("", "-2", ...) naming no existing entry."""
    number, name = 1, make("")
    while os.path.lexists(registry / name):
        number += 1
        name = make(f"-{number}")
    return name


def repair(registry: Path, by: str | None = None, wait_s: float = DEFAULT_WAIT_S) -> dict[str, Any]:
    """`promote --repair`: rebuild a lost or cut-short history from what survives (the history's intact
    lines, each version's own version.json, CURRENT), adopt a registry without its REGISTRY marker, and
    delete nothing: the old history, if any, is kept beside the new one. Returns what was done."""
    registry = Path(registry)
    with locked(registry, wait_s, repairing=True) as io:
        try:
            kept = history(registry)
        except RegistryError:
            kept = []  # unreadable lines: the versions tell again what they can
        found = pointer(registry)
        named = {e.get("to") for e in kept}
        rebuilt = []
        seq = kept[-1]["seq"] if kept else 0
        previous = next((e["to"] for e in reversed(kept) if e.get("to")), None)
        for v in versions(registry):
            if v.name in named or "damaged" in v.facts:
                continue
            seq += 1
            mtime = (v.path / VERSION_FILE).stat().st_mtime
            rebuilt.append(
                {
                    "seq": seq,
                    "kind": "promote",
                    "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(mtime)),
                    "by": _by(by),
                    "to": v.name,
                    "from": previous,
                    **{k: v.facts.get(k) for k in ("arch", "weights_sha256", "test_accuracy", "blessed", "provenance")},
                    "data_source_kind": v.facts.get("data_source_kind"),
                    "repaired": "rebuilt from the version's own record by `promote --repair`",
                }
            )
            previous = v.name
        champion = found["version"] if found else previous
        if os.path.lexists(registry / HISTORY):
            io.rename(registry / HISTORY, registry / _free_name(registry, lambda n: f"{HISTORY}.{_stamp()}{n}.bak"))
        temp = registry / f"{HISTORY}.{os.getpid()}.tmp"
        io.remove_file(temp)
        io.write(temp, "".join(_dumps(e) + "\n" for e in [*kept, *rebuilt]).encode())
        io.rename(temp, registry / HISTORY)
        event = None
        if champion is not None:
            event = {"seq": seq + 1, "kind": "repair", "time": _now(), "by": _by(by), "to": champion, "from": None}
            event |= {k: version(registry, champion).facts.get(k) for k in ("arch", "weights_sha256", "test_accuracy")}
            _switch(registry, io, event)
        return {"kept_events": len(kept), "rebuilt": [e["to"] for e in rebuilt], "champion": champion}


def archive_history(registry: Path, by: str | None = None, wait_s: float = DEFAULT_WAIT_S) -> dict[str, Any]:
    """`promote --archive-history`: move history.jsonl aside (kept, as history-<time>.jsonl) and start a
    new one whose first event carries what the old one decides: the weights rolled back from, the
    versions that served (for --rollback and --gc) and the highest version number."""
    registry = Path(registry)
    with locked(registry, wait_s) as io:
        events = _events(registry)
        if not events:
            raise InputError(f"{registry / HISTORY}: nothing to archive")
        champion = current(registry)
        served, revoked = serving_record(events)
        archived = _free_name(registry, lambda n: f"history-{_stamp()}{n}.jsonl")
        event = {
            "seq": events[-1]["seq"] + 1,
            "kind": "archive",
            "time": _now(),
            "by": _by(by),
            "archived_to": archived,
            "champion": champion.name if champion else None,
            "rolled_back": rolled_back(registry),
            "revoked_versions": sorted(revoked),
            "served": served[-1000:],  # --rollback and --gc look back at most this far
            "max_version": highest_version(events),
        }
        io.rename(registry / HISTORY, registry / archived)
        io.append(registry / HISTORY, _dumps(event) + "\n")
        return event


def cached_score(
    registry: Path, champion: Version, manifest_sha256: str, score: Callable[[Version], float], key: str = "test_accuracy"
) -> float:
    """The champion's score (`key`: test accuracy, or mCA on a corruption benchmark) on the data
    with this manifest, computed once per (weights, data)."""
    path = registry / SCORES / f"{champion.digest[:16]}-{manifest_sha256[:16]}.json"
    if path.is_file():
        try:
            return float(_read_json(path)[key])
        except (ValueError, KeyError, TypeError):
            pass  # a damaged cache entry: score again
    value = score(champion)
    io = Durable()
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:  # a cache: failing to write it costs only time
        io.mkdir(path.parent)
        io.remove_file(temp)
        io.write(
            temp,
            _dumps({key: value, "weights_sha256": champion.digest, "data_manifest_sha256": manifest_sha256}).encode(),
        )
        io.rename(temp, path)
    except OSError:
        pass
    return value


def render(registry: Path) -> str:
    """`promote --list`: the versions with the champion marked, then the history."""
    registry = Path(registry)
    champion = current(registry)
    folder = registry / VERSIONS
    if not history(registry) and not (folder.is_dir() and any(folder.iterdir())):
        return (
            f"registry {registry}: no version yet. A version is made by `cifarflow promote` from a blessed "
            "export (data/export/, written by `dvc repro` or `cifarflow flow run`, which promotes it itself).\n"
        )
    lines = [
        f"registry {registry}: champion {champion.name if champion else '(none)'}",
        "",
        "| | version | arch | test accuracy | blessed | data | provenance |",
        "|---|---|---|---:|---|---|---|",
    ]
    for v in versions(registry):
        f = v.facts
        lines.append(
            f"| {'*' if champion and v.name == champion.name else ''} | {v.name} | {f.get('arch')} | "
            f"{f.get('test_accuracy')} | {f.get('blessed')} | {f.get('data_source_kind')} | "
            f"{describe(f.get('provenance') or {}) if f.get('provenance') else ''} |"
        )
    strays = unrecorded(registry)
    foreign = (
        sorted(p.name for p in (registry / VERSIONS).iterdir() if not VERSION_NAME.match(p.name))
        if (registry / VERSIONS).is_dir()
        else []
    )
    if strays:
        lines += ["", f"unrecorded (no history line names them; kept, never removed): {', '.join(strays)}"]
    if foreign:
        lines += ["", f"foreign entries in {VERSIONS}/ (not the registry's; kept): {', '.join(foreign)}"]
    lines += ["", "history (oldest first):"]
    for e in history(registry):
        if e["kind"] == "gc":
            lines.append(f"  {e['seq']:>4} {e['time']} gc: removed {', '.join(e['removed'])} (keep {e['keep']})")
        elif e["kind"] == "archive":
            lines.append(f"  {e['seq']:>4} {e['time']} archive: the history before this line is in {e['archived_to']}")
        else:
            forced = " FORCED" if (e.get("verdict") or {}).get("forced") else ""
            lines.append(
                f"  {e['seq']:>4} {e['time']} {e['kind']}{forced}: {e.get('from') or '(none)'} -> {e['to']} "
                f"({e.get('arch')}, test {e.get('test_accuracy')}) by {e['by']}"
                + (" [recorded late]" if e.get("recorded_late") else "")
            )
    return "\n".join(lines) + "\n"
