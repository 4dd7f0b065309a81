"""Prefect orchestration against a real `prefect server start` on 127.0.0.1: the deployment with
its cron schedule, a worker running the smoke pipeline, artifacts and the alert webhook; then
the fault cases: a killed training resumed by a retry, a transient failure retried, a config
error not retried, and a timeout that kills a stage with all its children."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from conftest import REPO, cli_env, free_port, prefect_env, run_in, set_params  # noqa: F401  (re-exported)

pytestmark = pytest.mark.slow
ARCH = "lenet"  # one architecture keeps these tests short


class Receiver(http.server.ThreadingHTTPServer):
    """A webhook endpoint that keeps what it is sent."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(handler) -> None:
                length = int(handler.headers.get("Content-Length", 0))
                self.received.append(json.loads(handler.rfile.read(length)))
                handler.send_response(200)
                handler.end_headers()

            def log_message(handler, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hook"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def prefect_cli(env: dict[str, str], cwd: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    from cifarflow.executables import beside_python

    done = subprocess.run([beside_python("prefect"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"prefect {' '.join(args)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def api(env: dict[str, str], method: str, path: str, **body: Any) -> Any:
    response = requests.request(method, env["PREFECT_API_URL"] + path, json=body or None, timeout=30)
    response.raise_for_status()
    return response.json()


def test_deployment_worker_artifacts_and_alert(prefect_server: dict[str, str], workspace: Path, receiver: Receiver) -> None:
    env = prefect_server | {"CIFARFLOW_WORKSPACE": str(workspace)}
    set_params(workspace, **{"profiles.smoke.export.min_accuracy": 0.99})  # force the unblessed alert
    run_in(workspace, "git", "commit", "-qam", "smoke threshold")
    prefect_cli(env, workspace, "work-pool", "create", "gpu-pool", "--type", "process")
    prefect_cli(env, workspace, "concurrency-limit", "create", "gpu", "1")
    prefect_cli(env, workspace, "--no-prompt", "deploy", "--all")

    deployment = api(env, "GET", "/deployments/name/cifar10-pipeline/nightly")
    assert [s["schedule"]["cron"] for s in deployment["schedules"]] == ["0 2 * * *"]
    assert deployment["work_pool_name"] == "gpu-pool"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the scheduler creates the upcoming nightly runs
        scheduled = api(
            env,
            "POST",
            "/flow_runs/filter",
            flow_runs={"deployment_id": {"any_": [deployment["id"]]}, "state": {"type": {"any_": ["SCHEDULED"]}}},
        )
        if scheduled:
            break
        time.sleep(1)
    assert scheduled and all(run["expected_start_time"].endswith(("T02:00:00Z", "T02:00:00+00:00")) for run in scheduled)

    from prefect.blocks.system import Secret
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}):  # the URL is a secret, not a parameter
        Secret(value=receiver.url).save("cifarflow-webhook", overwrite=True)
    run = api(
        env,
        "POST",
        f"/deployments/{deployment['id']}/create_flow_run",
        parameters={"archs": [ARCH], "profile": "smoke", "webhook_secret": "cifarflow-webhook", "workspace": "."},
    )
    prefect_cli(env, workspace, "worker", "start", "--pool", "gpu-pool", "--run-once", timeout=900)
    final = api(env, "GET", f"/flow_runs/{run['id']}")
    assert final["state"]["type"] == "COMPLETED", final["state"]

    card = json.loads((workspace / "data/export/model_card.json").read_text())
    assert card["arch"] == ARCH and card["verdict"]["blessed"] is False
    assert (workspace / "data/reports/leaderboard.md").is_file()
    # The run's own stages are up to date; params.yaml's archs are back as the user wrote them (the
    # selection was for that run only), so the other architectures show as not run, and resolve as changed.
    status = json.loads(run_in(workspace, "dvc", "status", "--json", f"train@{ARCH}", f"evaluate@{ARCH}").stdout)
    assert status == {}, status
    assert yaml.safe_load((workspace / "params.yaml").read_text())["archs"] != [ARCH]
    artifacts = api(env, "POST", "/artifacts/filter", artifacts={"flow_run_id": {"any_": [run["id"]]}})
    assert {a["key"] for a in artifacts} >= {"leaderboard", "report", "blessing"}
    table = next(a for a in artifacts if a["key"] == "leaderboard")
    assert table["type"] == "table" and ARCH in json.dumps(table["data"])
    assert [m["event"] for m in receiver.received] == ["not_blessed"]
    assert ARCH in receiver.received[0]["text"] and "min_accuracy" in receiver.received[0]["text"]


# --- faults, with the flow called in-process against the same server ------------------------------


def run_flow(env: dict[str, str], monkeypatch: pytest.MonkeyPatch, workspace: Path, **kwargs: Any) -> Any:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from cifarflow.flows.pipeline import cifar10_pipeline

    for key in ("PREFECT_API_URL", "PREFECT_HOME", "PREFECT_SERVER_ANALYTICS_ENABLED"):
        monkeypatch.setenv(key, env[key])
    monkeypatch.setenv("PATH", env["PATH"])
    monkeypatch.setenv("PYTHONPATH", f"{workspace}{os.pathsep}{env['PYTHONPATH']}")
    with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}):
        return cifar10_pipeline(
            workspace=str(workspace), return_state=True, **{"archs": [ARCH], "profile": "smoke", "promote": False, **kwargs}
        )


FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def task_runs(env: dict[str, str], state: Any, *names: str, wait_s: float = 30.0) -> dict[str, dict[str, Any]]:
    """The flow run's task runs by name. Prefect 3 records task-run states from events that the
    server may persist after the flow has returned: wait (bounded) until `names` are there, final."""
    deadline = time.monotonic() + wait_s
    while True:
        found = api(env, "POST", "/task_runs/filter", task_runs={"flow_run_id": {"any_": [str(state.state_details.flow_run_id)]}})
        runs = {r["name"]: r for r in found}
        if all(n in runs and runs[n]["state"]["type"] in FINAL for n in names) or time.monotonic() > deadline:
            return runs
        time.sleep(0.2)


def retrain(workspace: Path) -> None:
    """Make train@lenet out of date (2 epochs), so that the flow really trains."""
    set_params(workspace, **{f"profiles.smoke.train.{ARCH}.epochs": 2})


def test_killed_training_is_retried_and_resumes_bit_identically(
    prefect_server: dict[str, str], workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    reference = tmp_path / "reference"
    shutil.copytree(workspace, reference, symlinks=True)
    retrain(workspace)
    retrain(reference)
    run_in(reference, "dvc", "repro", f"train@{ARCH}")  # the uninterrupted run
    monkeypatch.setenv("CIFARFLOW_FAULT_KILL_AT", "1:2")
    state = run_flow(prefect_server, monkeypatch, workspace)
    assert state.is_completed(), state.message
    assert task_runs(prefect_server, state, f"train@{ARCH}")[f"train@{ARCH}"]["run_count"] == 2
    info = json.loads((workspace / f"data/runinfo/train/{ARCH}/run.json").read_text())
    assert info["resumed_after_epoch"] >= 1
    digest = (workspace / f"data/models/{ARCH}/weights.sha256").read_text()
    assert digest == (reference / f"data/models/{ARCH}/weights.sha256").read_text()


def test_transient_failure_is_retried_once(
    prefect_server: dict[str, str], workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    retrain(workspace)
    monkeypatch.setenv("CIFARFLOW_FAULT_FAIL_AT", "0:1")
    state = run_flow(prefect_server, monkeypatch, workspace)
    assert state.is_completed(), state.message
    assert task_runs(prefect_server, state, f"train@{ARCH}")[f"train@{ARCH}"]["run_count"] == 2
    stages = state.result()["stages"]  # the new model made evaluate stale only after training ran
    assert not stages[f"train@{ARCH}"]["skipped"] and not stages[f"evaluate@{ARCH}"]["skipped"]

    monkeypatch.delenv("CIFARFLOW_FAULT_FAIL_AT")
    stages = run_flow(prefect_server, monkeypatch, workspace).result()["stages"]  # now up to date
    assert [name for name, s in stages.items() if not s["skipped"]] == ["resolve", "download"]  # always run
    assert all(s["seconds"] == 0.0 for name, s in stages.items() if name not in ("resolve", "download"))  # DVC not started


def test_config_error_is_not_retried(prefect_server: dict[str, str], workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    set_params(
        workspace, **{"profiles.smoke.data.source": str(workspace / "missing.tgz"), "profiles.smoke.data.allow_unverified": True}
    )  # valid params, bad input
    state = run_flow(prefect_server, monkeypatch, workspace)
    assert state.is_failed()
    runs = task_runs(prefect_server, state, "download")
    assert runs["download"]["run_count"] == 1 and runs["download"]["state"]["type"] == "FAILED"
    assert "missing.tgz" in runs["download"]["state"]["message"] and "no such file" in runs["download"]["state"]["message"]
    set_params(workspace, **{"data.val_szie": 3})  # invalid params: the check stops the flow first
    state = run_flow(prefect_server, monkeypatch, workspace)
    assert state.is_failed() and "val_szie" in state.message
    assert "download" not in task_runs(prefect_server, state)


def stage_processes(workspace: Path) -> list[str]:
    """Processes working in `workspace` (a DVC or a stage command), found by their cwd, so that
    other trainings on the machine do not count."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and Path(os.readlink(proc / "cwd")).is_relative_to(workspace):
                command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                found.append(f"{proc.name}: {command[:200]}")
        except OSError:  # gone meanwhile, or not ours to inspect
            continue
    return found


def process_state(pid: int) -> str | None:
    """The state letter of `pid` (R, S, Z...), or None when it no longer exists."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return None


def process_group(pgid: int) -> set[int]:
    found = set()
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and os.getpgid(int(proc.name)) == pgid:
                found.add(int(proc.name))
        except OSError:
            continue
    return found


def test_timeout_kills_the_stage_with_its_children(
    prefect_server: dict[str, str], workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stage past its timeout: its process group (DVC, the stage command, the command's children)
    is killed and reaped, the DVC lock is free, and the task run fails with the timeout as its reason."""
    import cifarflow.flows.pipeline
    import cifarflow.tasks.stages
    from cifarflow.executables import beside_python

    retrain(workspace)
    # `cifarflow train` that starts two children and never ends; every other command is the real one.
    fake = tmp_path / "bin"
    fake.mkdir()
    pids = tmp_path / "train.pids"
    (fake / "cifarflow").write_text(
        "#!/bin/sh\n"
        'if [ "$1" = train ]; then\n'
        f"  sleep 3600 & echo $! >> {pids}\n"
        f"  sleep 3600 & echo $! >> {pids}\n"
        f"  echo $$ >> {pids}\n"
        "  wait\n"
        "fi\n"
        f'exec {beside_python("cifarflow")} "$@"\n'
    )
    (fake / "cifarflow").chmod(0o755)

    killed: dict[str, set[int]] = {}
    real_kill_group = cifarflow.tasks.stages.kill_group

    def recording_kill_group(process: subprocess.Popen) -> None:
        killed["group"] = process_group(process.pid)  # DVC (the group leader) and everything it started
        killed["leader"] = {process.pid}
        real_kill_group(process)

    monkeypatch.setattr(cifarflow.tasks.stages, "kill_group", recording_kill_group)
    one_attempt = cifarflow.tasks.stages.train_stage.with_options(retries=0)
    monkeypatch.setitem(cifarflow.tasks.stages.KIND_TASKS, "train", one_attempt)
    env = prefect_server | {"PATH": f"{fake}{os.pathsep}{prefect_server['PATH']}"}
    # Long enough for the download stage (always run); train@lenet would never end without it.
    state = run_flow(env, monkeypatch, workspace, stage_timeout_s=30)

    assert state.is_failed(), state
    train = task_runs(prefect_server, state, f"train@{ARCH}")[f"train@{ARCH}"]
    assert train["state"]["type"] == "FAILED" and train["run_count"] == 1, train["state"]
    assert "StageTimeout" in train["state"]["message"] and "exceeded its timeout of 30 s" in train["state"]["message"]
    assert f"evaluate@{ARCH}" not in task_runs(prefect_server, state)

    children = {int(line) for line in pids.read_text().split()}  # the fake's shell and its two sleeps
    assert len(children) == 3 and killed["leader"] <= killed["group"] and children <= killed["group"], killed
    alive = {pid: process_state(pid) for pid in killed["group"] if process_state(pid) not in (None, "Z")}
    assert alive == {}, f"processes of the stage outlived its timeout: {alive}"
    assert stage_processes(workspace) == [], "a stage process outlived the timeout"
    done = run_in(workspace, "dvc", "status", "--json")  # DVC can take its repository lock again
    assert f"train@{ARCH}" in json.loads(done.stdout)


def test_each_stage_kind_is_one_task_with_options() -> None:
    """One task body; the kinds differ only in name, tags and retries; runs are named after the stage."""
    from cifarflow.tasks import stages

    kinds = {
        stages.data_stage: ("data-stage", set(), 2),
        stages.train_stage: ("train", {"gpu"}, 4),
        stages.evaluate_stage: ("evaluate", set(), 2),
        stages.export_stage: ("export", set(), 2),
        stages.report_stage: ("report", set(), 2),
    }
    for kind, (name, tags, retries) in kinds.items():
        assert kind.fn is stages.stage_task.fn
        assert (kind.name, set(kind.tags), kind.retries) == (name, tags, retries)
        assert kind.task_run_name == "{stage}" and kind.retry_condition_fn is stages.worth_retrying
        assert kind.retry_delay_seconds == [5 * 2**i for i in range(retries)]  # exponential backoff, 5 s base


def test_the_flow_reads_its_paths_from_dvc_yaml(tmp_path: Path) -> None:
    from cifarflow.flows.pipeline import declared, stage_outputs

    outputs = stage_outputs(REPO)
    assert declared(outputs, "export") == "data/export"
    assert declared(outputs, "report", "leaderboard.json") == "data/reports/leaderboard.json"
    assert declared(outputs, "report", "leaderboard.md") == "data/reports/leaderboard.md"
    with pytest.raises(LookupError, match="stage 'report' declares"):
        declared(outputs, "report", "missing.json")
    with pytest.raises(FileNotFoundError, match="dvc.yaml"):
        stage_outputs(tmp_path)
    source = (REPO / "cifarflow/flows/pipeline.py").read_text()
    assert "data/" not in source, "a stage path is written in cifarflow/flows/pipeline.py instead of dvc.yaml"
