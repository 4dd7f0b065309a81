"""Resume state of one training run, kept outside the DVC outputs (data/checkpoints/<arch>/).

Each epoch end writes `epoch-<e>.keras` (weights and optimizer state), then `state.json`, which
names it and is the commit point: a kill before the rename leaves the previous, complete state.
State is keyed by a fingerprint of the stage's resolved settings and code (the same file DVC
depends on) and its data; state with another
fingerprint is discarded with a warning naming both, never reused. A finished run clears it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cifarflow import resolved
from cifarflow.errors import CifarflowError
from cifarflow.fileio import dumps_json, sha256_file, write_json_atomic
from cifarflow.openfile import read_regular
from cifarflow.settings import Params

log = logging.getLogger(__name__)
STATE_FILE = "state.json"


@dataclass
class RunState:
    """What the loop carries from epoch to epoch; all of it survives a restart."""

    epoch: int = 0  # epochs done: the loop index (from 0) of the next one
    best: float | None = None
    best_epoch: int | None = None  # counted from 1, as every output counts
    history: list[dict[str, float]] = field(default_factory=list)
    timings: list[dict[str, float]] = field(default_factory=list)
    schedule: dict[str, Any] | None = None
    micro_batch: int | None = None  # set after an out-of-memory adaptation
    adaptations: list[dict[str, Any]] = field(default_factory=list)
    checkpoint: str | None = None  # file of the last completed epoch
    best_checkpoint: str | None = None


def fingerprint(params: Params, arch: str, shards_manifest: Path) -> str:
    """Everything that decides the weights: the stage's resolved file (seed, data format, runtime, the
    recipe, the code's digest: cifarflow.resolved) and the data."""
    decided_by = {"inputs": resolved.inputs(params, "train", arch), "data": sha256_file(shards_manifest)}
    return hashlib.sha256(dumps_json(decided_by).encode()).hexdigest()[:16]


MAX_STATE_BYTES = 64 << 20  # a state holds the history of every epoch: kilobytes, megabytes at most
PREVIOUS = "state.prev.json"  # the commit before the last: where a damaged last one falls back to
DAMAGED = "damaged"  # subfolder where unreadable state and checkpoints are set aside, kept for a person to look at
WRITER_WAIT_LOG_S = 60.0  # while another process writes the folder, a waiting trainer says so this often


class ResumeStore:
    """The checkpoint folder of one architecture: `epoch-<e>.keras` files, `state.json` (the last
    committed epoch, with the sha256 of every checkpoint it names) and `state.prev.json` (the one
    before). A restart resumes from the newest state whose files are all intact; a torn state or a
    checkpoint whose bytes differ from its recorded digest is moved to `damaged/` (kept, with a
    warning) and the one before is tried, else the run starts from scratch. `notes` says what happened."""

    def __init__(self, root: Path, fingerprint: str) -> None:
        self.root, self.fingerprint = Path(root), fingerprint
        self.notes: list[str] = []
        self._lock: Any = None

    def hold(self) -> None:
        """Be the folder's only writer until this process ends: a file lock beside it (`<folder>.lock`),
        waited for with a log line a minute. Two trainings of the same inputs (a retry on another node
        while the first one's process still runs, orphaned; two parent runs at once) would otherwise
        write the same checkpoints; the kernel releases the lock when its holder dies."""
        from filelock import FileLock, Timeout

        self.root.parent.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(self.root.with_name(f"{self.root.name}.lock"))
        waited = 0.0
        while True:
            try:
                self._lock.acquire(timeout=WRITER_WAIT_LOG_S)
                return
            except Timeout:
                waited += WRITER_WAIT_LOG_S
                log.info("%s: another process writes these checkpoints; waiting (%.0f s so far)", self.root, waited)

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()

    def _set_aside(self, name: str, why: str) -> None:
        source = self.root / name
        if not source.exists():
            return
        target = self.root / DAMAGED / name
        (self.root / DAMAGED).mkdir(parents=True, exist_ok=True)
        number = 1
        while target.exists():
            number += 1
            target = self.root / DAMAGED / f"{name}.{number}"
        os.replace(source, target)
        self.notes.append(f"{name} set aside in {DAMAGED}/: {why}")
        log.warning(
            "resume state in %s: %s is %s; set aside in %s/ (kept), trying the state before it", self.root, name, why, DAMAGED
        )

    def _read(self, name: str) -> dict[str, Any] | None:
        """A state file's content, None if it is absent; a torn or foreign one is set aside."""
        path = self.root / name
        if not os.path.lexists(path):
            return None
        try:
            saved = json.loads(read_regular(path, MAX_STATE_BYTES, what="a resume state"))
            RunState(**saved["state"])
            if not isinstance(saved.get("digests", {}), dict):
                raise TypeError("digests is not a mapping")
            return saved
        except (CifarflowError, ValueError, KeyError, TypeError) as exc:
            self._set_aside(name, f"unreadable ({exc.__class__.__name__})")
            return None

    def _intact(self, saved: dict[str, Any]) -> bool:
        """Whether every checkpoint the state names is there with the bytes recorded when it was written;
        a damaged one is set aside."""
        state = RunState(**saved["state"])
        for name in {state.checkpoint, state.best_checkpoint} - {None}:
            expected = saved.get("digests", {}).get(name)
            path = self.root / name
            if not path.is_file():
                self.notes.append(f"{name} missing")
                log.warning("resume state in %s: its checkpoint %s is missing; trying the state before it", self.root, name)
                return False
            if expected is None or sha256_file(path) != expected:
                self._set_aside(name, "damaged (its sha256 differs from the one recorded when it was written)")
                return False
        return True

    def load(self) -> RunState | None:
        """The newest intact state of this fingerprint, or None (start from scratch)."""
        for name in (STATE_FILE, PREVIOUS):
            saved = self._read(name)
            if saved is None:
                continue
            if saved.get("fingerprint") != self.fingerprint:
                log.warning(
                    "discarding resume state in %s: it was written for fingerprint %s, this run is %s "
                    "(params, data or code changed)",
                    self.root,
                    saved.get("fingerprint"),
                    self.fingerprint,
                )
                self.clear()
                return None
            state = RunState(**saved["state"])
            if state.checkpoint is None and state.epoch == 0:
                return state  # an adaptation recorded before the first epoch completed
            if self._intact(saved):
                if name == PREVIOUS:
                    self.notes.append(f"resumed from the state before the last (after epoch {state.epoch})")
                    # the last state names what is gone: kept aside, so that the next commit keeps this
                    # one as the fallback rather than rotating the broken one over it
                    self._set_aside(STATE_FILE, "naming a checkpoint that is damaged or missing")
                return state
        if self.notes:
            self.notes.append("no intact resume state: started from scratch")
        return None

    def path(self, name: str) -> Path:
        return self.root / name

    def commit(self, state: RunState) -> None:
        """Make `state` (whose checkpoint files are already written) the one a restart finds; the one it
        replaces becomes the fallback. Checkpoints neither names are removed."""
        digests = {name: sha256_file(self.root / name) for name in {state.checkpoint, state.best_checkpoint} - {None}}
        if self._read(STATE_FILE) is not None:
            os.replace(self.root / STATE_FILE, self.root / PREVIOUS)
        write_json_atomic(self.root / STATE_FILE, {"fingerprint": self.fingerprint, "state": asdict(state), "digests": digests})
        fallback = self._read(PREVIOUS)  # what a restart falls back to: its checkpoints stay too
        keep = set(digests) | set((fallback or {}).get("digests", {}))
        for stale in self.root.glob("*.keras"):
            if stale.name not in keep:
                stale.unlink()

    def clear(self) -> None:
        """Remove the resume state (the run completed, or it belongs to other settings); what was set
        aside as damaged stays."""
        if not self.root.is_dir():
            return
        for entry in self.root.iterdir():
            if entry.name == DAMAGED:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        if not any(self.root.iterdir()):
            self.root.rmdir()
