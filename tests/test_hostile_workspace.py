"""The workspace after the quickstart and after a flow: params.yaml as the user wrote it, outputs
that say what they were trained on, and a nightly flow that cannot undo an operator's rollback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import REPO, learnable_image_folder, make, new_workspace, project_files, run_in, set_params
from test_prefect import ARCH, api, run_flow

from cifarflow import registry
from cifarflow.errors import ConfigError

pytestmark = pytest.mark.slow


def test_smoke_quickstart_leaves_params_yaml_byte_identical(smoke_workspace: Path) -> None:
    project = smoke_workspace.parent.parent  # the fixture ran `make pipeline PROFILE=smoke` there
    assert (project / "params.yaml").read_bytes() == (REPO / "params.yaml").read_bytes()
    assert not (project / "data" / "models").exists()  # the project's data/ untouched too
    log = (project / "make-pipeline-smoke.log").read_text()
    checks = [line for line in log.splitlines() if ": ok; profile" in line]
    archs = ", ".join(yaml.safe_load((project / "params.yaml").read_text())["archs"])
    assert checks == [f"params.yaml: ok; profile smoke trains {archs} in {smoke_workspace}"], checks  # once: what runs, where
    assert "outputs in runs/smoke/data/" in log
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
    assert f"ok; profile full trains simple_cnn, lenet, lenet_mixup, resnet56, densenet121, whitened_vgg in {project}" in str(
        failed.value
    )
    assert "absent.tgz" in str(failed.value)


def test_a_runs_selection_keeps_comments_and_layout_and_does_not_outlive_the_run(tmp_path: Path) -> None:
    from cifarflow.flows.pipeline import archs_for_this_run

    path = tmp_path / "params.yaml"
    shutil.copy2(REPO / "params.yaml", path)
    with archs_for_this_run(tmp_path, ["lenet", "simple_cnn"]) as changed:
        before, during = (REPO / "params.yaml").read_text().splitlines(), path.read_text().splitlines()
        assert changed and [(a, b) for a, b in zip(before, during, strict=True) if a != b] == [
            ("archs: [simple_cnn, lenet, lenet_mixup, resnet56, densenet121, whitened_vgg]", "archs: [lenet, simple_cnn]")
        ]
    assert path.read_bytes() == (REPO / "params.yaml").read_bytes()
    with pytest.raises(RuntimeError), archs_for_this_run(tmp_path, ["lenet"]):
        raise RuntimeError("the run failed")
    assert path.read_bytes() == (REPO / "params.yaml").read_bytes()  # written back on failure too
    with pytest.raises(ConfigError), archs_for_this_run(tmp_path, ["nosucharch"]):
        pass
    assert path.read_bytes() == (REPO / "params.yaml").read_bytes()  # validated before it is written


def test_refreshing_a_profiles_workspace_waits_for_no_flow_but_refuses_under_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`cifarflow workspace smoke` (make pipeline PROFILE=smoke) rewrites runs/smoke/params.yaml: not
    while a flow runs there, which restores that file when it ends."""
    from cifarflow.cli import main
    from cifarflow.workspace import RUNS, flow_lock

    project = new_workspace(tmp_path / "project")
    with flow_lock(project / RUNS / "smoke", "prefect flow run 1 (nightly)"):
        assert main(["--params", str(project / "params.yaml"), "workspace", "smoke"]) == 2
    assert "a flow is already running in this workspace: prefect flow run 1 (nightly)" in capsys.readouterr().err
    assert not (project / RUNS / "smoke" / "params.yaml").exists()  # nothing copied under the flow
    assert main(["--params", str(project / "params.yaml"), "workspace", "smoke"]) == 0


def test_a_workspace_snapshot_is_the_same_commit_wherever_and_whenever_it_is_made(tmp_path: Path) -> None:
    """The model card names the snapshot's commit: a copy of the same files made in another folder
    (another host, a container), later, or over an earlier snapshot, is the same commit."""
    from cifarflow.cli import main
    from cifarflow.workspace import RUNS

    heads = []
    for name in ("here", "there"):
        project = shutil.copytree(new_workspace(tmp_path / "project"), tmp_path / name, symlinks=True)
        shutil.rmtree(tmp_path / "project")
        for _ in range(2):  # the second refreshes the first
            assert main(["--params", str(project / "params.yaml"), "workspace", "smoke"]) == 0
            heads.append(run_in(project / RUNS / "smoke", "git", "rev-parse", "HEAD").stdout.strip())
    assert len(set(heads)) == 1, heads
    private = tmp_path / "there" / RUNS / "smoke"
    assert run_in(private, "git", "status", "--porcelain").stdout == ""  # the marker is not in it, nor untracked
    assert run_in(private, "git", "rev-list", "--count", "HEAD").stdout.strip() == "1"


def test_a_second_flow_on_the_same_workspace_is_refused_before_it_changes_anything(
    prefect_server: dict[str, str], workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cifarflow.workspace import flow_lock

    before = (workspace / "params.yaml").read_bytes()
    with flow_lock(workspace, "prefect flow run 1234 (the-first-run)"):
        state = run_flow(prefect_server, monkeypatch, workspace)
    assert state.is_failed(), state
    assert "a flow is already running in this workspace: prefect flow run 1234 (the-first-run)" in state.message
    assert (workspace / "params.yaml").read_bytes() == before


def test_a_flow_of_another_profile_runs_in_its_private_workspace(
    prefect_server: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`cifarflow flow run --profile smoke --archs lenet` in a project whose params.yaml selects full
    (as the README shows): the run works in runs/smoke/, as `make pipeline PROFILE=smoke` does; the
    project's params.yaml and data/ stay as they were, and so does the private copy's archs."""
    project = new_workspace(tmp_path / "project")
    before = (project / "params.yaml").read_bytes()
    state = run_flow(prefect_server, monkeypatch, project, profile="smoke", archs=[ARCH])
    assert state.is_completed(), state.message
    private = project / "runs" / "smoke"
    assert state.result()["workspace"] == str(private) and state.result()["archs"] == [ARCH]
    assert (project / "params.yaml").read_bytes() == before and not (project / "data" / "models").exists()
    assert (private / "data" / "export" / "model_card.json").is_file()
    assert yaml.safe_load((private / "params.yaml").read_text())["archs"] == yaml.safe_load(before)["archs"]
    card = json.loads((private / "data" / "export" / "model_card.json").read_text())
    assert card["provenance"]["project"]["commit"] == run_in(project, "git", "rev-parse", "HEAD").stdout.strip()
    assert card["provenance"]["snapshot"]["commit"] == run_in(private, "git", "rev-parse", "HEAD").stdout.strip()


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
    blessed, and the registry refuses to undo the rollback. Generated data is never blessed, so the
    workspace trains on the same images written as an image folder, a source of real data."""
    folder = learnable_image_folder(tmp_path / "images")
    changes = {"profiles.smoke.export.tolerance": 1.0, "profiles.smoke.data.source": str(folder), "profiles.smoke.data.md5": None}
    set_params(workspace, archs=[ARCH], **changes)
    reg = workspace / "champion"
    for epochs in (1, 2):  # two different models, each exported, blessed and promoted
        set_params(workspace, **{f"profiles.smoke.train.{ARCH}.epochs": epochs})
        run_in(workspace, "dvc", "repro", "export")
        run_in(workspace, "cifarflow", "promote")
    first = registry.history(reg)[0]["to"]
    card = json.loads((workspace / "data/export/model_card.json").read_text())
    assert card["verdict"]["blessed"] and card["data_source_kind"] == "image-folder"
    assert card["verdict"]["champion"]["version"] == first  # the verdict names the champion it was computed against
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
    assert "Profile `smoke`, data source: image-folder" in blessing and f"against champion {first}" in blessing


def test_the_flow_checks_params_before_anything_parses_them(
    prefect_server: dict[str, str], workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_hostile_params import bomb

    (workspace / "params.yaml").write_text(bomb())
    before = (workspace / "params.yaml").read_bytes()
    state = run_flow(prefect_server, monkeypatch, workspace)
    assert state.is_failed() and "YAML nodes" in state.message
    assert (workspace / "params.yaml").read_bytes() == before


def test_the_same_commit_gives_the_same_snapshot_commit_anywhere(tmp_path: Path) -> None:
    """The model card names the private workspace's snapshot commit: two copies of the same project
    commit, in other folders (another machine, a container), must give the same one."""
    from cifarflow.workspace import prepare

    first = new_workspace(tmp_path / "one" / "project")
    second = tmp_path / "elsewhere" / "clone"
    run_in(tmp_path, "git", "clone", "-q", str(first), str(second))
    snapshots = [run_in(prepare(p, "smoke"), "git", "rev-parse", "HEAD").stdout for p in (first, second)]
    assert snapshots[0] == snapshots[1]
