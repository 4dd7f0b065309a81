"""Where a result came from, each fact named for what it is: the project's git commit (and whether
its tracked files differed from it), and, for a run in a private workspace (`runs/<profile>/`, made
by `cifarflow workspace`), that workspace's own snapshot commit, which is not the user's."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

SNAPSHOT = ".cifarflow-snapshot.json"  # in a private workspace: the project it was copied from
GIT_TIMEOUT_S = 30  # git on a local repository answers in milliseconds; a hung network mount must not hang us


def _git(folder: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True, timeout=GIT_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def commit_of(folder: Path) -> dict[str, Any]:
    """{"commit": HEAD or None (not a git checkout), "dirty": whether tracked files differ from it}."""
    commit = _git(folder, "rev-parse", "HEAD")
    status = _git(folder, "status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def snapshot_record(project: Path) -> dict[str, Any]:
    """What `cifarflow workspace` writes into a private workspace: the project's commit at the copy."""
    return {"project": str(Path(project).resolve()), **commit_of(project)}


def git_provenance(folder: Path) -> dict[str, Any]:
    """{"project": {commit, dirty}, "snapshot": {commit, dirty} or None} for the project in `folder`:
    in a private workspace, the project is the one it was copied from and the snapshot is its own."""
    folder = Path(folder)
    marker = folder / SNAPSHOT
    if marker.is_file():
        try:
            recorded = json.loads(marker.read_text())
            project = {"commit": recorded.get("commit"), "dirty": recorded.get("dirty")}
        except (OSError, ValueError, AttributeError):
            project = {"commit": None, "dirty": None}
        return {"project": project, "snapshot": commit_of(folder)}
    return {"project": commit_of(folder), "snapshot": None}


def describe(provenance: dict[str, Any]) -> str:
    """One line for a person: the project's commit (+dirty), and the snapshot's when there is one."""
    project = provenance.get("project") or {}
    text = f"project {str(project.get('commit') or 'unknown')[:12]}{' (uncommitted changes)' if project.get('dirty') else ''}"
    snapshot = provenance.get("snapshot")
    return text + (f", workspace snapshot {str(snapshot.get('commit') or 'unknown')[:12]}" if snapshot else "")
