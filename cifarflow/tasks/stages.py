"""Prefect tasks, one per stage kind. Each runs `dvc repro --single-item <stage>` in a fresh
subprocess, so an orchestrated run and a plain `dvc repro` write the same outputs and dvc.lock,
an up-to-date stage is skipped, a retry starts with clean (GPU) memory, and a timeout can
really stop it.

`dvc repro` exits 255 whatever went wrong, so the CLI writes the failure class to the file
named by CIFARFLOW_STATUS_FILE and the task turns it into an exception that decides retrying:
a bad config or input fails at once; out of memory and other runtime failures retry.

One Prefect task, `stage_task`, runs any stage; the per-kind tasks are its `with_options` variants
(name, tags, retries), and every task run is named after its DVC stage (`train@resnet56`).
Tasks import only light library modules (errors, executables), never TensorFlow.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import re
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.exceptions import MissingContextError
from prefect.tasks import exponential_backoff

from cifarflow.errors import STATUS_ENV, ConfigError, InputError, OutOfMemoryError, failure_class
from cifarflow.executables import beside_python

KILL_GRACE_S = 10.0  # SIGTERM to SIGKILL: DVC and TensorFlow need a few seconds to stop cleanly
MESSAGE_LINES = 20  # a failed stage's last output lines, when its status file holds no message
MESSAGE_TAIL = 3000  # characters of a failed promotion's stderr: the end of its message or traceback


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


# failure class (cifarflow.errors) -> exception; every other class is a RuntimeFailure
FAILURES: dict[str, type[StageFailed]] = {
    ConfigError.failure_class: ConfigFailure,
    InputError.failure_class: ConfigFailure,
    OutOfMemoryError.failure_class: OutOfMemory,
}


def stage_failure(exit_code: int, status: dict[str, Any], message: str) -> StageFailed:
    """The exception for a failed command, from its status file or else its exit code."""
    return FAILURES.get(failure_class(exit_code, status), RuntimeFailure)(message)


def worth_retrying(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's retry_condition_fn: no retry for configuration or input errors."""
    return not isinstance(state.data, ConfigFailure)


@contextmanager
def status_file() -> Iterator[Path]:
    """A fresh path for the CLI's status file (pass it as STATUS_ENV); removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="cifarflow-status-") as tmp:
        yield Path(tmp) / "status.json"


def read_status(path: Path) -> dict[str, Any]:
    """What the CLI wrote to its status file: {} when it wrote nothing (killed, or not a CLI failure)."""
    try:
        status = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return status if isinstance(status, dict) else {}


# What DVC advises after a stage, written for a person at a git prompt: in a flow, the same hint
# after every stage is noise. Logged at DEBUG (the flow's log file keeps it).
DVC_HINTS = re.compile(
    r"^\s*(?:To track the changes with git, run:|git add |To enable auto staging, run:"
    r"|dvc config core\.autostage|Use `dvc push` to send your updates)"
)


def _stream(pipe: Any, lines: list[str], log: Any) -> None:
    for line in iter(pipe.readline, ""):
        lines.append(line)
        text = line.rstrip()
        log.log(logging.DEBUG if not text.strip() or DVC_HINTS.match(text) else logging.INFO, "%s", text)


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


RESTORED = "is cached - skipping run"  # what `dvc repro` says of a stage it restores from the run-cache


def run_dvc_stage(
    stage: str,
    workspace: str | Path,
    timeout_s: float | None = None,
    extra_env: dict[str, str] | None = None,
    up_to_date: bool = False,
    pull: bool = False,
) -> dict[str, Any]:
    """`dvc repro --single-item <stage>` in `workspace`, output streamed to the task's log.
    `up_to_date` (from `stale_stages`) skips it without starting DVC: it would only skip it too.
    `pull`: `--pull`, so missing dependencies come from the DVC remote, and the stage itself from
    the remote's run-cache when a run of the same command, dependencies and params is recorded there
    (the result's `restored`)."""
    log = _logger()
    if up_to_date:
        log.info("%s: up to date (dvc status), not started", stage)
        return {"stage": stage, "seconds": 0.0, "skipped": True, "restored": False}
    workspace = Path(workspace)
    with status_file() as status_path:
        env = {**os.environ, **(extra_env or {}), STATUS_ENV: str(status_path)}
        started = time.monotonic()
        process = subprocess.Popen(
            [beside_python("dvc"), "repro", "--single-item", *(["--pull"] if pull else []), stage],
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
            raise StageTimeout(f"{stage}: exceeded its timeout of {timeout_s:g} s; killed with all its children") from None
        reader.join(timeout=5)
        seconds = round(time.monotonic() - started, 3)
        if code == 0:
            skipped = any("didn't change, skipping" in line for line in lines)
            return {"stage": stage, "seconds": seconds, "skipped": skipped, "restored": any(RESTORED in line for line in lines)}
        status = read_status(status_path)
    message = status.get("message") or "".join(lines[-MESSAGE_LINES:]).strip()
    raise stage_failure(code, status, f"{stage} failed ({failure_class(code, status)}): {message}")


DVC_TRANSFER_TIMEOUT_S = 6 * 3600  # a push or pull of the whole data set to a slow remote: hours, not forever


def run_dvc(workspace: str | Path, *args: str, timeout_s: float = DVC_TRANSFER_TIMEOUT_S) -> str:
    """A DVC command other than a stage run (`push`, `pull`) in `workspace`; its output, or a
    RuntimeFailure with its last lines (a remote that cannot be reached is worth a retry)."""
    try:
        done = subprocess.run([beside_python("dvc"), *args], cwd=workspace, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise RuntimeFailure(f"`dvc {' '.join(args)}` in {workspace} did not end within {timeout_s:g} s; stopped") from None
    output = done.stdout + done.stderr
    for line in output.splitlines():
        _logger().debug("dvc %s: %s", args[0], line)
    if done.returncode != 0:
        tail = "".join(output.splitlines(keepends=True)[-MESSAGE_LINES:]).strip()
        raise RuntimeFailure(f"`dvc {' '.join(args)}` in {workspace} failed (exit {done.returncode}): {tail}")
    return output


def check_params(workspace: str | Path) -> None:
    """`cifarflow params --check` before anything runs: a config error stops the flow at once."""
    done = subprocess.run([beside_python("cifarflow"), "params", "--check"], cwd=workspace, capture_output=True, text=True)
    if done.returncode != 0:
        raise stage_failure(done.returncode, {}, done.stderr.strip())


BACKOFF_S = 5  # the first retry waits about this long, each next one twice as long (Prefect's exponential_backoff)
JITTER = 0.5  # each wait varies by up to +-50%, so retries of several runs do not hit a shared service together
RETRY = {
    "retries": 2,
    "retry_delay_seconds": exponential_backoff(backoff_factor=BACKOFF_S),
    "retry_jitter_factor": JITTER,
    "retry_condition_fn": worth_retrying,
}


@task(name="params-check", retries=0)
def params_check(workspace: str) -> None:
    """Validate params.yaml (fast, no TensorFlow)."""
    check_params(workspace)


@task(name="stage", task_run_name="{stage}", **RETRY)
def stage_task(stage: str, workspace: str, timeout_s: float | None = None, up_to_date: bool = False) -> dict[str, Any]:
    """One DVC stage (`dvc repro --single-item <stage>`), its task run named after it."""
    return run_dvc_stage(stage, workspace, timeout_s, up_to_date=up_to_date)


data_stage = stage_task.with_options(name="data-stage")  # download, preprocess, validate, corrupt
# GPU work; a retry resumes from the last epoch. The backoff is given again: it was expanded for 2 retries.
train_stage = stage_task.with_options(name="train", tags=["gpu"], retries=4, retry_delay_seconds=RETRY["retry_delay_seconds"])
evaluate_stage = stage_task.with_options(name="evaluate")
export_stage = stage_task.with_options(name="export")  # select, bless, serving check
report_stage = stage_task.with_options(name="report")  # the leaderboard
# stage kind (the part of a stage's name before `@`) -> its task; every other stage is a data stage
KIND_TASKS = {"train": train_stage, "evaluate": evaluate_stage, "export": export_stage, "report": report_stage}


def stage_kind_task(stage: str) -> Any:
    """The task that runs `stage` (`train@resnet56` -> the train task, with its GPU tag and retries)."""
    return KIND_TASKS.get(stage.partition("@")[0], data_stage)


def pipeline_order(workspace: str | Path) -> list[str]:
    """Every stage of the workspace's dvc.yaml, in an order DVC could run them (dependencies first; among
    stages free to go, dvc.yaml's order): the flow's order comes from the graph, not a list of its own."""
    import networkx as nx  # DVC's own dependency
    from dvc.repo import Repo

    with Repo(str(workspace)) as repo:
        graph = repo.index.graph  # an edge runs from a stage to a stage it depends on
        written = {stage: i for i, stage in enumerate(repo.index.stages)}
        order = nx.lexicographical_topological_sort(graph.reverse(copy=False), key=lambda stage: written[stage])
        return [stage.addressing.rpartition(":")[2] for stage in order]


@task(name="promote", retries=0)
def promote_export(workspace: str, by: str) -> dict[str, Any]:
    """Make the export the champion if the registry, re-checking it against the current champion
    under its lock, allows it; a refusal (worse, rolled back, synthetic...) is an outcome, not a failure."""
    with status_file() as status_path:
        done = subprocess.run(
            [beside_python("cifarflow"), "promote", "--by", by],
            cwd=workspace,
            capture_output=True,
            text=True,
            env={**os.environ, STATUS_ENV: str(status_path)},
        )
        status = read_status(status_path)
    if done.returncode == 0:
        message = done.stdout.strip()
        return {"promoted": message.startswith("promoted"), "message": message}
    if status.get("class") == "refused":  # cifarflow.registry's PromotionRefused: an outcome, not a failure
        _logger().warning("not promoted: %s", status.get("message"))
        return {"promoted": False, "message": status.get("message", "")}
    raise stage_failure(done.returncode, status, done.stderr.strip()[-MESSAGE_TAIL:])
