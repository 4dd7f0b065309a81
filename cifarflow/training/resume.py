"""Resume state of one training run, kept outside the DVC outputs (data/checkpoints/<arch>/).

Each epoch end writes `epoch-<e>.keras` (weights and optimizer state), then `state.json`, which
names it and is the commit point: a kill before the rename leaves the previous, complete state.
State is keyed by a fingerprint of the stage's params, data and code; state with another
fingerprint is discarded with a warning naming both, never reused. A finished run clears it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cifarflow.config import Params
from cifarflow.fileio import dumps_json, sha256_file, write_json_atomic

log = logging.getLogger(__name__)
STATE_FILE = "state.json"
CODE_ROOT = Path(__file__).resolve().parents[1]  # the cifarflow package
# The code that decides the train stage's outputs (weights, their archive and digest, history,
# summary), relative to the package: the resume fingerprint hashes it, and dvc.yaml's train deps
# list exactly these (tests/test_train.py checks both, and that training imports nothing else
# but NOT_DECIDING).
CODE = (
    "training",
    "models",
    "data/inputs.py",  # batches: order, augmentation, mixup, normalization
    "data/shards.py",  # shard files -> uint8 arrays
    "data/cifar_binary.py",  # the record layout shards.py decodes with
    "data/layout.py",  # image shape, read by the models and the inputs
    "data/verdict.py",  # which shards training accepts
    "digest.py",  # weights.sha256
    "keras_archive.py",  # model.keras bytes
    "fileio.py",  # summary.json's JSON form, atomic writes
)
# Modules training imports whose code cannot change its outputs.
NOT_DECIDING = (
    "__init__.py",
    "data/__init__.py",
    "config.py",  # parses params.yaml: the values it yields are the stage's params deps
    "errors.py",  # exception classes and exit codes
    "redact.py",  # how URLs appear in messages
)


@dataclass
class RunState:
    """What the loop carries from epoch to epoch; all of it survives a restart."""

    epoch: int = 0  # the next epoch to run
    best: float | None = None
    best_epoch: int | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    timings: list[dict[str, float]] = field(default_factory=list)
    schedule: dict[str, Any] | None = None
    micro_batch: int | None = None  # set after an out-of-memory adaptation
    adaptations: list[dict[str, Any]] = field(default_factory=list)
    checkpoint: str | None = None  # file of the last completed epoch
    best_checkpoint: str | None = None


def code_digest() -> str:
    digest = hashlib.sha256()
    for rel in CODE:
        path = CODE_ROOT / rel
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            digest.update(f"{file.relative_to(CODE_ROOT).as_posix()}\0".encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()


def fingerprint(params: Params, arch: str, shards_manifest: Path) -> str:
    """Everything that decides the weights: seed, data format, runtime, the recipe, the data, the code."""
    decided_by = {
        "seed": params.seed,
        "format": params.data.format,
        "runtime": params.runtime.model_dump(mode="json"),
        "recipe": params.recipe(arch).model_dump(mode="json"),
        "data": sha256_file(shards_manifest),
        "code": code_digest(),
    }
    return hashlib.sha256(dumps_json(decided_by).encode()).hexdigest()[:16]


class ResumeStore:
    """The checkpoint folder of one architecture."""

    def __init__(self, root: Path, fingerprint: str) -> None:
        self.root, self.fingerprint = Path(root), fingerprint

    def load(self) -> RunState | None:
        """The last completed epoch's state, if it belongs to this fingerprint."""
        path = self.root / STATE_FILE
        if not path.is_file():
            return None
        saved = json.loads(path.read_text())
        if saved.get("fingerprint") != self.fingerprint:
            log.warning(
                "discarding resume state in %s: it was written for fingerprint %s, this run is %s (params, data or code changed)",
                self.root,
                saved.get("fingerprint"),
                self.fingerprint,
            )
            self.clear()
            return None
        state = RunState(**saved["state"])
        if state.checkpoint is None and state.epoch == 0:
            return state  # an adaptation recorded before the first epoch completed
        if not state.checkpoint or not (self.root / state.checkpoint).is_file():
            log.warning("discarding resume state in %s: its checkpoint file is missing", self.root)
            self.clear()
            return None
        return state

    def path(self, name: str) -> Path:
        return self.root / name

    def commit(self, state: RunState) -> None:
        """Make `state` (whose checkpoint files are already written) the one a restart finds."""
        write_json_atomic(self.root / STATE_FILE, {"fingerprint": self.fingerprint, "state": asdict(state)})
        keep = {state.checkpoint, state.best_checkpoint}
        for stale in self.root.glob("*.keras"):
            if stale.name not in keep:
                stale.unlink()

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
