"""The fan-out across two real hosts (tests/fanout_rig.py: a Prefect server, a git remote, a shared
folder as DVC remote and checkpoint store, two hosts in network namespaces or on loopback, one
process worker each). The parent trains two architectures as children, one on each host; one host
is killed (every process of it, at once) after the first epoch of its training, whose retry on the
other host resumes from the shared checkpoint store and ends bit-identical; the parent gathers
without training and exports what one machine exports, and a fresh clone pulls all of it. Then two
parents of one commit at once train nothing twice; then, with no worker left, a child nobody takes
fails the run. These are the README's by-hand run-cache commands ("Several nodes"), run by workers."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests
from conftest import REPO, run_in, set_params, tree_files
from fanout_rig import POOL, Rig, fanout_rig, wait_for

from cifarflow import verify
from cifarflow.executables import beside_python

pytestmark = pytest.mark.slow

ARCHS = ["lenet", "simple_cnn"]
KILLED = "simple_cnn"  # two epochs in the smoke profile: its host dies after the first
RUN_TIMEOUT_S = 1200
TRAINED, RESTORED = "trained on", "restored from the run-cache on"  # a child's last log line says which


def finish(running, log: Path) -> dict:
    out, _ = running.communicate(timeout=RUN_TIMEOUT_S)
    assert running.returncode == 0, log.read_text()[-5000:]
    return json.loads(out)


def outcomes(rig: Rig, arch: str) -> list[str]:
    """What each child run of `arch` says it did (TRAINED or RESTORED), in order of creation."""
    said = []
    for run in rig.child_runs(arch):
        messages = [e["message"] for e in rig.logs(run["id"])]
        said += [kind for m in messages for kind in (TRAINED, RESTORED) if m.startswith(f"train@{arch}: {kind}")]
    return said


CARD, CARD_MD = "data/export/model_card.json", "data/export/MODEL_CARD.md"  # they name the commit


def same_outputs(mine: Path, theirs: Path, same_commit: bool) -> list[str]:
    """The outputs verify-repro compares under data/export/ and data/reports/ that differ ([] if none).
    Of two commits, the card is compared without the provenance that names the commit."""

    def content(workspace: Path, name: str) -> object:
        if same_commit or name not in (CARD, CARD_MD):
            return (workspace / name).read_bytes()
        if name == CARD:
            return {k: v for k, v in json.loads((workspace / name).read_text()).items() if k != "provenance"}
        return [line for line in (workspace / name).read_text().splitlines() if not line.startswith("- project ")]

    compared = [n for n in verify.snapshot(theirs) if n.startswith(("data/export/", "data/reports/")) and not verify.exclusion(n)]
    assert CARD in compared and CARD_MD in compared
    return [n for n in compared if content(mine, n) != content(theirs, n)]


def test_fan_out_over_two_hosts_survives_a_lost_node(smoke_workspace: Path, tmp_path: Path) -> None:
    cluster = {"pickup_timeout_s": 300, "lost_after_s": 30, "poll_s": 1}
    with fanout_rig(tmp_path, ARCHS, cluster) as rig:
        print(f"hosts: {rig.hosts.mode} ({', '.join(f'{h.name} {h.address}' for h in rig.hosts.hosts)})")
        running = rig.flow_run(rig.parent, tmp_path / "parent.log")

        # A power cut on the host that trains KILLED, once its first epoch is committed to the store.
        def first_epoch() -> Path | None:
            if running.poll() is not None:  # the parent ended before the kill: say why at once
                raise AssertionError(f"the parent ended first:\n{(tmp_path / 'parent.log').read_text()[-5000:]}")
            return next(rig.shared.glob(f"checkpoints/{KILLED}-*/state.json"), None)

        state = wait_for(f"{KILLED}'s first epoch in the checkpoint store", first_epoch, RUN_TIMEOUT_S)
        assert json.loads(state.read_text())["state"]["epoch"] == 1
        [first] = rig.child_runs(KILLED)
        victim = rig.host_of(first["labels"]["prefect.worker.name"])
        killed_at = time.monotonic()
        assert victim.kill(), "nothing was running on the host that trained it"
        summary = finish(running, tmp_path / "parent.log")
        print(f"lost node noticed and the training done again within {time.monotonic() - killed_at:.0f} s")

        # One child on each host; the killed one's retry on the other, resumed after its first epoch.
        fanned = summary["cluster"]
        survivor = next(h for h in rig.hosts.hosts if h is not victim)
        assert fanned[KILLED]["attempts"] == 2
        assert [rig.host_of(w) for w in fanned[KILLED]["workers"]] == [victim, survivor]
        other = next(a for a in ARCHS if a != KILLED)
        assert fanned[other]["attempts"] == 1 and rig.host_of(fanned[other]["workers"][0]) is survivor
        retry = rig.child_runs(KILLED)[-1]
        messages = [e["message"] for e in rig.logs(retry["id"])]
        assert any(f"train@{KILLED}: resuming after epoch 1 of 2" in m for m in messages), messages
        assert outcomes(rig, other) == [TRAINED] and outcomes(rig, KILLED) == [TRAINED]  # the killed run said nothing

        assert not (rig.parent / "data/runinfo/train").exists()  # no training process ever started there

        # Anyone afterwards, with the parent's dvc.lock pushed: `dvc pull` gets every output, nothing stale.
        run_in(rig.parent, "dvc", "push")
        fresh = rig.clone("fresh")
        shutil.copy2(rig.parent / "dvc.lock", fresh / "dvc.lock")
        run_in(fresh, "dvc", "pull")
        status = json.loads(run_in(fresh, "dvc", "status", "--json").stdout or "{}")
        assert {stage: e for stage, e in status.items() if e != ["always changed"]} == {}, status
        outputs = {k: v for k, v in tree_files(rig.parent / "data").items() if not k.startswith(("runinfo/", "downloads/"))}
        assert {k: v for k, v in tree_files(fresh / "data").items() if k in outputs} == outputs

        # The same bytes as one machine: every training's weights, and the export and reports.
        for arch in ARCHS:
            digest = (rig.parent / f"data/models/{arch}/weights.sha256").read_text()
            assert digest == (smoke_workspace / f"data/models/{arch}/weights.sha256").read_text(), arch
        reference = tmp_path / "one-machine"
        shutil.copytree(smoke_workspace, reference, symlinks=True)
        set_params(reference, archs=ARCHS)
        run_in(reference, "dvc", "repro")
        assert same_outputs(rig.parent, reference, same_commit=False) == []
        provenance = json.loads((rig.parent / CARD).read_text())["provenance"]
        head = run_in(rig.parent, "git", "rev-parse", "HEAD").stdout.strip()
        assert provenance == {"project": {"commit": head, "dirty": False}, "snapshot": None}  # the commit it ran

        # Two parents of one commit at once (the second a copy of the first's clone, its data stages
        # done), with a worker on each host again: only lenet, changed, is stale, so only lenet is fanned
        # out, by each parent; it is trained once, by one child, the other child waiting for the
        # training's lock and then restoring it from the run-cache. Both runs end with the same export.
        rig.start_worker(victim)
        rig.commit("lenet for two epochs", **{"profiles.smoke.train.lenet.epochs": 2})
        second = tmp_path / "parent-2"
        shutil.copytree(rig.parent, second, symlinks=True)
        runs = [(rig.flow_run(ws, tmp_path / f"{ws.name}.log"), ws) for ws in (rig.parent, second)]
        summaries = [finish(running, tmp_path / f"{ws.name}.log") for running, ws in runs]
        assert [sorted(s["cluster"]) for s in summaries] == [["lenet"], ["lenet"]]  # simple_cnn: up to date
        assert sorted(outcomes(rig, "lenet")) == [RESTORED, TRAINED, TRAINED]  # the first run's, then one of two
        assert outcomes(rig, KILLED) == [TRAINED]
        assert same_outputs(rig.parent, second, same_commit=True) == []

        # No worker left: a child nobody takes fails the run in bounded time, naming pool and arch.
        for host in rig.hosts.hosts:
            host.kill()
        rig.commit(
            "a short pickup timeout, lenet stale", **{"cluster.pickup_timeout_s": 10, "profiles.smoke.train.lenet.epochs": 3}
        )
        stuck = rig.flow_run(rig.parent, tmp_path / "stuck.log")
        stuck.communicate(timeout=RUN_TIMEOUT_S)
        message = (tmp_path / "stuck.log").read_text()
        assert stuck.returncode != 0 and f"no worker of work pool '{POOL}' picked up" in message, message[-3000:]
        assert "cluster.pickup_timeout_s=10 s" in message and "every child was cancelled" in message


@pytest.mark.parametrize("kind", ["docker", "kubernetes"])
def test_the_gpu_job_templates_ask_for_the_recipes_gpus(kind: str, prefect_server: dict[str, str], tmp_path: Path) -> None:
    """deploy/<kind>-gpu.json, as a real server stores it for a pool, rendered for a child placed with
    `placement(kind, 2)`: a device request for 2 GPUs (Docker), an nvidia.com/gpu limit of 2 (Kubernetes).
    (Neither runs here: no Docker daemon with GPUs, no Kubernetes.)"""
    from prefect.utilities.templating import apply_values

    from cifarflow.cluster import placement

    pool = f"gpu-{kind}-{tmp_path.name[-6:]}"
    template = REPO / "deploy" / f"{kind}-gpu.json"
    subprocess.run(
        [beside_python("prefect"), "work-pool", "create", pool, "--type", kind, "--base-job-template", str(template)],
        env=prefect_server,
        check=True,
        capture_output=True,
    )
    stored = requests.get(f"{prefect_server['PREFECT_API_URL']}/work_pools/{pool}", timeout=30).json()["base_job_template"]
    assert stored == json.loads(template.read_text())
    defaults = {name: spec.get("default") for name, spec in stored["variables"]["properties"].items()}
    job = apply_values(stored["job_configuration"], defaults | placement(kind, 2)["job_variables"])
    if kind == "docker":
        assert job["container_create_kwargs"]["device_requests"] == [{"driver": "nvidia", "count": 2, "capabilities": [["gpu"]]}]
    else:
        [container] = job["job_manifest"]["spec"]["template"]["spec"]["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
