"""The fan-out (params `cluster:`): each architecture's training as a child flow run on a GPU work
pool, through the deployment `cluster.deployment` (prefect.yaml's `train-architecture/gpu`).

Parent (`fan_out`, called by the cifar10-pipeline flow):
1. the workspace must be a commit (no tracked file changed but dvc.lock) with a DVC remote;
2. it has run the data stages; it pushes what the trainings depend on to the remote;
3. one `run_deployment` per architecture (placed as cifarflow.cluster.placement says), then one
   loop that reads every child each `cluster.poll_s`:
   - still SCHEDULED `cluster.pickup_timeout_s` after submission: no worker took it; every child is
     cancelled and the run fails, naming the pool and the architecture;
   - PENDING or RUNNING on a worker whose last heartbeat is older than `cluster.lost_after_s`: its
     node is lost; the run is marked CRASHED and submitted again (any worker may take it: it resumes
     from runtime.checkpoint_store), up to `cluster.attempts` runs in all;
   - CRASHED: submitted again the same way; FAILED or CANCELLED: the whole run fails;
4. when every child COMPLETED, it restores each training from the remote's run-cache (the stage
   refuses to train in the parent: CIFARFLOW_GATHER_ONLY) and the flow runs evaluate, export and
   report as without a cluster.

Child (`train_architecture`): in a clone of the parent's commit (the deployment's git_clone pull
step), it checks the commit, the clean tree and params.yaml's sha256, installs the parent's dvc.lock
entries of the stages its training depends on, runs `resolve`, and then, holding the training's
lock in the checkpoint store (a second parent's child of the same training waits, then restores
it), `dvc repro --pull train@<arch>` (restored from the run-cache if another run has pushed it) and
`dvc push --run-cache`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from cifarflow import cluster
from cifarflow.errors import CifarflowError, ConfigError
from cifarflow.settings import ClusterParams, Params, load_params
from cifarflow.tasks.stages import run_dvc, run_dvc_stage

TRAIN = "train"  # the kind of the stages fanned out: train@<arch>
RESOLVE = "resolve"  # cheap and always run: a child runs it itself rather than being handed its outputs
WORKER_LABEL = "prefect.worker.name"  # the label a worker puts on a flow run it takes


class ChildNotPickedUp(CifarflowError):
    """No worker of the pool took a child within cluster.pickup_timeout_s."""


class ChildFailed(CifarflowError):
    """A child failed, or crashed more than cluster.attempts times."""


@dataclass
class Child:
    """One architecture's child: its current flow run and what happened to the earlier ones."""

    arch: str
    flow_run_id: Any
    submitted: float  # time.monotonic() of the current run's submission
    attempt: int = 1
    workers: list[str] = field(default_factory=list)  # the worker of each run that was picked up
    done: bool = False


def stages_handed_over(workspace: Path, arch: str) -> tuple[list[str], list[str]]:
    """(stages whose outputs a child pulls, stages it runs itself) among those `train@<arch>` depends
    on directly, read from DVC's graph: always-changed ones (resolve) are run, the others pulled."""
    from dvc.repo import Repo

    with Repo(str(workspace)) as repo:
        graph = repo.index.graph  # an edge runs from a stage to a stage it depends on
        train = next(s for s in graph.nodes if s.addressing.rpartition(":")[2] == f"{TRAIN}@{arch}")
        providers = list(graph.successors(train))
        pulled = sorted(s.addressing.rpartition(":")[2] for s in providers if not s.always_changed)
        run = sorted(s.addressing.rpartition(":")[2] for s in providers if s.always_changed)
    return pulled, run


def check_remote(workspace: Path) -> None:
    """A default DVC remote, which the children reach too: what they pull from and push to."""
    from dvc.repo import Repo

    with Repo(str(workspace)) as repo:
        if not repo.config["core"].get("remote"):
            raise ConfigError(
                f"{workspace}/.dvc/config: cluster: the fan-out hands data and results over through the default DVC "
                "remote, and there is none: `dvc remote add -d <name> <url every node reaches>`, then commit .dvc/config"
            )


def pool_of(client: Any, deployment_name: str) -> Any:
    """The work pool of the child deployment, as the server knows them."""
    from prefect.exceptions import ObjectNotFound

    try:
        deployment = client.read_deployment_by_name(deployment_name)
    except ObjectNotFound:
        raise ConfigError(
            f"cluster.deployment {deployment_name!r} does not exist on this Prefect server: deploy it from a clone of "
            "the project (`prefect deploy --name gpu`, prefect.yaml's train-architecture)"
        ) from None
    if not deployment.work_pool_name:
        raise ConfigError(f"cluster.deployment {deployment_name!r} has no work pool; deploy it on the GPU pool")
    return client.read_work_pool(deployment.work_pool_name)


def submit(deployment: str, arch: str, parameters: dict[str, Any], placed: dict[str, Any], commit: str) -> Any:
    """One child flow run, returned at once (it is followed by the parent's loop)."""
    from prefect.deployments import run_deployment

    job_variables = {**placed["job_variables"], "env": {"CF_GIT_COMMIT": commit}}
    run = run_deployment(
        deployment,
        parameters={"arch": arch, **parameters},
        job_variables=job_variables,
        work_queue_name=placed["work_queue_name"],
        timeout=0,
        flow_run_name=f"train@{arch}",
        tags=["cifarflow", f"train@{arch}"],
    )
    return run.id


def heartbeats(client: Any, pool: str) -> dict[str, datetime | None]:
    """Each worker of the pool: its last heartbeat."""
    return {w.name: w.last_heartbeat_time for w in client.read_workers_for_work_pool(pool)}


def follow(client: Any, children: dict[str, Child], pool: Any, settings: ClusterParams, resubmit: Any) -> None:
    """Read every child until all completed; see the module docstring for what each state leads to."""
    from prefect.states import Cancelled, Crashed, StateType

    log = get_run_logger()

    def give_up(error: CifarflowError) -> None:
        for other in children.values():
            if not other.done:
                try:
                    client.set_flow_run_state(other.flow_run_id, Cancelled(message="the fan-out failed"), force=True)
                except Exception as exc:  # the server may be struggling too: the error below is what matters
                    log.warning("could not cancel %s: %s", other.arch, exc)
        raise error

    while not all(child.done for child in children.values()):
        time.sleep(settings.poll_s)
        try:
            beats = heartbeats(client, pool.name)
            runs = {arch: client.read_flow_run(child.flow_run_id) for arch, child in children.items() if not child.done}
        except Exception as exc:  # a busy server (SQLite locked, a timeout): read again next time
            log.warning("could not read the children's states (%s); reading again", exc.__class__.__name__)
            continue
        for arch, run in runs.items():
            child, kind = children[arch], run.state.type if run.state else None
            worker = (run.labels or {}).get(WORKER_LABEL)
            if worker and (not child.workers or child.workers[-1] != worker):
                child.workers.append(worker)
                log.info("train@%s: run %d taken by worker %s", arch, child.attempt, worker)
            if kind == StateType.COMPLETED:
                child.done = True
                log.info("train@%s: completed on %s", arch, worker)
            elif kind == StateType.SCHEDULED and time.monotonic() - child.submitted > settings.pickup_timeout_s:
                online = sorted(name for name, beat in beats.items() if beat)
                give_up(
                    ChildNotPickedUp(
                        f"train@{arch}: no worker of work pool {pool.name!r} picked up flow run {run.name} within "
                        f"cluster.pickup_timeout_s={settings.pickup_timeout_s:g} s (workers: {', '.join(online) or 'none'}); "
                        "every child was cancelled"
                    )
                )
            elif kind in (StateType.PENDING, StateType.RUNNING) and worker and lost(beats.get(worker), settings):
                log.warning(
                    "train@%s: worker %s sent no heartbeat for %g s: its node is lost", arch, worker, settings.lost_after_s
                )
                client.set_flow_run_state(
                    child.flow_run_id,
                    Crashed(message=f"worker {worker} lost (no heartbeat for {settings.lost_after_s:g} s)"),
                    force=True,
                )
                again(child, settings, resubmit, give_up, f"its worker {worker} was lost")
            elif kind == StateType.CRASHED:
                again(child, settings, resubmit, give_up, run.state.message or "crashed")
            elif kind in (StateType.FAILED, StateType.CANCELLED, StateType.CANCELLING):
                give_up(ChildFailed(f"train@{arch}: flow run {run.name} ended {kind.value}: {run.state.message or ''}".strip()))


def lost(beat: datetime | None, settings: ClusterParams) -> bool:
    return beat is None or (datetime.now(UTC) - beat).total_seconds() > settings.lost_after_s


def again(child: Child, settings: ClusterParams, resubmit: Any, give_up: Any, why: str) -> None:
    if child.attempt >= settings.attempts:
        give_up(ChildFailed(f"train@{child.arch}: {why}; {child.attempt} runs, cluster.attempts={settings.attempts}"))
    child.attempt += 1
    child.flow_run_id, child.submitted = resubmit(child.arch), time.monotonic()
    get_run_logger().info(
        "train@%s: submitted again (run %d of at most %d): %s", child.arch, child.attempt, settings.attempts, why
    )


def fan_out(workspace: Path, params: Params, archs: list[str]) -> dict[str, Any]:
    """Train `archs` as children on the pool; when this returns, their results are in the remote's
    run-cache. Returns what each child did (attempts, workers)."""
    from prefect.client.orchestration import get_client

    settings = params.cluster
    assert settings is not None
    log = get_run_logger()
    identity = cluster.parent_identity(workspace)
    check_remote(workspace)
    pulled, _ = stages_handed_over(workspace, archs[0])
    run_dvc(workspace, "push", *pulled)
    entries = cluster.lock_entries(workspace, pulled)
    with get_client(sync_client=True) as client:
        pool = pool_of(client, settings.deployment)
        parameters = {**identity, "lock_entries": entries}

        def resubmit(arch: str) -> Any:
            placed = cluster.placement(pool.type, params.recipe(arch).gpus)
            return submit(settings.deployment, arch, parameters, placed, identity["commit"])

        children = {arch: Child(arch, resubmit(arch), time.monotonic()) for arch in archs}
        log.info("fan-out: %d children on work pool %s (%s)", len(children), pool.name, ", ".join(archs))
        follow(client, children, pool, settings, resubmit)
    return {arch: {"attempts": c.attempt, "workers": c.workers} for arch, c in children.items()}


def gather(workspace: Path, archs: list[str]) -> None:
    """Each training restored from the remote's run-cache, never run here (CIFARFLOW_GATHER_ONLY)."""
    for arch in archs:
        result = run_dvc_stage(f"{TRAIN}@{arch}", workspace, pull=True, extra_env={cluster.GATHER_ONLY_ENV: "1"})
        if not (result["restored"] or result["skipped"]):
            raise ChildFailed(f"train@{arch}: not restored from the DVC remote's run-cache after its child completed")


@flow(name="train-architecture", log_prints=False)
def train_architecture(arch: str, commit: str, params_sha256: str, lock_entries: dict[str, Any]) -> dict[str, Any]:
    """One architecture's training for the fan-out, in a clone of the parent's commit (see the module)."""
    log = get_run_logger()
    workspace = Path.cwd()
    cluster.check_child_workspace(workspace, commit, params_sha256)
    params = load_params(workspace / "params.yaml")
    if params.runtime.checkpoint_store is None:
        raise ConfigError(f"{workspace}/params.yaml: runtime.checkpoint_store is not set; the fan-out needs it")
    cluster.install_lock_entries(workspace, lock_entries)
    env = {"PYTHONPATH": str(workspace)}  # the stages run this commit's code, not an installed copy's
    pulled, run = stages_handed_over(workspace, arch)
    for stage in run:
        run_dvc_stage(stage, workspace, extra_env=env)
    stage = f"{TRAIN}@{arch}"
    from dvc.repo import Repo

    with Repo(str(workspace)) as repo:
        deps = [d.def_path for s in repo.index.stages if s.addressing.rpartition(":")[2] == stage for d in s.deps]
    missing = [d for d in deps if not (workspace / d).exists()]
    if missing:  # the handed-over outputs: pulled by `repro --pull` too, but first here, before the lock
        run_dvc(workspace, "pull", *pulled)
    key = cluster.training_key(arch, [workspace / d for d in deps if (workspace / d).is_file()])
    worker = os.environ.get("PREFECT__WORKER_NAME", "?")
    started = time.monotonic()
    with cluster.exclusive(Path(params.runtime.checkpoint_store), key, f"{stage} on worker {worker}"):
        log.info("%s: starts on worker %s", stage, worker)  # bench/orchestration.py times the hand-over to here
        result = run_dvc_stage(stage, workspace, extra_env=env, pull=True)
        run_dvc(workspace, "push", "--run-cache", stage)
    log.info("%s: %s on %s in %.0f s", stage, "restored from the run-cache" if result["restored"] else "trained", worker,
             time.monotonic() - started)  # fmt: skip
    return {"arch": arch, "worker": worker, "restored": result["restored"], "seconds": round(time.monotonic() - started, 1)}
