"""The champion registry: immutable versions, one pointer switched atomically, an append-only history.

    <registry>/versions/<n>-<digest>/   a promoted export, written whole and fsynced before it appears
    <registry>/CURRENT                  the champion: JSON naming its version and the promotion that made it
    <registry>/history.jsonl            one line per promotion, rollback and clean-up ("what served when")
    <registry>/.lock                    held by whoever changes the registry (filelock)

Readers only ever follow CURRENT, which is replaced by a rename: at every instant they see exactly
one complete champion, whatever process is killed when. Writers hold the lock; the first thing a
writer does is finish or undo what a killed writer left (staging folders, a history line not yet
written for the CURRENT it had already switched). Every filesystem change goes through `Durable`,
so a test can kill the process just before and just after each one.
"""

from __future__ import annotations

import getpass
import hashlib
import json
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

from cifarflow.errors import CifarflowError, InputError

VERSIONS, CURRENT, HISTORY, LOCK = "versions", "CURRENT", "history.jsonl", ".lock"
INCOMING, TRASH, SCORES = ".incoming", ".trash", "scores"
VERSION_FILE = "version.json"  # inside each version: its facts and the sha256 of every file
VERSION_NAME = re.compile(r"^(\d{4,9})-([0-9a-f]{12})$")
KINDS = ("promote", "rollback", "gc")
MAX_HISTORY_BYTES = 64 << 20  # ~100,000 events
MAX_POINTER_BYTES = 1 << 16  # CURRENT is a few hundred bytes; never read an unbounded file
KILL_ENV = "CIFARFLOW_REGISTRY_KILL_AT"  # tests: SIGKILL at the n-th durability point (1-based)
POINTS_ENV = "CIFARFLOW_REGISTRY_POINTS"  # tests: append the name of every durability point to this file
DEFAULT_WAIT_S = 600.0
REASON_ROLLED_BACK = "rolled back"


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
            raise RegistryError(f"{path}: over {MAX_HISTORY_BYTES:,} bytes; archive it and start a new one")
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


def check_layout(registry: Path) -> None:
    """Refuse a folder that is not a registry: a legacy champion copy, a symlink, a file."""
    if registry.is_symlink() or (registry.exists() and not registry.is_dir()):
        raise RegistryError(f"{registry}: is a symlink or a file; the registry must be a real folder")
    if (registry / "saved_model").exists():
        raise RegistryError(
            f"{registry}: holds a champion copied by an older cifarflow (saved_model/ at the top); "
            "move it away, then promote again to start a registry there"
        )


@contextmanager
def locked(registry: Path, wait_s: float = DEFAULT_WAIT_S) -> Iterator[Durable]:
    """Hold the registry's lock (waiting up to `wait_s`), after repairing what a killed writer left."""
    from filelock import FileLock, Timeout

    registry = Path(registry)
    check_layout(registry)
    io = Durable()
    io.mkdir(registry)
    lock = FileLock(registry / LOCK)
    try:
        lock.acquire(timeout=wait_s)
    except Timeout:
        raise RegistryError(
            f"{registry / LOCK}: another promotion has held the registry for over {wait_s:.0f} s; "
            "wait for it to finish (or pass a longer --wait)"
        ) from None
    try:
        recover(registry, io)
        yield io
    finally:
        lock.release()


def recover(registry: Path, io: Durable) -> None:
    """Finish or undo a killed writer's work: drop staging and trash, write the history line of a
    switch that happened, and remove a version that never became champion."""
    for leftover in (registry / INCOMING, registry / TRASH):
        if leftover.exists():
            io.remove_tree(leftover)
    for temp in [*registry.glob(f"{CURRENT}.*.tmp"), *registry.glob(f"{SCORES}/.*.tmp")]:
        io.remove_file(temp)
    events, found = history(registry), pointer(registry)
    if found is not None and found["event"]["seq"] > (events[-1]["seq"] if events else 0):
        io.append(registry / HISTORY, _dumps({**found["event"], "recorded_late": True}) + "\n")
        events = history(registry)
    named = {e.get("to") for e in events} | ({found["version"]} if found else set())
    for orphan in (registry / VERSIONS).glob("*") if (registry / VERSIONS).is_dir() else []:
        if orphan.name not in named:  # renamed into versions/ by a promoter killed before the switch
            io.remove_tree(orphan)


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


def _next_seq(registry: Path) -> int:
    events = history(registry)
    return (events[-1]["seq"] if events else 0) + 1


def add_version(registry: Path, io: Durable, export: Path, facts: dict[str, Any]) -> Version:
    """Copy `export` into a new version folder: staged, every file and folder fsynced, then renamed
    into versions/ in one step."""
    numbers = [v.number for v in versions(registry)] + [int(e["to"].split("-")[0]) for e in history(registry) if e.get("to")]
    name = f"{max(numbers, default=0) + 1:04d}-{facts['weights_sha256'][:12]}"
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
    io.write(staging / VERSION_FILE, _dumps({**facts, "files": files}, indent=2).encode() + b"\n")
    io.mkdir(registry / VERSIONS)
    io.rename(staging, registry / VERSIONS / name)
    io.remove_tree(registry / INCOMING)  # empty now
    return version(registry, name)


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
        if e["kind"] == "rollback" and e.get("from_weights_sha256"):
            revoked[e["from_weights_sha256"]] = e
        elif e["kind"] == "promote" and (e.get("verdict") or {}).get("forced"):
            revoked.pop(e.get("weights_sha256"), None)
    return revoked


def served_before(registry: Path, champion: str) -> str | None:
    """The version that served before `champion`, skipping versions rolled back from: what a plain
    `--rollback` returns to, and what `--gc` keeps besides the champion."""
    events = _events(registry)
    revoked = {e["from"] for e in events if e["kind"] == "rollback"}
    for e in events:  # a version reinstated after a rollback serves again
        if e["kind"] == "promote":
            revoked.discard(e["to"])
        elif e["kind"] == "rollback":
            revoked.discard(e["to"])
            revoked.add(e["from"])
    earlier = [e["to"] for e in events if e.get("to") and e["to"] != champion and e["to"] not in revoked]
    return earlier[-1] if earlier else None


@dataclass(frozen=True)
class Gate:
    """What promotion re-checks inside the lock, against the champion as it is then."""

    min_accuracy: float
    tolerance: float
    manifest_sha256: str  # the test split the candidate was scored on must be the one scored now
    score: Callable[[Version], float]  # the champion's test accuracy on that split (cached by the caller)


def promote(
    export: Path, registry: Path, gate: Gate, force: bool = False, by: str | None = None, wait_s: float = DEFAULT_WAIT_S
) -> dict[str, Any]:
    """Make the export in `export` the champion, if it passes the gate against the current champion.
    Returns the recorded event, or {"kind": "unchanged", ...} when it already is the champion.
    Raises PromotionRefused with every reason when it may not (unless `force`)."""
    export, registry = Path(export), Path(registry)
    card_path = export / "model_card.json"
    if not card_path.is_file():
        raise InputError(f"{card_path}: not found; run the export stage first")
    try:
        card = _read_json(card_path, 1 << 24)
    except RegistryError:
        raise InputError(f"{card_path}: not a readable model card (JSON object); export again") from None
    digest = card.get("weights_sha256")
    test = card.get("test")
    accuracy = test.get("accuracy") if isinstance(test, dict) else None
    if (
        not isinstance(digest, str)
        or not re.fullmatch(r"[0-9a-f]{64}", digest)
        or not isinstance(accuracy, (int, float))
        or isinstance(accuracy, bool)
    ):
        raise InputError(f"{card_path}: no weights_sha256 or test.accuracy; export again with this version of cifarflow")
    with locked(registry, wait_s) as io:
        champion = current(registry)
        if champion is not None and champion.digest == digest:
            return {"kind": "unchanged", "to": champion.name, "reason": f"{export} is already the champion"}
        verdict = judge(card, champion, gate, rolled_back(registry).get(digest))
        if verdict["reasons"] and not force:
            raise PromotionRefused(
                f"not promoting {export} ({card.get('arch')}): "
                + "; ".join(verdict["reasons"])
                + " (cifarflow promote --force overrides)"
            )
        facts = {
            "arch": card.get("arch"),
            "weights_sha256": digest,
            "test_accuracy": card["test"]["accuracy"],
            "blessed": card.get("blessed"),
            "git_commit": card.get("git_commit"),
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
            **{k: facts[k] for k in ("arch", "weights_sha256", "test_accuracy", "blessed", "git_commit", "data_source_kind")},
            "verdict": {**verdict, "forced": bool(force and verdict["reasons"])},
        }
        _switch(registry, io, event)
        return event


def judge(card: dict[str, Any], champion: Version | None, gate: Gate, rollback: dict[str, Any] | None) -> dict[str, Any]:
    """Every reason the candidate may not be promoted now ([] when it may), and what it was compared with."""
    reasons = []
    accuracy = float(card["test"]["accuracy"])
    if not 0.0 <= accuracy <= 1.0:  # NaN fails this too: every comparison with it is false
        reasons.append(f"its test accuracy {accuracy} is not a number in [0, 1]")
    if not card.get("blessed"):
        reasons.append("the export is not blessed (" + "; ".join(card.get("blessing_reasons", [])) + ")")
    if card.get("data_source_kind") == "synth":
        reasons.append("it was trained on synthetic data (profile " + str(card.get("profile")) + ")")
    if card.get("data_manifest_sha256") != gate.manifest_sha256:
        reasons.append("its test accuracy was measured on other data than data/shards now (rerun the pipeline)")
    if accuracy < gate.min_accuracy:
        reasons.append(f"test accuracy {accuracy:.4f} < export.min_accuracy {gate.min_accuracy}")
    if rollback is not None:
        reasons.append(f"these weights were rolled back from version {rollback['from']} at {rollback['time']}")
    compared = None
    if champion is not None:
        score = gate.score(champion)
        compared = {"version": champion.name, "weights_sha256": champion.digest, "test_accuracy": score}
        if accuracy < score - gate.tolerance:
            reasons.append(
                f"test accuracy {accuracy:.4f} is more than export.tolerance {gate.tolerance} below the "
                f"champion {champion.name}'s {score:.4f} (re-scored now on this test split)"
            )
    return {"reasons": reasons, "candidate_test_accuracy": accuracy, "champion": compared}


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
                for k in ("arch", "weights_sha256", "test_accuracy", "blessed", "git_commit", "data_source_kind")
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
        every = versions(registry)
        newest = {v.name for v in every[-keep:]}
        removed = [v.name for v in every if v.name not in newest | protected]
        if removed:
            io.mkdir(registry / TRASH)
            for name in removed:  # out of versions/ in one rename each, so no half-removed version is ever listed
                io.rename(registry / VERSIONS / name, registry / TRASH / name)
            io.append(
                registry / HISTORY,
                _dumps({"seq": _next_seq(registry), "kind": "gc", "time": _now(), "by": _by(), "removed": removed, "keep": keep})
                + "\n",
            )
            io.remove_tree(registry / TRASH)
        return removed


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
    lines = [
        f"registry {registry}: champion {champion.name if champion else '(none)'}",
        "",
        "| | version | arch | test accuracy | blessed | data | git commit |",
        "|---|---|---|---:|---|---|---|",
    ]
    for v in versions(registry):
        f = v.facts
        lines.append(
            f"| {'*' if champion and v.name == champion.name else ''} | {v.name} | {f.get('arch')} | "
            f"{f.get('test_accuracy')} | {f.get('blessed')} | {f.get('data_source_kind')} | "
            f"{(f.get('git_commit') or '')[:10]} |"
        )
    lines += ["", "history (oldest first):"]
    for e in history(registry):
        if e["kind"] == "gc":
            lines.append(f"  {e['seq']:>4} {e['time']} gc: removed {', '.join(e['removed'])} (keep {e['keep']})")
        else:
            forced = " FORCED" if (e.get("verdict") or {}).get("forced") else ""
            lines.append(
                f"  {e['seq']:>4} {e['time']} {e['kind']}{forced}: {e.get('from') or '(none)'} -> {e['to']} "
                f"({e.get('arch')}, test {e.get('test_accuracy')}) by {e['by']}"
                + (" [recorded late]" if e.get("recorded_late") else "")
            )
    return "\n".join(lines) + "\n"
