"""cifarflow.cluster's rules, each on its own: placement in a pool's terms, what a child is handed of
the parent's dvc.lock, what it checks before training, and the lock that keeps one training of the
same inputs at a time. No Prefect server, no DVC."""

from __future__ import annotations

import multiprocessing
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import resolve_raw

from cifarflow import cluster
from cifarflow.errors import ConfigError

GIT = ("git", "-c", "user.name=t", "-c", "user.email=t@t")


def repo(root: Path) -> Path:
    root.mkdir()
    (root / "params.yaml").write_text("seed: 1\n")
    (root / "code.py").write_text("x = 1\n")
    (root / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    for cmd in (("git", "init", "-q"), ("git", "add", "-A"), (*GIT, "commit", "-qm", "c")):
        subprocess.run(cmd, cwd=root, check=True)
    return root


@pytest.mark.parametrize(
    ("pool", "gpus", "job_variables", "queue"),
    [
        ("process", 1, {}, None),
        ("process", 0, {}, None),
        ("process", 4, {}, "gpus-4"),
        ("docker", 2, {"gpus": 2}, None),
        ("kubernetes", 8, {"gpus": 8}, None),
    ],
)
def test_a_child_is_placed_in_the_pools_own_terms(pool: str, gpus: int, job_variables: dict, queue: str | None) -> None:
    assert cluster.placement(pool, gpus) == {"job_variables": job_variables, "work_queue_name": queue}


def test_an_unknown_pool_type_is_a_config_error_naming_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match=r"type 'ecs'.*process, docker or kubernetes"):
        cluster.placement("ecs", 1)


def test_the_parent_must_be_a_commit_but_its_dvc_lock_may_differ(tmp_path: Path) -> None:
    root = repo(tmp_path / "r")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    (root / "dvc.lock").write_text("schema: '2.0'\nstages: {resolve: {}}\n")  # the parent's own runs
    (root / "untracked.txt").write_text("not the children's business")
    assert cluster.parent_identity(root) == {"commit": head, "params_sha256": cluster.params_sha256(root)}
    (root / "code.py").write_text("x = 2\n")
    with pytest.raises(ConfigError, match=r"code.py differ from the last commit: commit them"):
        cluster.parent_identity(root)


def test_a_child_refuses_another_commit_changed_files_or_other_params(tmp_path: Path) -> None:
    root = repo(tmp_path / "r")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    params = cluster.params_sha256(root)
    cluster.check_child_workspace(root, head, params)
    with pytest.raises(cluster.WorkspaceMismatch, match=rf"at commit {head[:12]}, the parent's is 0123456789ab"):
        cluster.check_child_workspace(root, "0123456789ab" + "0" * 28, params)
    with pytest.raises(cluster.WorkspaceMismatch, match=rf"params.yaml: sha256 {params[:12]}, the parent's is ffffffffffff"):
        cluster.check_child_workspace(root, head, "f" * 64)
    (root / "code.py").write_text("x = 2\n")
    with pytest.raises(cluster.WorkspaceMismatch, match=r"code.py differ from commit"):
        cluster.check_child_workspace(root, head, params)


LOCK = {
    "schema": "2.0",
    "stages": {
        "resolve": {"cmd": "cifarflow resolve", "params": {"params.yaml": {"data": {"source": "https://x/?sig=SECRET"}}}},
        "preprocess": {"cmd": "cifarflow preprocess", "outs": [{"path": "data/shards", "md5": "a.dir"}]},
        "validate": {"cmd": "cifarflow validate", "outs": [{"path": "data/validation/verdict.json", "md5": "b"}]},
    },
}


def test_a_child_is_handed_the_lock_entries_of_its_stages_and_never_params_values(tmp_path: Path) -> None:
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(LOCK))
    entries = cluster.lock_entries(tmp_path, ["preprocess", "validate"])
    assert entries == {k: LOCK["stages"][k] for k in ("preprocess", "validate")}
    with pytest.raises(ConfigError, match=r"stages \['resolve'\] record params values"):
        cluster.lock_entries(tmp_path, ["resolve", "validate"])  # a signed URL must not reach Prefect's database
    with pytest.raises(ConfigError, match=r"no entry for corrupt; run the data stages first"):
        cluster.lock_entries(tmp_path, ["corrupt"])

    child = tmp_path / "child"
    child.mkdir()
    cluster.install_lock_entries(child, entries)  # no dvc.lock yet
    assert yaml.safe_load((child / "dvc.lock").read_text()) == {"schema": "2.0", "stages": entries}
    (child / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {"mine": {"cmd": "x"}, "validate": {}}}))
    cluster.install_lock_entries(child, entries)  # its own entries kept, the handed ones replaced
    assert yaml.safe_load((child / "dvc.lock").read_text())["stages"] == {"mine": {"cmd": "x"}, **entries}


def test_a_trainings_key_is_the_bytes_of_what_it_depends_on(tmp_path: Path) -> None:
    a, b = tmp_path / "resolved.json", tmp_path / "verdict.json"
    a.write_text('{"recipe": 1}')
    b.write_text('{"manifest_sha256": "x"}')
    key = cluster.training_key("lenet", [a, b])
    assert key.startswith("train@lenet-") and key == cluster.training_key("lenet", [a, b])
    b.write_text('{"manifest_sha256": "y"}')
    assert cluster.training_key("lenet", [a, b]) != key and cluster.training_key("simple_cnn", [a, b]).startswith(
        "train@simple_cnn-"
    )


def hold(store: str, seconds: float, started: multiprocessing.synchronize.Event) -> None:
    with cluster.exclusive(Path(store), "train@lenet-k", "the first child"):
        started.set()
        time.sleep(seconds)


def test_a_second_child_of_the_same_training_waits_for_the_first(tmp_path: Path) -> None:
    """Across processes (a file lock, released by the kernel when its holder dies)."""
    started = multiprocessing.get_context("spawn").Event()
    first = multiprocessing.get_context("spawn").Process(target=hold, args=(str(tmp_path), 2.0, started))
    first.start()
    assert started.wait(60)
    begun = time.monotonic()
    with cluster.exclusive(tmp_path, "train@lenet-k", "the second child"):
        waited = time.monotonic() - begun
    first.join()
    assert waited > 1.0, "the second got in while the first held the lock"
    other = multiprocessing.get_context("spawn").Process(target=hold, args=(str(tmp_path), 60.0, started))
    started.clear()
    other.start()
    assert started.wait(60)
    other.kill()  # a lost node: its lock goes with it
    other.join()
    with cluster.exclusive(tmp_path, "train@lenet-k", "the retry"):
        pass


def test_cluster_settings_need_a_checkpoint_store_every_node_mounts() -> None:
    with pytest.raises(ConfigError, match=r"cluster: the fan-out needs runtime.checkpoint_store"):
        resolve_raw({"cluster": {}})
    with pytest.raises(ConfigError, match=r"checkpoint_store .* is a URL; give the absolute path"):
        resolve_raw({"runtime": {"checkpoint_store": "s3://bucket/ckpt"}})
    with pytest.raises(ConfigError, match=r"checkpoint_store 'ckpt' must be an absolute path"):
        resolve_raw({"runtime": {"checkpoint_store": "ckpt"}})
    params = resolve_raw({"cluster": {"attempts": 2}, "runtime": {"checkpoint_store": "/mnt/shared/ckpt"}})
    assert params.cluster.attempts == 2 and params.cluster.deployment == "train-architecture/gpu"


def test_where_the_checkpoints_live_does_not_decide_the_weights() -> None:
    """The store is not in train's resolved file: moving it reruns nothing, and a run resumes across stores."""
    from cifarflow import resolved

    here = resolve_raw({"archs": ["lenet"]})
    there = resolve_raw({"archs": ["lenet"], "runtime": {"checkpoint_store": "/mnt/nfs/ckpt"}})
    assert resolved.inputs(here, "train", "lenet") == resolved.inputs(there, "train", "lenet")
    more_gpus = resolve_raw({"archs": ["lenet"], "train": {"lenet": {"gpus": 4}}})
    assert resolved.inputs(more_gpus, "train", "lenet") != resolved.inputs(here, "train", "lenet")  # replicas change bits
