"""The workspace after the quickstart and after a flow: params.yaml as the user wrote it, outputs
that say what they were trained on, and a nightly flow that cannot undo an operator's rollback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import REPO, make, project_files, run_in, set_params
from test_prefect import ARCH, api, run_flow

from cifarflow import registry

pytestmark = pytest.mark.slow


def test_smoke_quickstart_leaves_params_yaml_byte_identical(smoke_workspace: Path) -> None:
    project = smoke_workspace.parent.parent  # the fixture ran `make pipeline PROFILE=smoke` there
    assert (project / "params.yaml").read_bytes() == (REPO / "params.yaml").read_bytes()
    assert not (project / "data" / "models").exists()  # the project's data/ untouched too
    log = (project / "make-pipeline-smoke.log").read_text()
    assert "ok (profile full)" in log and "ok (profile smoke)" in log and "outputs in runs/smoke/data/" in log
    assert (smoke_workspace / "data" / "reports" / "leaderboard.md").is_file()  # the user can look at them
    status = json.loads(run_in(project, "git", "status", "--porcelain", "--untracked-files=no").stdout or "{}")
    assert status == {}  # nothing tracked changed


def test_plain_make_pipeline_runs_what_params_yaml_says(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    for rel in project_files():
        (project / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, project / rel)
    run_in(project, "git", "init", "-q")
    set_params(project, **{"data.source": str(project / "absent.tgz")})  # fails fast at download, after the check
    with pytest.raises(AssertionError) as failed:
        make(project, "pipeline")
    assert "ok (profile full)" in str(failed.value) and "absent.tgz" in str(failed.value)


def test_flow_selection_keeps_comments_and_layout(tmp_path: Path) -> None:
    from flows.pipeline import select

    path = tmp_path / "params.yaml"
    shutil.copy2(REPO / "params.yaml", path)
    assert select(tmp_path, ["lenet", "simple_cnn"], "smoke") == ["lenet", "simple_cnn"]
    before, after = (REPO / "params.yaml").read_text().splitlines(), path.read_text().splitlines()
    changed = [(a, b) for a, b in zip(before, after, strict=True) if a != b]
    assert changed == [
        ("profile: full", "profile: smoke"),
        ("archs: [simple_cnn, lenet, lenet_mixup, resnet56, densenet121, whitened_vgg]", "archs: [lenet, simple_cnn]"),
    ]
    assert select(tmp_path, None, None) == ["lenet", "simple_cnn"]


def test_outputs_state_profile_and_synthetic_data_and_refuse_promotion(workspace: Path) -> None:
    card = json.loads((workspace / "data/export/model_card.json").read_text())
    assert (card["profile"], card["data_source_kind"]) == ("smoke", "synth")
    assert "**synthetic**" in (workspace / "data/export/MODEL_CARD.md").read_text()
    assert "**synthetic**" in (workspace / "data/reports/leaderboard.md").read_text()
    assert json.loads((workspace / "data/reports/leaderboard.json").read_text())["data_source_kind"] == "synth"
    refused = run_in(workspace, "cifarflow", "promote", check=False)
    assert refused.returncode == 2 and "synthetic data" in refused.stderr and "Traceback" not in refused.stderr
    assert registry.current(workspace / "champion") is None
    forced = run_in(workspace, "cifarflow", "promote", "--force")
    assert "FORCED" in forced.stdout and registry.history(workspace / "champion")[-1]["verdict"]["forced"]


def test_rollback_then_nightly_flow_does_not_repromote(
    prefect_server: dict[str, str], workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two promoted models, an operator's rollback: the next flow run finds its export up to date and
    blessed, and the registry refuses to undo the rollback (the smoke data is synthetic, so the two
    promotions are forced; the refusal must name the rollback, not only the data)."""
    set_params(workspace, archs=[ARCH], **{"profiles.smoke.export.tolerance": 1.0})
    reg = workspace / "champion"
    for epochs in (1, 2):  # two different models, each exported, blessed and promoted
        set_params(workspace, **{f"profiles.smoke.train.{ARCH}.epochs": epochs})
        run_in(workspace, "dvc", "repro", "export")
        run_in(workspace, "cifarflow", "promote", "--force")
    first = registry.history(reg)[0]["to"]
    card = json.loads((workspace / "data/export/model_card.json").read_text())
    assert card["champion"]["version"] == first  # the verdict names the champion it was computed against
    run_in(workspace, "cifarflow", "promote", "--rollback")
    assert registry.current(reg).name == first

    state = run_flow(prefect_server, monkeypatch, workspace, promote=True)
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary["blessed"] and not summary["promoted"], summary
    assert "rolled back from version" in summary["promotion"]["message"]
    assert registry.current(reg).name == first and [e["kind"] for e in registry.history(reg)] == [
        "promote",
        "promote",
        "rollback",
    ]
    artifacts = api(
        prefect_server, "POST", "/artifacts/filter", artifacts={"flow_run_id": {"any_": [str(state.state_details.flow_run_id)]}}
    )
    blessing = next(a for a in artifacts if a["key"] == "blessing")["data"]
    assert "Profile `smoke`, data source: synth" in blessing and f"against champion {first}" in blessing


def test_the_flow_checks_params_before_anything_parses_them(
    prefect_server: dict[str, str], workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_hostile_params import bomb

    (workspace / "params.yaml").write_text(bomb())
    before = (workspace / "params.yaml").read_bytes()
    state = run_flow(prefect_server, monkeypatch, workspace)
    assert state.is_failed() and "YAML nodes" in state.message
    assert (workspace / "params.yaml").read_bytes() == before
