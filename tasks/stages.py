"""Prefect tasks, one per stage kind. Each runs `dvc repro --single-item <stage>` in a fresh
subprocess, so an orchestrated run and a plain `dvc repro` write the same outputs and dvc.lock,
an up-to-date stage is skipped, a retry starts with clean (GPU) memory, and a timeout can
really stop it.

`dvc repro` exits 255 whatever went wrong, so the CLI writes the failure class to the file
named by CIFARFLOW_STATUS_FILE and the task turns it into an exception that decides retrying:
a bad config or input fails at once; out of memory and other runtime failures retry.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.exceptions import MissingContextError
from prefect.tasks import exponential_backoff

STATUS_ENV = "CIFARFLOW_STATUS_FILE"  # cifarflow.cli.STATUS_ENV (tasks never import the library)
KILL_GRACE_S = 10.0


class StageFailed(RuntimeError):
    """A stage failed; the subclass says whether a retry can help."""


class ConfigFailure(StageFailed):
    """Bad configuration or input (the CLI's exit 2): retrying cannot help."""


class OutOfMemory(StageFailed):
    """The device ran out of memory: the retry resumes with a smaller micro-batch."""


class RuntimeFailure(StageFailed):
    """Anything else: worth a retry with backoff."""


class StageTimeout(RuntimeFailure):
    """The stage ran past its timeout; its whole process group was killed and reaped."""


FAILURES = {"config": ConfigFailure, "input": ConfigFailure, "oom": OutOfMemory}


def worth_retrying(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's retry_condition_fn: no retry for configuration or input errors."""
    return not isinstance(state.data, ConfigFailure)


def dvc_executable() -> str:
    beside = Path(sys.executable).with_name("dvc")  # the venv's dvc, even when PATH lacks it
    return str(beside) if beside.exists() else "dvc"


def _stream(pipe: Any, lines: list[str], log: Any) -> None:
    for line in iter(pipe.readline, ""):
        lines.append(line)
        log.info(line.rstrip())


def kill_group(process: subprocess.Popen) -> None:
    """SIGTERM the whole group, SIGKILL what is left, and reap: a DVC killed and not waited
    for keeps its repository lock busy."""
    for sig, grace in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=grace)
            break
        except subprocess.TimeoutExpired:
            continue
    process.wait()
    deadline = time.monotonic() + KILL_GRACE_S  # children that outlived the leader
    while time.monotonic() < deadline:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        time.sleep(0.1)


def _logger() -> Any:
    try:
        return get_run_logger()
    except MissingContextError:  # called outside a flow or task run, e.g. from a test
        return logging.getLogger(__name__)


def stale_stages(workspace: str | Path) -> set[str]:
    """The stages `dvc status` reports as changed. In-process: one status costs ~0.3 s, where
    starting a DVC interpreter per stage costs ~1 s, most of the flow's overhead over `dvc repro`."""
    from dvc.repo import Repo  # DVC's own API; the stage runs themselves stay in subprocesses

    with Repo(str(workspace)) as repo:
        return {name.rpartition(":")[2] for name in repo.status()}  # "dvc.yaml:train@x" -> "train@x"


def run_dvc_stage(
    stage: str,
    workspace: str | Path,
    timeout_s: float | None = None,
    extra_env: dict[str, str] | None = None,
    up_to_date: bool = False,
) -> dict[str, Any]:
    """`dvc repro --single-item <stage>` in `workspace`, output streamed to the task's log.
    `up_to_date` (from `stale_stages`) skips it without starting DVC: it would only skip it too."""
    log = _logger()
    if up_to_date:
        log.info("%s: up to date (dvc status), not started", stage)
        return {"stage": stage, "seconds": 0.0, "skipped": True}
    workspace = Path(workspace)
    with tempfile.TemporaryDirectory(prefix="cifarflow-status-") as tmp:
        status_file = Path(tmp) / "status.json"
        env = {**os.environ, **(extra_env or {}), STATUS_ENV: str(status_file)}
        started = time.monotonic()
        process = subprocess.Popen(
            [dvc_executable(), "repro", "--single-item", stage],
            cwd=workspace,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )  # its own process group, to kill it whole
        lines: list[str] = []
        # The reader logs through the task's logger: give it the task's Prefect context (run, settings).
        reader = threading.Thread(target=contextvars.copy_context().run, args=(_stream, process.stdout, lines, log), daemon=True)
        reader.start()
        try:
            code = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            kill_group(process)
            reader.join(timeout=5)
            raise StageTimeout(f"{stage}: exceeded its timeout of {timeout_s:.0f} s; killed with all its children") from None
        reader.join(timeout=5)
        seconds = round(time.monotonic() - started, 3)
        if code == 0:
            skipped = any("didn't change, skipping" in line for line in lines)
            return {"stage": stage, "seconds": seconds, "skipped": skipped}
        status = json.loads(status_file.read_text()) if status_file.is_file() else {}
        error = FAILURES.get(status.get("class"), RuntimeFailure)
        message = status.get("message") or "".join(lines[-20:]).strip()
        raise error(f"{stage} failed ({status.get('class', 'runtime')}): {message}")


def check_params(workspace: str | Path) -> None:
    """`cifarflow params --check` before anything runs: a config error stops the flow at once."""
    cli = Path(sys.executable).with_name("cifarflow")
    done = subprocess.run(
        [str(cli) if cli.exists() else "cifarflow", "params", "--check"], cwd=workspace, capture_output=True, text=True
    )
    if done.returncode == 2:
        raise ConfigFailure(done.stderr.strip())
    if done.returncode != 0:
        raise RuntimeFailure(done.stderr.strip())


RETRY = {
    "retries": 2,
    "retry_delay_seconds": exponential_backoff(backoff_factor=5),
    "retry_jitter_factor": 0.5,
    "retry_condition_fn": worth_retrying,
}


@task(name="params-check", retries=0)
def params_check(workspace: str) -> None:
    """Validate params.yaml (fast, no TensorFlow)."""
    check_params(workspace)


@task(name="data-stage", task_run_name="{stage}", **RETRY)
def data_stage(stage: str, workspace: str, timeout_s: float | None = None, up_to_date: bool = False) -> dict[str, Any]:
    """download, preprocess or validate."""
    return run_dvc_stage(stage, workspace, timeout_s, up_to_date=up_to_date)


@task(name="train", task_run_name="train@{arch}", tags=["gpu"], **{**RETRY, "retries": 4})
def train_stage(arch: str, workspace: str, timeout_s: float | None = None, up_to_date: bool = False) -> dict[str, Any]:
    """train@<arch>: GPU work; a retry resumes from the last epoch checkpoint."""
    return run_dvc_stage(f"train@{arch}", workspace, timeout_s, up_to_date=up_to_date)


@task(name="evaluate", task_run_name="evaluate@{arch}", **RETRY)
def evaluate_stage(arch: str, workspace: str, timeout_s: float | None = None, up_to_date: bool = False) -> dict[str, Any]:
    """evaluate@<arch>."""
    return run_dvc_stage(f"evaluate@{arch}", workspace, timeout_s, up_to_date=up_to_date)


@task(name="export", **RETRY)
def export_stage(workspace: str, timeout_s: float | None = None, up_to_date: bool = False) -> dict[str, Any]:
    """export: select, bless, serving check."""
    return run_dvc_stage("export", workspace, timeout_s, up_to_date=up_to_date)


@task(name="report", **RETRY)
def report_stage(workspace: str, timeout_s: float | None = None, up_to_date: bool = False) -> dict[str, Any]:
    """report: the leaderboard."""
    return run_dvc_stage("report", workspace, timeout_s, up_to_date=up_to_date)


@task(name="promote", retries=0)
def promote_export(workspace: str, by: str) -> dict[str, Any]:
    """Make the export the champion if the registry, re-checking it against the current champion
    under its lock, allows it; a refusal (worse, rolled back, synthetic...) is an outcome, not a failure."""
    cli = Path(sys.executable).with_name("cifarflow")
    with tempfile.TemporaryDirectory(prefix="cifarflow-status-") as tmp:
        status_file = Path(tmp) / "status.json"
        done = subprocess.run(
            [str(cli) if cli.exists() else "cifarflow", "promote", "--by", by],
            cwd=workspace,
            capture_output=True,
            text=True,
            env={**os.environ, STATUS_ENV: str(status_file)},
        )
        status = json.loads(status_file.read_text()) if status_file.is_file() else {}
    if done.returncode == 0:
        message = done.stdout.strip()
        return {"promoted": message.startswith("promoted"), "message": message}
    if status.get("class") == "refused":
        _logger().warning("not promoted: %s", status["message"])
        return {"promoted": False, "message": status["message"]}
    raise (ConfigFailure if done.returncode == 2 else RuntimeFailure)(done.stderr.strip()[-3000:])
