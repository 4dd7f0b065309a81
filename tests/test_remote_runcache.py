"""Different architectures on different nodes, gathered through a DVC remote and its run-cache.

Each node clones the project, trains its architecture with `dvc repro --pull train@<arch>`
(which restores from the remote's run-cache what others already computed) and shares it with
`dvc push --run-cache`. (`dvc pull --run-cache` alone fetches the run-cache entries but, with no
dvc.lock yet, not the outputs they name, so nothing could be restored: found by this test.) A gathering
node then reproduces the whole pipeline: the trainings come out of the run-cache, only
evaluate/export/report run. A fresh clone after that gets every output with `dvc pull`.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import run_in, set_params, tree_files

pytestmark = pytest.mark.slow
ARCHS = ["simple_cnn", "lenet"]
RAN = re.compile(r"^Running stage '([^']+)'", re.M)
RESTORED = re.compile(r"^Stage '([^']+)' is cached - skipping run, checking out outputs", re.M)
GIT = ("git", "-c", "user.name=t", "-c", "user.email=t@t")


def clone(origin: Path, path: Path) -> Path:
    run_in(path.parent, "git", "clone", "-q", str(origin), str(path))
    return path


def stale(workspace: Path) -> dict:
    import json

    status = json.loads(run_in(workspace, "dvc", "status", "--json").stdout or "{}")
    return {stage: entries for stage, entries in status.items() if entries != ["always changed"]}


@pytest.fixture
def origin(smoke_workspace: Path, tmp_path: Path) -> Path:
    """A git origin of the project at the smoke profile, with a local-directory DVC remote in
    its committed .dvc/config, as a team would set it up."""
    bare = tmp_path / "origin.git"
    run_in(tmp_path, "git", "clone", "-q", "--bare", str(smoke_workspace), str(bare))
    setup = clone(bare, tmp_path / "setup")
    set_params(setup, profile="smoke", archs=ARCHS)
    run_in(setup, "dvc", "remote", "add", "-d", "store", str(tmp_path / "remote"))
    run_in(setup, *GIT, "commit", "-qam", "smoke profile, two archs, shared remote")
    run_in(setup, "git", "push", "-q", "origin", "HEAD")
    return bare


def test_nodes_share_trainings_through_the_run_cache(origin: Path, tmp_path: Path) -> None:
    nodes = {}
    for arch in ARCHS:  # one node per architecture, one after the other (they share nothing but the remote)
        node = nodes[arch] = clone(origin, tmp_path / f"node-{arch}")
        out = run_in(node, "dvc", "repro", "--pull", f"train@{arch}").stdout
        assert f"train@{arch}" in RAN.findall(out)
        run_in(node, "dvc", "push", "--run-cache")
    # the second node restored the data stages the first one computed, instead of running them
    assert {"preprocess"} <= set(RESTORED.findall(out)), out

    gather = clone(origin, tmp_path / "gather")
    out = run_in(gather, "dvc", "repro", "--pull").stdout
    ran, restored = set(RAN.findall(out)), set(RESTORED.findall(out))
    assert not {s for s in ran if s.startswith("train@")}, f"the gathering node retrained: {sorted(ran)}\n{out}"
    assert {f"train@{arch}" for arch in ARCHS} <= restored, out
    assert not (gather / "data/runinfo/train").exists()  # no training process ever started here
    assert {"export", "report", *(f"evaluate@{arch}" for arch in ARCHS)} <= ran, out
    assert (gather / "data/export/model_card.json").is_file()
    for arch in ARCHS:  # the very weights the nodes trained
        assert (gather / f"data/models/{arch}/weights.sha256").read_text() == (
            nodes[arch] / f"data/models/{arch}/weights.sha256"
        ).read_text()
    assert stale(gather) == {}
    run_in(gather, "dvc", "push")
    run_in(gather, *GIT, "add", "dvc.lock")
    run_in(gather, *GIT, "commit", "-qm", "gathered results")
    run_in(gather, "git", "push", "-q", "origin", "HEAD")

    fresh = clone(origin, tmp_path / "fresh")
    run_in(fresh, "dvc", "pull")
    assert stale(fresh) == {}
    outputs = {k: v for k, v in tree_files(gather / "data").items() if not k.startswith(("runinfo/", "downloads/"))}
    assert {k: v for k, v in tree_files(fresh / "data").items() if k in outputs} == outputs
    assert not (fresh / "data/runinfo").exists()  # restored, nothing rerun
