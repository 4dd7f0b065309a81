"""`cifarflow workspace PROFILE`: a private copy of the project in which a profile runs (`make pipeline
PROFILE=smoke`, `cifarflow flow run --profile smoke`), so trying the pipeline never edits the
project's params.yaml or replaces its data/.

The copy (`runs/<profile>/`, git-ignored and DVC-ignored) holds the project's tracked files as they
are now (uncommitted edits to them included; files git does not track are not copied, and neither
is a dvc.lock: the copy's runs are its own), with `profile: <profile>` selected in its own
params.yaml; it is its own git and DVC repository, so its outputs, dvc.lock and cache stay there
for the user to look at, and a second run is incremental. This module also holds the lock that
makes one flow run at a time in a workspace.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cifarflow.errors import CifarflowError, InputError
from cifarflow.fileio import write_bytes_atomic, write_json_atomic
from cifarflow.params_file import set_keys
from cifarflow.provenance import SNAPSHOT, snapshot_record

RUNS = "runs"  # in .gitignore and .dvcignore


class WorkspaceBusy(CifarflowError):
    """Another flow holds this workspace: not worth retrying at once (exit 2)."""

    exit_code = 2
    failure_class = "busy"


NOT_COPIED = ("dvc.lock",)  # a workspace's record of its own runs


def project_files(project: Path) -> list[str]:
    """The files git tracks (as they are in the working tree): what a clone would have, with the
    user's edits to them, never a stray file of a used checkout."""
    done = subprocess.run(["git", "ls-files", "--cached", "-z"], cwd=project, capture_output=True, text=True)
    if done.returncode != 0:
        raise InputError(f"{project}: not a git checkout of the project ({done.stderr.strip()[:200]})")
    return [
        f
        for f in done.stdout.split("\0")
        if f and (project / f).is_file() and not f.startswith(f"{RUNS}/") and f not in NOT_COPIED
    ]


def prepare(project: Path, profile: str) -> Path:
    """Create or refresh `runs/<profile>/` from the project; return its path."""
    project = Path(project).resolve()
    target = project / RUNS / profile
    if target.resolve().parent != project / RUNS:  # profile names are checked by config; keep it that way
        raise InputError(f"profile {profile[:40]!r} would not make a folder directly in {project / RUNS}")
    target.mkdir(parents=True, exist_ok=True)
    for rel in project_files(project):
        destination = target / rel
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(project / rel, destination)
    if not (target / ".git").exists():
        subprocess.run(["git", "init", "-q"], cwd=target, check=True)
    set_keys(target / "params.yaml", {"profile": profile})
    # what the snapshot was copied from: the model card names the project's commit, not the snapshot's
    write_json_atomic(target / SNAPSHOT, snapshot_record(project))
    commit_snapshot(target, profile)
    return target


SNAPSHOT_DATE = "2000-01-01T00:00:00+0000"


def commit_snapshot(target: Path, profile: str) -> None:
    """A commit of the snapshot as HEAD, so the copy behaves as a clone (DVC experiments need one).
    The model card names it, so it is a function of the copied files alone: a root commit with a fixed
    author and date, without the marker (it holds this machine's path). A container or another host
    copying the same files makes the same commit."""
    exclude = target / ".git" / "info" / "exclude"
    exclude.parent.mkdir(exist_ok=True)
    lines = exclude.read_text().splitlines() if exclude.is_file() else []
    if f"/{SNAPSHOT}" not in lines:
        exclude.write_text("\n".join([*lines, f"/{SNAPSHOT}"]) + "\n")
    env = os.environ | {
        "GIT_AUTHOR_NAME": "cifarflow",
        "GIT_AUTHOR_EMAIL": "cifarflow@localhost",
        "GIT_AUTHOR_DATE": SNAPSHOT_DATE,
        "GIT_COMMITTER_NAME": "cifarflow",
        "GIT_COMMITTER_EMAIL": "cifarflow@localhost",
        "GIT_COMMITTER_DATE": SNAPSHOT_DATE,
    }

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=target, env=env, check=True, capture_output=True, text=True).stdout.strip()

    git("rm", "-q", "--cached", "--ignore-unmatch", SNAPSHOT)  # a workspace made before it was excluded
    git("add", "-A")
    commit = git("commit-tree", git("write-tree"), "-m", f"snapshot for profile {profile}")
    git("update-ref", "HEAD", commit)


FLOW_LOCK = ".cifarflow/flow.lock"  # in a workspace (git- and DVC-ignored): held by the flow running there
HOLDER = ".cifarflow/flow.holder.json"  # who holds it: pid, host, start, flow run


@contextmanager
def flow_lock(workspace: Path, holder: str) -> Iterator[None]:
    """Hold the workspace's flow lock for the whole run, or refuse at once, naming who holds it: a
    second flow in the same workspace would edit params.yaml and run DVC under the first one."""
    from filelock import FileLock, Timeout

    lock_path, holder_path = Path(workspace) / FLOW_LOCK, Path(workspace) / HOLDER
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(lock_path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        try:
            held = json.loads(holder_path.read_text())
            who = f"{held['holder']} (pid {held['pid']} on {held['host']}, since {held['since']})"
        except (OSError, ValueError, KeyError, TypeError):
            who = "another process"
        raise WorkspaceBusy(
            f"{workspace}: a flow is already running in this workspace: {who}; wait for it to end, or run in another clone"
        ) from None
    try:
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        write_json_atomic(holder_path, {"holder": holder, "pid": os.getpid(), "host": socket.gethostname(), "since": since})
        yield
    finally:
        holder_path.unlink(missing_ok=True)
        lock.release()


@contextmanager
def run_scoped(params: Path, changes: dict[str, Any], check: Any = None) -> Iterator[bool]:
    """`changes` set in params.yaml for the duration, then the file written back byte for byte as it was
    (hold the flow lock around it): a run's choice of architectures does not outlive the run. Yields
    whether anything changed."""
    before = Path(params).read_bytes()
    changed = set_keys(params, changes, check=check) if changes else False
    try:
        yield changed
    finally:
        if changed:
            write_bytes_atomic(params, before)
