"""Unit tests of tasks/stages.py's failure classification: exit code and status file -> exception ->
retry or not. A stand-in `dvc` (a tiny shell script) plays the stage; no DVC, no Prefect server."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from cifarflow.errors import STATUS_ENV, ConfigError, InputError, OutOfMemoryError, SourceUnavailableError
from cifarflow.tasks import stages


@pytest.fixture
def fake_dvc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Install a stand-in dvc that prints `out`, writes `status` to the status file, exits `code`."""

    def install(code: int = 0, out: str = "", status: dict | None = None, sleep: float = 0) -> Path:
        (tmp_path / "bin").mkdir(exist_ok=True)
        script = tmp_path / "bin" / "dvc"
        status_line = f"printf '%s' '{json.dumps(status)}' > \"$CIFARFLOW_STATUS_FILE\"\n" if status is not None else ""
        (tmp_path / "out.txt").write_text(out)
        script.write_text(
            f"#!/bin/sh\ncat '{tmp_path / 'out.txt'}'\n{status_line}" + (f"sleep {sleep}\n" if sleep else "") + f"exit {code}\n"
        )
        script.chmod(0o755)
        monkeypatch.setattr(sys, "executable", str(tmp_path / "bin" / "python"))  # the dvc beside the interpreter
        return script

    return install


def test_only_config_and_input_failures_are_not_retried() -> None:
    def state(data: object) -> SimpleNamespace:
        return SimpleNamespace(data=data)

    assert stages.worth_retrying(None, None, state(stages.ConfigFailure("x"))) is False
    assert stages.worth_retrying(None, None, state(stages.OutOfMemory("x"))) is True
    assert stages.worth_retrying(None, None, state(stages.RuntimeFailure("x"))) is True
    assert stages.worth_retrying(None, None, state(stages.StageTimeout("x"))) is True
    assert stages.worth_retrying(None, None, state(None)) is True


@pytest.mark.parametrize(
    ("error", "exit_code", "expected", "retried"),
    [
        (ConfigError("bad key"), 2, "ConfigFailure", False),
        (InputError("bad archive"), 2, "ConfigFailure", False),
        (OutOfMemoryError("oom"), 3, "OutOfMemory", True),
        (SourceUnavailableError("no mirror"), 1, "RuntimeFailure", True),
        (RuntimeError("a bug"), 1, "RuntimeFailure", True),
    ],
)
def test_what_the_cli_writes_decides_the_failure_and_the_retry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: Exception, exit_code: int, expected: str, retried: bool
) -> None:
    """The CLI's status file, as `main` writes it for each class of error, through the task's reading
    of it (dvc exits 255 whatever failed): the right exception, and a retry only where one can help."""
    from cifarflow.cli import write_status

    path = tmp_path / "status.json"
    monkeypatch.setenv(STATUS_ENV, str(path))
    klass = getattr(error, "failure_class", "runtime")
    write_status(error, getattr(error, "exit_code", 1), klass)
    failure = stages.stage_failure(255, stages.read_status(path), "message")
    assert type(failure).__name__ == expected
    state = type("State", (), {"data": failure})()
    assert stages.worth_retrying(None, None, state) is retried
    without_status = "ConfigFailure" if exit_code == 2 else "RuntimeFailure"  # killed before it wrote: the exit code
    assert type(stages.stage_failure(exit_code, {}, "m")).__name__ == without_status


def test_an_up_to_date_stage_is_skipped_without_starting_dvc(fake_dvc, tmp_path: Path) -> None:
    script = fake_dvc(code=1)
    skipped = {"stage": "train@x", "seconds": 0.0, "skipped": True, "restored": False}
    assert stages.run_dvc_stage("train@x", tmp_path, up_to_date=True) == skipped
    script.unlink()


def test_a_successful_stage_reports_whether_dvc_skipped_it(fake_dvc, tmp_path: Path) -> None:
    fake_dvc(code=0, out="Stage 'train@x' didn't change, skipping\n")
    got = stages.run_dvc_stage("train@x", tmp_path)
    assert got["stage"] == "train@x" and got["skipped"] is True and 0 <= got["seconds"] < 30
    fake_dvc(code=0, out="Running stage 'train@x'\n")
    assert stages.run_dvc_stage("train@x", tmp_path)["skipped"] is False


@pytest.mark.parametrize(
    ("status", "error"),
    [
        ({"class": "config", "message": "bad key"}, stages.ConfigFailure),
        ({"class": "input", "message": "bad data"}, stages.ConfigFailure),
        ({"class": "oom", "message": "OOM"}, stages.OutOfMemory),
        ({"class": "runtime", "message": "boom"}, stages.RuntimeFailure),
        ({"class": "weird", "message": "?"}, stages.RuntimeFailure),
    ],
)
def test_a_failed_stage_raises_the_class_its_status_file_names(fake_dvc, tmp_path: Path, status: dict, error: type) -> None:
    fake_dvc(code=255, status=status)
    with pytest.raises(error) as caught:
        stages.run_dvc_stage("evaluate@x", tmp_path)
    assert type(caught.value) is error
    assert str(caught.value) == f"evaluate@x failed ({status['class']}): {status['message']}"


def test_without_a_status_file_the_output_tail_is_the_message(fake_dvc, tmp_path: Path) -> None:
    lines = "".join(f"line {i}\n" for i in range(30))
    fake_dvc(code=1, out=lines)
    with pytest.raises(stages.RuntimeFailure) as caught:
        stages.run_dvc_stage("report", tmp_path)
    assert type(caught.value) is stages.RuntimeFailure
    text = str(caught.value)
    assert text.startswith("report failed (runtime): line 10\nline 11") and text.endswith("line 29") and "line 9\n" not in text
    fake_dvc(code=2, out="usage error\n")
    with pytest.raises(stages.ConfigFailure, match=r"^report failed \(config\): usage error$"):
        stages.run_dvc_stage("report", tmp_path)
    fake_dvc(code=1, status={"class": "oom"}, out="tail text\n")
    with pytest.raises(stages.OutOfMemory, match=r"^report failed \(oom\): tail text$"):
        stages.run_dvc_stage("report", tmp_path)


def test_dvcs_stderr_is_the_failure_message_and_seconds_are_measured(fake_dvc, tmp_path: Path) -> None:
    script = fake_dvc(code=1)
    script.write_text("#!/bin/sh\necho 'ERROR: failed to reproduce train@x' >&2\nexit 1\n")
    with pytest.raises(stages.RuntimeFailure, match=r"^train@x failed \(runtime\): ERROR: failed to reproduce train@x$"):
        stages.run_dvc_stage("train@x", tmp_path)
    script.write_text("#!/bin/sh\nsleep 0.3\n")
    seconds = stages.run_dvc_stage("train@x", tmp_path)["seconds"]
    assert 0.3 <= seconds < 3 and seconds != round(seconds)  # measured, to the millisecond


def test_a_timed_out_stage_is_killed_with_its_children(fake_dvc, tmp_path: Path) -> None:
    """The real kill_group: dvc's own process group goes, a background grandchild (which also
    holds the output pipe open) included, and the timeout is not held up by it."""
    script = fake_dvc()
    script.write_text(f"#!/bin/sh\nsleep 120 &\necho $! > '{tmp_path / 'child.pid'}'\nsleep 30\n")  # it outlives dvc
    with pytest.raises(stages.StageTimeout):
        stages.run_dvc_stage("train@x", tmp_path, timeout_s=0.5)
    child = int((tmp_path / "child.pid").read_text())
    status = Path(f"/proc/{child}/status")
    state = status.read_text().split("State:")[1].split()[0] if status.exists() else "gone"
    assert state in ("gone", "Z"), f"the grandchild {child} survived the timeout: {state}"


def test_the_stage_runs_dvc_repro_single_item_in_the_workspace_with_extra_env(fake_dvc, tmp_path: Path) -> None:
    script = fake_dvc(code=0)
    script.write_text(
        '#!/bin/sh\necho "$* $PWD $EXTRA" > "$CIFARFLOW_STATUS_FILE.seen"\ncp "$CIFARFLOW_STATUS_FILE.seen" '
        + str(tmp_path / "seen")
        + "\n"
    )
    work = tmp_path / "ws"
    work.mkdir()
    stages.run_dvc_stage("download", str(work), extra_env={"EXTRA": "yes"})
    assert (tmp_path / "seen").read_text().split() == ["repro", "--single-item", "download", str(work), "yes"]


def test_a_stage_past_its_timeout_is_killed_and_raised(fake_dvc, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_dvc(code=0, sleep=30)
    killed = []
    monkeypatch.setattr(stages, "kill_group", lambda p: (killed.append(p.pid), p.kill(), p.wait()))
    with pytest.raises(stages.StageTimeout, match=r"^train@x: exceeded its timeout of 0.3 s; killed with all its children$"):
        stages.run_dvc_stage("train@x", tmp_path, timeout_s=0.3)
    assert len(killed) == 1


def test_params_check_exit_2_is_a_config_failure_with_the_clis_stderr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "bin").mkdir()
    cli = tmp_path / "bin" / "cifarflow"
    monkeypatch.setattr(sys, "executable", str(tmp_path / "bin" / "python"))  # the cifarflow beside the interpreter
    work = tmp_path / "ws"
    work.mkdir()

    def install(code: int) -> None:
        cli.write_text(f'#!/bin/sh\necho "$* in $PWD" > "{tmp_path}/seen"\necho out\necho "  the reason " >&2\nexit {code}\n')
        cli.chmod(0o755)

    install(0)
    stages.check_params(work)
    assert (tmp_path / "seen").read_text() == f"params --check in {work}\n"
    install(2)
    with pytest.raises(stages.ConfigFailure) as caught:
        stages.check_params(work)
    assert str(caught.value) == "the reason"
    for code in (1, 3, 255):
        install(code)
        with pytest.raises(stages.RuntimeFailure) as caught:
            stages.check_params(work)
        assert type(caught.value) is stages.RuntimeFailure and str(caught.value) == "the reason"


def test_a_status_file_that_is_not_an_object_is_ignored(fake_dvc, tmp_path: Path) -> None:
    fake_dvc(code=1, status=["config"], out="the output\n")
    with pytest.raises(stages.RuntimeFailure) as caught:
        stages.run_dvc_stage("report", tmp_path)
    assert type(caught.value) is stages.RuntimeFailure and str(caught.value) == "report failed (runtime): the output"
