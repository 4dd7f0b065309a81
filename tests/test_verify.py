"""The reproducibility check's judgements, on copies of the session's smoke workspace: identical
runs pass, a changed metric is named with its values, exclusions are listed, a stale committed
dvc.lock is caught. (`.ci/run` runs the whole `cifarflow verify-repro` on two fresh clones.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import run_in

from cifarflow import verify

pytestmark = pytest.mark.slow


def copy(workspace: Path, to: Path) -> Path:
    shutil.copytree(workspace, to, symlinks=True)
    return to


def test_identical_workspaces_pass_and_exclusions_are_listed(smoke_workspace: Path, tmp_path: Path) -> None:
    report = verify.Report()
    verify.compare(smoke_workspace, copy(smoke_workspace, tmp_path / "b"), report)
    assert report.problems == []
    assert report.compared > 20
    listed = [name for files in report.excluded.values() for name in files]
    assert any(name.startswith("data/runinfo/") for name in listed)
    assert any(name.startswith("data/export/saved_model/") for name in listed)
    assert not any(name.endswith("model.keras") for name in listed)  # byte-stable, so compared
    assert "excluded" in report.render() and "reproducible" in report.render()


def test_a_changed_metric_is_named_with_its_values(smoke_workspace: Path, tmp_path: Path) -> None:
    other = copy(smoke_workspace, tmp_path / "b")
    path = other / "data/eval/lenet/metrics.json"
    metrics = json.loads(path.read_text())
    before = metrics["test"]["accuracy"]
    metrics["test"]["accuracy"] = before + 0.01
    path.write_text(json.dumps(metrics))
    (other / "data/runinfo/download.json").write_text("{}")  # excluded: not a problem
    report = verify.Report()
    verify.compare(smoke_workspace, other, report)
    assert len(report.problems) == 1, report.problems
    assert "data/eval/lenet/metrics.json" in report.problems[0] and f"test.accuracy: {before}" in report.problems[0]
    assert "NOT REPRODUCIBLE" in report.render()


def test_a_stale_committed_lock_is_caught(smoke_workspace: Path, tmp_path: Path) -> None:
    work = copy(smoke_workspace, tmp_path / "work")
    git = ("git", "-c", "user.name=t", "-c", "user.email=t@t")
    run_in(work, *git, "add", "-f", "params.yaml", "dvc.lock")
    run_in(work, *git, "commit", "-qm", "results")
    run_in(tmp_path, "git", "clone", "-q", str(work), str(tmp_path / "fresh"))
    assert verify.committed_lock_problems(tmp_path / "fresh") == []  # a consistent lock, no data yet

    (work / "cifarflow/report.py").write_text((work / "cifarflow/report.py").read_text() + "\n# edited\n")
    run_in(work, *git, "commit", "-qam", "edit the report code, forget dvc repro")
    run_in(tmp_path, "git", "clone", "-q", str(work), str(tmp_path / "stale"))
    problems = verify.committed_lock_problems(tmp_path / "stale")
    assert problems == [  # resolve reads the whole package; report, the file of its settings and code
        "dvc.lock is stale for report: data/resolved/report.json (its settings or code) changed",
        "dvc.lock is stale for resolve: dep cifarflow modified",
    ], problems
