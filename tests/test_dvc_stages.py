"""The data stages run for real under DVC: repro, no-op second repro, clean status, reruns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REPO, run_in, set_params, sha256

from cifarflow.contract import read_metrics
from cifarflow.data.synth import write_synth_archive
from cifarflow.settings import load_params

pytestmark = pytest.mark.slow
# download rehashes its source every run; resolve rewrites what each stage reads (about a second)
ALWAYS = {"download": ["always changed"], "resolve": ["always changed"]}
ARCHS = tuple(load_params(REPO / "params.yaml").archs)  # what the DAG trains: train@, evaluate@ each
TRAIN = [f"train@{arch}" for arch in ARCHS]


def status(ws: Path) -> dict:
    return json.loads(run_in(ws, "dvc", "status", "--json").stdout or "{}")


def ran(output: str) -> list[str]:
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")]


def test_smoke_pipeline_outputs(smoke_workspace: Path) -> None:
    manifest = json.loads((smoke_workspace / "data/shards/manifest.json").read_text())
    assert manifest["counts"] == {"train": 1800, "val": 200, "test": 500}
    metrics = json.loads((smoke_workspace / "data/validation/metrics.json").read_text())
    assert metrics["leakage"]["total"] == 0
    assert status(smoke_workspace) == ALWAYS


def test_smoke_models_learn_without_saturating(smoke_workspace: Path) -> None:
    """The smoke profile is a real comparison: every model learns the generated task (val ≥ 30%,
    chance is 10%) without saturating (≤ 90%), and the best and the worst differ by more than their
    95% intervals, so selection and McNemar see a real difference."""
    val = {arch: read_metrics(smoke_workspace / "data/eval", arch)["val"] for arch in ARCHS}
    assert all(0.30 <= v["accuracy"] <= 0.90 for v in val.values()), {a: v["accuracy"] for a, v in val.items()}
    best, worst = max(val.values(), key=lambda v: v["accuracy"]), min(val.values(), key=lambda v: v["accuracy"])
    assert worst["ci95_high"] < best["ci95_low"], val


def test_second_repro_does_nothing(workspace: Path) -> None:
    done = run_in(workspace, "dvc", "repro")
    assert sorted(ran(done.stdout)) == ["download", "resolve"]
    assert "Stage 'preprocess' didn't change, skipping" in done.stdout
    assert status(workspace) == ALWAYS
    assert run_in(workspace, "git", "status", "--porcelain", "data").stdout == ""


def changed(ws: Path) -> set[str]:
    """Stages `dvc status` reports as changed, apart from the always-run download and resolve, once the
    cheap `resolve` stage has written what each stage reads."""
    run_in(ws, "dvc", "repro", "resolve")
    return set(status(ws)) - set(ALWAYS)


def edit_source(ws: Path, rel: str, old: str, new: str) -> None:
    path = ws / rel
    text = path.read_text()
    assert text.count(old) == 1, (rel, old)
    path.write_text(text.replace(old, new))


def test_a_changed_default_reruns_exactly_the_stages_that_read_it(workspace: Path) -> None:
    """Defaults in cifarflow/settings.py decide outputs as params.yaml does: a changed default makes
    stale exactly the stages that read it (lookahead's ramp: whitened_vgg's training only; the
    inference batch: every evaluation; McNemar's significance: export), once params.yaml leaves them
    to the default, and a reworded message in the same file makes nothing stale after `resolve`.
    (`dvc status` is what `dvc repro` acts on; test_param_change_reruns_only_what_reads_it runs one.)"""
    edit_source(workspace, "cifarflow/settings.py", '"give at least one source"', '"data.source lists no source"')
    assert changed(workspace) == set(), "a reworded message decides no output"
    lines = (workspace / "params.yaml").read_text().splitlines(keepends=True)
    kept = [line for line in lines if not line.startswith(("  batch_size: 500\n", "  significance: 0.05 "))]
    assert len(kept) == len(lines) - 2  # evaluate's batch and export's significance, now their defaults
    (workspace / "params.yaml").write_text("".join(kept))
    assert changed(workspace) == set(), "the defaults are the values they had: nothing changed"
    edit_source(workspace, "cifarflow/settings.py", "ramp: float = Field(3.0, ge=0", "ramp: float = Field(2.5, ge=0")
    edit_source(
        workspace,
        "cifarflow/settings.py",
        'batch_size: int = Field(500, ge=1, le=MAX_BATCH, description="inference batch")',
        'batch_size: int = Field(250, ge=1, le=MAX_BATCH, description="inference batch")',
    )
    edit_source(workspace, "cifarflow/settings.py", "significance: float = Field(0.05,", "significance: float = Field(0.1,")
    assert changed(workspace) == {"train@whitened_vgg", *(f"evaluate@{a}" for a in ARCHS), "export"}


def test_local_archive_source_and_editing_it(workspace: Path) -> None:
    archive = workspace / "local.tgz"
    write_synth_archive(archive, 300, 100, seed=1)
    set_params(
        workspace,
        **{
            "profiles.smoke.data.source": str(archive),
            "profiles.smoke.data.sha256": None,
            "profiles.smoke.data.allow_unverified": True,
            "profiles.smoke.data.val_size": 50,
        },
    )
    # the new params rerun `resolve`, whose preprocess file changed (val_size): preprocess reruns for it too
    assert set(ran(run_in(workspace, "dvc", "repro", "validate").stdout)) == {"resolve", "download", "preprocess", "validate"}
    assert set(ran(run_in(workspace, "dvc", "repro", "validate").stdout)) == set(ALWAYS)
    before = json.loads((workspace / "data/shards/manifest.json").read_text())
    write_synth_archive(archive, 300, 100, seed=2)  # same path, new content
    assert set(ran(run_in(workspace, "dvc", "repro", "validate").stdout)) == {*ALWAYS, "preprocess", "validate"}
    after = json.loads((workspace / "data/shards/manifest.json").read_text())
    assert after["source"]["content"]["sha256"] == sha256(archive.read_bytes()) and after != before
    assert set(json.loads(run_in(workspace, "dvc", "status", "validate", "--json").stdout)) <= set(ALWAYS)


def test_param_change_reruns_only_what_reads_it(workspace: Path) -> None:
    set_params(workspace, **{"data.fail_on_leakage": True})
    assert changed(workspace) == {"validate"}
    set_params(workspace, **{"data.fail_on_leakage": False, "profiles.smoke.train.simple_cnn.epochs": 3})
    assert changed(workspace) == {"train@simple_cnn"}
    set_params(workspace, **{"profiles.smoke.train.lenet.optimizer.learning_rate": 0.002})  # (the base's is overlaid)
    assert changed(workspace) == {"train@simple_cnn", "train@lenet"}
    assert set(ran(run_in(workspace, "dvc", "repro", "train@lenet").stdout)) == {*ALWAYS, "train@lenet"}
    set_params(workspace, **{"evaluate.tta": True})
    # (export and report read data/models, which the retrained lenet changed)
    assert changed(workspace) == {"train@simple_cnn", "export", "report", *(f"evaluate@{a}" for a in ARCHS)}
    set_params(workspace, **{"profiles.smoke.data.shards": 3})
    assert "preprocess" in changed(workspace)


def test_editing_code_reruns_only_the_stages_that_import_it(workspace: Path) -> None:
    def edit(rel: str) -> None:
        path = workspace / rel
        path.write_text(path.read_text() + "\n# an edit\n")

    edit("cifarflow/data/validate.py")
    assert changed(workspace) == {"validate"}
    edit("cifarflow/evaluate.py")  # evaluation code retrains nothing
    assert changed(workspace) == {"validate", "export", *(f"evaluate@{a}" for a in ARCHS)}
    edit("cifarflow/models/lenet.py")
    assert {s for s in changed(workspace) if s.startswith("train@")} == set(TRAIN)
    assert set(ran(run_in(workspace, "dvc", "repro", "validate").stdout)) == {*ALWAYS, "validate"}


def test_smoke_trains_every_architecture(smoke_workspace: Path) -> None:
    params = load_params(smoke_workspace / "params.yaml")
    assert params.profile == "smoke"
    for stage in TRAIN:
        arch = stage.split("@")[1]
        summary = json.loads((smoke_workspace / f"data/models/{arch}/summary.json").read_text())
        assert summary["variant"] == "tiny" and summary["epochs"] == params.recipe(arch).epochs
        digest = (smoke_workspace / f"data/models/{arch}/weights.sha256").read_text().strip()
        assert digest == summary["weights_sha256"]


def test_bad_config_fails_the_stage_with_its_message(workspace: Path) -> None:
    set_params(workspace, **{"profiles.smoke.data.val_szie": 3})
    done = run_in(workspace, "dvc", "repro", check=False)
    assert done.returncode != 0
    assert "unknown key 'profiles.smoke.data.val_szie'" in done.stderr + done.stdout
