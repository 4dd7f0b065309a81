"""What a newcomer sees: the console shows the project's progress and real problems only, every
failure exits with the code the CLI's docstring gives and one line that says what to do, and the
small things a user reaches for (--version, make help, an empty registry's listing) answer plainly."""

from __future__ import annotations

import logging
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, cli_env, write_params
from test_cli import subcommands

from cifarflow import __version__, cli, console
from cifarflow.tasks.stages import DVC_HINTS


def record(name: str, level: int, message: str, **extra: str) -> logging.LogRecord:
    made = logging.LogRecord(name, level, __file__, 1, message, None, None)
    made.__dict__.update(extra)
    return made


def test_the_console_keeps_progress_and_problems_and_drops_library_chatter() -> None:
    keep, show = console.ConsoleFilter(), console.ConsoleFormatter()
    assert keep.filter(record("cifarflow.training.trainer", logging.INFO, "epoch 1/2"))
    assert keep.filter(record("prefect.task_runs", logging.INFO, "Finished in state Completed()"))
    assert not keep.filter(record("httpx", logging.INFO, 'HTTP Request: POST http://127.0.0.1/api/logs/ "HTTP/1.1 201"'))
    assert not keep.filter(record("prefect.client", logging.INFO, "Starting temporary server"))
    assert not keep.filter(record("cifarflow", logging.DEBUG, "details"))
    assert keep.filter(record("httpx", logging.WARNING, "retrying"))  # a problem, from wherever, is shown
    assert show.format(record("cifarflow.evaluate", logging.INFO, "scored")) == "scored"
    assert show.format(record("httpx", logging.WARNING, "retrying")) == "warning (httpx): retrying"
    assert show.format(record("cifarflow.data.download", logging.WARNING, "a mirror failed")) == "warning: a mirror failed"
    line = show.format(record("prefect.task_runs", logging.INFO, "train@lenet: epoch 1/2", task_run_name="train@lenet"))
    assert re.fullmatch(r"\d\d:\d\d:\d\d train@lenet: train@lenet: epoch 1/2", line), line


def test_dvcs_git_hints_go_to_the_debug_level() -> None:
    for hint in ("To track the changes with git, run:", "\tgit add dvc.lock", "To enable auto staging, run:",
                 "\tdvc config core.autostage true", "Use `dvc push` to send your updates to remote storage."):  # fmt: skip
        assert DVC_HINTS.match(hint), hint
    for line in ("Running stage 'train@lenet':", "> cifarflow train lenet", "train@lenet: epoch 1/2 loss 2.3"):
        assert not DVC_HINTS.match(line), line


def test_version_names_the_commit_and_whether_the_tree_is_dirty() -> None:
    done = subprocess.run([sys.executable, "-m", "cifarflow", "--version"], capture_output=True, text=True, env=cli_env())
    assert done.returncode == 0 and not done.stderr, done.stderr
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True)
    expected = f"cifarflow {__version__} (commit {head[:12]}{', uncommitted changes' if dirty.stdout.strip() else ''})"
    assert done.stdout == expected + "\n"


def test_every_subcommands_help_opens_with_its_one_line_description(capsys: pytest.CaptureFixture) -> None:
    for name, parser in subcommands(cli.build_parser()).items():
        with pytest.raises(SystemExit):
            cli.main([*name.split(), "--help"])
        paragraphs = capsys.readouterr().out.split("\n\n")
        assert parser.description and " ".join(paragraphs[1].split()) == parser.description, name


def test_make_help_lists_every_target_with_what_it_does() -> None:
    makefile = (REPO / "Makefile").read_text()
    targets = re.search(r"^\.PHONY: (.*)$", makefile, re.M).group(1).split()
    done = subprocess.run(["make", "-s", "-C", str(REPO), "help"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    described = dict(re.findall(r"^  make (\S+)\s+(.+)$", done.stdout, re.M))
    assert sorted(described) == sorted(targets) and all(described.values())
    plain = subprocess.run(["make", "-s", "-C", str(REPO)], capture_output=True, text=True)
    assert plain.stdout == done.stdout, "plain `make` shows the help, and changes nothing"


def test_params_check_refuses_a_checksum_on_an_image_folder_naming_the_file_it_read(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "photos" / "train").mkdir(parents=True)
    custom = tmp_path / "nightly.yaml"
    custom.write_text(yaml.safe_dump({"data": {"source": str(tmp_path / "photos"), "md5": "0" * 32}}))
    assert cli.main(["--params", str(custom), "params", "--check"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {custom}: data.source: ") and "md5" in err and len(err.splitlines()) == 1, err
    assert "params.yaml" not in err


def test_params_check_says_once_what_runs_and_where(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "nightly.yaml"
    shutil.copy2(REPO / "params.yaml", path)
    archs = ", ".join(yaml.safe_load(path.read_text())["archs"])
    assert cli.main(["--params", str(path), "params", "--check"]) == 0
    assert capsys.readouterr().out == f"{path}: ok; profile full trains {archs} in {tmp_path.resolve()}\n"


def test_predict_on_a_missing_path_prints_the_error_and_no_empty_table(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "no-such-photo.png"
    code = cli.main(["--params", str(write_params(tmp_path, {})), "predict", str(missing), "--model", str(tmp_path / "m")])
    out, err = capsys.readouterr()
    assert (code, out) == (1, "")
    assert err == f"error: {missing}: no such file or folder\n"


def test_listing_an_empty_registry_says_how_a_version_gets_there(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    params = write_params(tmp_path, {})
    assert cli.main(["--params", str(params), "promote", "--list", "--champion", str(tmp_path / "champion")]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"registry {tmp_path / 'champion'}: no version yet.") and "`cifarflow promote`" in out
    assert "|" not in out  # no empty table


def test_a_host_that_does_not_resolve_fails_that_mirror_at_once_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Offline: each mirror is asked once (no retries of a DNS failure, which cannot pass), each failure
    is one line naming its host, and the last line is the hint."""
    asked: list[str] = []

    def no_dns(host: str, *args: object, **kwargs: object) -> list:
        asked.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    sources = ["http://mirror-a.example/cifar-10-binary.tar.gz", "http://mirror-b.example/cifar-10-binary.tar.gz"]
    params = write_params(tmp_path, {"data": {"source": sources, "md5": "0" * 32, "retries": 5}})
    argv = ["--params", str(params), "download", "--out", str(tmp_path / "raw"), "--cache", str(tmp_path / "cache")]
    assert cli.main(argv) == 1
    assert asked == ["mirror-a.example", "mirror-b.example"]
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert lines[0].startswith(f"warning: source failed: {sources[0]}: cannot resolve the host mirror-a.example"), err
    assert lines[1].startswith("error: ") and "cannot resolve the host mirror-b.example" in err
    assert "`make pipeline PROFILE=smoke`" in lines[-1] and "NameResolutionError" not in err and len(err) < 1200, err


@pytest.mark.slow
def test_the_webhook_secret_is_checked_before_the_flow_starts(prefect_server: dict[str, str], tmp_path: Path) -> None:
    """A missing Secret block: exit 2 (bad configuration) with the one line the check writes, not a
    failed flow run's traceback, printed twice. (Against the session's server: Prefect's ephemeral
    one may not start within its 20 s on a loaded machine, which is not what this test is about.)"""
    shutil.copy2(REPO / "params.yaml", tmp_path / "params.yaml")
    done = subprocess.run(
        [sys.executable, "-m", "cifarflow", "flow", "run", "--workspace", str(tmp_path), "--webhook-secret", "no-such-block"],
        capture_output=True,
        text=True,
        env=prefect_server,
        cwd=tmp_path,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [line for line in errors if "the Secret block 'no-such-block'" in line] and len(errors) == 1, done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / ".cifarflow" / "flow.lock").exists()


def test_serve_takes_the_nightly_schedule_and_parameters_from_prefect_yaml(monkeypatch: pytest.MonkeyPatch) -> None:
    """One place for the schedule: `python -m cifarflow.flows.serve` serves what prefect.yaml deploys."""
    from cifarflow.flows import pipeline, serve

    served: dict = {}
    monkeypatch.setattr(pipeline.cifar10_pipeline, "serve", lambda **kwargs: served.update(kwargs))
    monkeypatch.chdir(REPO)
    serve.main()
    deployment = next(d for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"] if d["name"] == "nightly")
    assert [(s.cron, s.timezone) for s in served["schedules"]] == [(s["cron"], s["timezone"]) for s in deployment["schedules"]]
    assert served["parameters"] == deployment["parameters"] and served["name"] == "nightly-serve"


def test_a_log_line_that_cannot_be_written_never_prints_the_exception_it_interrupted(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture
) -> None:
    """logging's default, on a failed write, prints the record and the exception being handled to
    stderr: here a requests error quoting a signed URL. The console drops the record instead."""
    import io

    console.configure(verbose=False)
    closed = io.StringIO()
    closed.close()
    monkeypatch.setattr(sys, "stderr", closed)
    try:
        raise ConnectionError("Max retries exceeded with url: /a.tgz?X-Amz-Signature=SECRET")
    except ConnectionError:
        logging.getLogger("cifarflow.data.download").warning("source failed; trying the next mirror")
    monkeypatch.undo()
    assert "SECRET" not in "".join(capfd.readouterr())
