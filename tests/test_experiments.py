"""The documented sweep: queue experiments with `dvc exp run --queue -S ...`, run them with
`dvc queue start`, compare them in `dvc exp show`, and `dvc exp apply` the best one."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml
from conftest import run_in, set_params

pytestmark = pytest.mark.slow
RATES = (0.0005, 0.005)
KEY = "train.simple_cnn.optimizer.learning_rate"
METRICS = "data/eval/simple_cnn/metrics.json"


def wait_for_queue(workspace: Path, timeout_s: float = 600) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = run_in(workspace, "dvc", "queue", "status").stdout
        if not any(word in status for word in ("Queued", "Running")):
            return status
        time.sleep(3)
    run_in(workspace, "dvc", "queue", "kill", "--all", check=False)
    raise AssertionError(f"the queue did not finish in {timeout_s:.0f} s:\n{status}")


def experiments(workspace: Path) -> dict[str, dict]:
    """{experiment name: {"params": params.yaml values, "metrics": the eval metrics}} from `dvc exp show`."""
    shown = json.loads(run_in(workspace, "dvc", "exp", "show", "--json").stdout)
    found = {}
    for commit in shown:
        for exp in commit.get("experiments") or []:
            for revision in exp["revs"]:
                data = revision.get("data") or {}
                if revision.get("name") and data.get("metrics"):
                    found[revision["name"]] = {
                        "params": data["params"]["params.yaml"]["data"],
                        "metrics": data["metrics"][METRICS]["data"],
                    }
    return found


def test_queued_learning_rate_sweep(workspace: Path) -> None:
    set_params(workspace, archs=["simple_cnn"])  # one architecture keeps the sweep short
    run_in(workspace, "dvc", "repro")
    run_in(workspace, "git", "add", "params.yaml", "dvc.lock")  # the baseline the experiments start from
    run_in(workspace, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "baseline")

    for rate in RATES:
        run_in(workspace, "dvc", "exp", "run", "--queue", "-S", f"{KEY}={rate}")
    run_in(workspace, "dvc", "queue", "start")
    status = wait_for_queue(workspace)
    assert "Failed" not in status, status + run_in(workspace, "dvc", "queue", "logs", "--all", check=False).stdout

    found = experiments(workspace)
    rates = {name: e["params"]["train"]["simple_cnn"]["optimizer"]["learning_rate"] for name, e in found.items()}
    assert sorted(rates.values()) == list(RATES), found
    table = run_in(workspace, "dvc", "exp", "show", "--md").stdout
    assert all(name in table for name in found) and "val.accuracy" in table, table

    best = max(found, key=lambda name: found[name]["metrics"]["val"]["accuracy"])
    run_in(workspace, "dvc", "exp", "apply", best)
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    assert params["train"]["simple_cnn"]["optimizer"]["learning_rate"] == rates[best]
    applied = json.loads((workspace / METRICS).read_text())
    for split in ("val", "test"):  # `dvc exp show` keeps the scalar metrics (not the CI lists)
        assert applied[split]["accuracy"] == found[best]["metrics"][split]["accuracy"]
    assert "simple_cnn" not in run_in(workspace, "dvc", "status").stdout  # the applied results match its params
