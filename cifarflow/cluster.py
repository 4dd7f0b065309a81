"""What the fan-out needs besides Prefect itself: where a child is placed, what the parent hands a
child of the DVC state, and what a child checks before it trains. Standard library, YAML and
filelock only (no Prefect, no DVC, no TensorFlow), so each rule is tested on its own.

The fan-out (cifarflow.flows.fanout) trains each architecture as a child flow run of the deployment
`cluster.deployment` on a work pool. The parent runs the data stages and pushes their outputs to the
DVC remote; a child clones the parent's commit, installs the parent's dvc.lock entries of the stages
its training depends on (`lock_entries`), lets `dvc repro --pull` fetch their outputs, trains
(resuming from runtime.checkpoint_store if a node was lost) and pushes its outputs and run-cache
entry; the parent then restores every training from the run-cache and evaluates.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from cifarflow.errors import ConfigError
from cifarflow.fileio import write_bytes_atomic

log = logging.getLogger(__name__)

LOCK_FILE = "dvc.lock"
GIT_TIMEOUT_S = 60
PROCESS, DOCKER, KUBERNETES = "process", "docker", "kubernetes"
GPU_QUEUE = "gpus-{}"  # a process pool's queue for children asking for more than one GPU
LOCK_WAIT_LOG_S = 60.0  # while a child waits for another training of the same inputs, it says so this often
# Set in the parent's gather: `cifarflow train` refuses to run there (the trainings are the children's;
# a run-cache entry missing from the remote must fail the run, not train on the parent's node).
GATHER_ONLY_ENV = "CIFARFLOW_GATHER_ONLY"


class WorkspaceMismatch(ConfigError):
    """A child's workspace is not the parent's commit and params.yaml: it refuses to train (exit 2)."""


def placement(pool_type: str, gpus: int) -> dict[str, Any]:
    """How a child asking for `gpus` GPUs is placed, in the work pool's own terms:
    {"job_variables": ..., "work_queue_name": ...} for run_deployment.

    - process: one worker per GPU slot, started with CUDA_VISIBLE_DEVICES set to its GPUs; a
      one-GPU (or CPU) child goes to the pool's default queue, an N-GPU child to queue `gpus-N`,
      served by workers whose slots hold N GPUs;
    - docker, kubernetes: the `gpus` job variable of the base job templates in deploy/ (a
      device request; an nvidia.com/gpu limit)."""
    if pool_type == PROCESS:
        return {"job_variables": {}, "work_queue_name": GPU_QUEUE.format(gpus) if gpus > 1 else None}
    if pool_type in (DOCKER, KUBERNETES):
        return {"job_variables": {"gpus": gpus}, "work_queue_name": None}
    raise ConfigError(
        f"cluster: the child deployment's work pool is of type {pool_type!r}; the fan-out places children on "
        f"{PROCESS}, {DOCKER} or {KUBERNETES} pools (deploy/ has the docker and kubernetes job templates)"
    )


def git(workspace: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=workspace, capture_output=True, text=True, timeout=GIT_TIMEOUT_S)
    if done.returncode != 0:
        raise ConfigError(f"{workspace}: `git {' '.join(args)}` failed: {done.stderr.strip()[:300]}")
    return done.stdout.strip()


def changed_files(workspace: Path, ignore: tuple[str, ...] = ()) -> list[str]:
    """Tracked files whose content differs from HEAD, `ignore` left out."""
    names = git(workspace, "diff", "--name-only", "HEAD", "--").splitlines()  # staged or not
    return [name for name in names if name and name not in ignore]


def params_sha256(workspace: Path) -> str:
    return hashlib.sha256((Path(workspace) / "params.yaml").read_bytes()).hexdigest()


def parent_identity(workspace: Path) -> dict[str, str]:
    """The commit and params.yaml a fan-out works from: the workspace's HEAD, refused when a tracked
    file other than dvc.lock (DVC's record of this workspace's runs) differs from it, since the
    children clone that commit and would train something else."""
    dirty = changed_files(workspace, ignore=(LOCK_FILE,))
    if dirty:
        raise ConfigError(
            f"{workspace}: cluster: the children train the committed code and params, but {', '.join(dirty[:5])} "
            "differ from the last commit: commit them (and push the commit where the nodes clone from), or revert them"
        )
    return {"commit": git(workspace, "rev-parse", "HEAD"), "params_sha256": params_sha256(workspace)}


def check_child_workspace(workspace: Path, commit: str, params: str) -> None:
    """Before a child trains: its clone is the parent's commit, unchanged, with the parent's params.yaml.
    A WorkspaceMismatch naming what differs otherwise."""
    head = git(workspace, "rev-parse", "HEAD")
    if head != commit:
        raise WorkspaceMismatch(
            f"{workspace}: the clone is at commit {head[:12]}, the parent's is {commit[:12]}; refusing to train"
        )
    dirty = changed_files(workspace)
    if dirty:
        raise WorkspaceMismatch(
            f"{workspace}: the clone's {', '.join(dirty[:5])} differ from commit {commit[:12]}; refusing to train"
        )
    mine = params_sha256(workspace)
    if mine != params:
        raise WorkspaceMismatch(f"{workspace}/params.yaml: sha256 {mine[:12]}, the parent's is {params[:12]}; refusing to train")


def lock_entries(workspace: Path, stages: list[str]) -> dict[str, Any]:
    """The parent's dvc.lock entries of `stages` (what a child needs to pull their outputs): hashes
    of files and folders, never values of params (the stages a child pulls take their settings from
    files, cifarflow.resolved)."""
    path = Path(workspace) / LOCK_FILE
    try:
        recorded = (yaml.safe_load(path.read_text()) or {}).get("stages") or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: unreadable ({exc.__class__.__name__}); run the data stages first") from None
    missing = [stage for stage in stages if stage not in recorded]
    if missing:
        raise ConfigError(f"{path}: no entry for {', '.join(missing)}; run the data stages first")
    entries = {stage: recorded[stage] for stage in stages}
    with_params = [stage for stage, entry in entries.items() if entry.get("params")]
    if with_params:  # they could carry a signed source URL into the Prefect database
        raise ConfigError(f"{path}: stages {with_params} record params values; a child is not handed those")
    return entries


def install_lock_entries(workspace: Path, entries: dict[str, Any]) -> None:
    """Write the parent's `entries` into the child's dvc.lock (its other entries kept), atomically."""
    path = Path(workspace) / LOCK_FILE
    current = yaml.safe_load(path.read_text()) if path.exists() else None
    lock = current if isinstance(current, dict) else {"schema": "2.0", "stages": {}}
    lock.setdefault("stages", {}).update(entries)
    write_bytes_atomic(path, yaml.safe_dump(lock, sort_keys=False).encode())


def training_key(arch: str, deps: list[Path]) -> str:
    """One training's identity across nodes and parent runs: the bytes of the files its stage depends
    on (its resolved settings, code digest included, and the validate stage's verdict, which names
    the data's manifest)."""
    digest = hashlib.sha256()
    for path in deps:
        digest.update(f"{Path(path).name}\0".encode())
        digest.update(Path(path).read_bytes())
    return f"train@{arch}-{digest.hexdigest()[:16]}"


@contextmanager
def exclusive(store: Path, key: str, holder: str) -> Iterator[None]:
    """Hold `<store>/locks/<key>.lock` for the duration (a file lock: released by the kernel when its
    holder dies, a lost node's included, and on NFS when its lease ends). A second child of the
    same training, from another parent run, waits here and then finds the first one's result in
    the run-cache: nothing is trained twice, and two writers never share a checkpoint folder."""
    from filelock import FileLock, Timeout

    folder = Path(store) / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    lock, about = FileLock(folder / f"{key}.lock"), folder / f"{key}.holder.json"
    waited = time.monotonic()
    while True:
        try:
            lock.acquire(timeout=LOCK_WAIT_LOG_S)
            break
        except Timeout:
            try:
                who = json.loads(about.read_text()).get("holder", "another run")
            except (OSError, ValueError, AttributeError):
                who = "another run"
            log.info("%s: waiting for %s, which trains it (%.0f s so far)", key, who, time.monotonic() - waited)
    try:
        about.write_text(json.dumps({"holder": holder, "host": socket.gethostname(), "pid": os.getpid()}))
        yield
    finally:
        about.unlink(missing_ok=True)
        lock.release()
