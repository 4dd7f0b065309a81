"""The validate stage's verdict, and the cheap checks every reader of the shards repeats at load.

`validate` writes `{"valid": true, "manifest_sha256": ...}` only when the shards pass: facts of
the data alone, so rewording the report rewrites identical bytes and DVC retrains nothing.
Training, evaluation and export then check, before they read a shard: the verdict names the
manifest being read; the shard folder of the format read holds exactly the manifest's files;
the files read have their recorded sha256 (~0.2 s for 150 MB); and, once loaded, each split has
the manifest's count and only labels below the number of classes. Light on purpose: no
TensorFlow, no pyarrow, so every stage can afford it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cifarflow.contract import MANIFEST, MAX_JSON_BYTES
from cifarflow.errors import InputError
from cifarflow.fileio import sha256_file, write_json_atomic
from cifarflow.openfile import read_regular

RERUN = "rerun preprocess, then validate (dvc repro validate)"


def verdict_of(manifest_bytes: bytes) -> dict[str, Any]:
    """The verdict for shards whose manifest has these bytes (the manifest lists every shard's sha256)."""
    return {"valid": True, "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest()}


def write_verdict(path: Path, manifest_bytes: bytes) -> None:
    write_json_atomic(Path(path), verdict_of(manifest_bytes))


def discard_verdict(path: Path) -> None:
    """Called before validating: a verdict from an earlier run must not outlive a failed validation."""
    Path(path).unlink(missing_ok=True)


def read_manifest(root: Path) -> tuple[bytes, dict[str, Any]]:
    """The manifest's bytes (what the verdict hashes) and content, checked for the keys readers use."""
    path = Path(root) / MANIFEST
    data = read_regular(path, MAX_JSON_BYTES, missing="not found; run the preprocess stage first", what="a manifest")
    try:
        manifest = json.loads(data)
        if not (
            isinstance(manifest["classes"], list)
            and isinstance(manifest["counts"], dict)
            and isinstance(manifest["shards"], dict)
        ):
            raise TypeError("classes, counts or shards has the wrong type")
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{path}: not a preprocess manifest ({exc}); rerun preprocess") from None
    return data, manifest


def check_verdict(path: Path, manifest_path: Path, manifest_bytes: bytes) -> None:
    """The verdict exists, says valid, and names the manifest being read."""
    path = Path(path)
    missing = (
        f"not found: the shards in {manifest_path.parent} have not passed validation; run the validate stage (dvc repro validate)"
    )
    data = read_regular(path, MAX_JSON_BYTES, missing=missing, what="a validation verdict")
    try:
        verdict = json.loads(data)
    except ValueError as exc:
        raise InputError(f"{path}: not a validation verdict ({exc}); rerun the validate stage (dvc repro validate)") from None
    if not isinstance(verdict, dict) or verdict.get("valid") is not True:
        raise InputError(f"{path}: does not say the shards are valid; rerun the validate stage and fix what it reports")
    expected = verdict_of(manifest_bytes)["manifest_sha256"]
    if verdict.get("manifest_sha256") != expected:
        raise InputError(
            f"{path}: validated a manifest with sha256 {str(verdict.get('manifest_sha256'))[:12]}..., but "
            f"{manifest_path} has {expected[:12]}...: the shards changed after validation; "
            "rerun the validate stage (dvc repro validate)"
        )


@dataclass(frozen=True)
class CheckedShards:
    """Shards that passed `check_shards` for one format; `check_split` checks each split once loaded."""

    root: Path
    fmt: str
    manifest: dict[str, Any]

    @property
    def classes(self) -> list[str]:
        return self.manifest["classes"]

    def files(self, split: str) -> list[Path]:
        """The split's shard files of this format, in order (the order the loader reads them in)."""
        prefix = f"{self.fmt}/{split}-"
        return [self.root / rel for rel in sorted(self.manifest["shards"]) if rel.startswith(prefix)]

    def check_split(self, split: str, labels: np.ndarray) -> None:
        """A loaded split has the manifest's count of examples and only labels below the number of classes."""
        expected = self.manifest["counts"].get(split)
        if len(labels) != expected:
            raise InputError(f"{self.root / self.fmt}: {split} has {len(labels)} examples, {MANIFEST} says {expected}; {RERUN}")
        bad = np.flatnonzero(np.asarray(labels) >= len(self.classes))
        if len(bad):
            row = int(bad[0])
            shard = self._file_of(split, row, len(labels))
            raise InputError(
                f"{shard}: label {int(labels[row])} >= {len(self.classes)} classes ({len(bad)} such labels in {split}); {RERUN}"
            )

    def _file_of(self, split: str, row: int, n: int) -> Path:
        """The shard holding row `row` of a split of `n` rows."""
        files = self.files(split)
        if not files:
            return self.root / self.fmt
        # preprocess cuts a split into shards with np.array_split: the first n % k get one row more
        ends = np.cumsum([len(part) for part in np.array_split(np.empty(n), len(files))])
        return files[int(np.searchsorted(ends, row, side="right"))]


def check_shards(root: Path, verdict: Path | None, fmt: str, splits: Sequence[str]) -> CheckedShards:
    """Before reading `splits` in `fmt`: the verdict (if given) names this manifest, the format's folder
    holds exactly the listed files, and the files of `splits` have their recorded sha256."""
    root = Path(root)
    manifest_bytes, manifest = read_manifest(root)
    if verdict is not None:
        check_verdict(Path(verdict), root / MANIFEST, manifest_bytes)
    listed = {rel for rel in manifest["shards"] if rel.startswith(f"{fmt}/")}
    folder = root / fmt
    present = {f"{fmt}/{p.name}" for p in folder.iterdir()} if folder.is_dir() else set()
    if missing := sorted(listed - present):
        raise InputError(
            f"{root / missing[0]}: listed in {root / MANIFEST} but missing"
            f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; {RERUN}"
        )
    if extra := sorted(present - listed):
        raise InputError(
            f"{root / extra[0]}: not listed in {root / MANIFEST}"
            f"{f' (and {len(extra) - 1} more)' if len(extra) > 1 else ''}; remove it or {RERUN}"
        )
    checked = CheckedShards(root, fmt, manifest)
    for split in splits:
        files = checked.files(split)
        if not files:
            raise InputError(f"{root / MANIFEST}: lists no {split} shards in {fmt}; {RERUN}")
        for path in files:
            if sha256_file(path) != manifest["shards"][f"{fmt}/{path.name}"]:
                raise InputError(f"{path}: sha256 differs from {root / MANIFEST}: the shard changed after preprocess; {RERUN}")
    return checked
