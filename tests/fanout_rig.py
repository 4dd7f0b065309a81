"""The fan-out's test bed, shared by tests/test_cluster.py and bench/orchestration.py: a Prefect
server on the address the hosts reach, a bare git remote, a folder standing in for NFS or a bucket
(the DVC remote and the checkpoint store), the child deployment on a process pool, and one process
worker per host (tests/hosts.py: network namespaces, or loopback addresses)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from conftest import free_port, new_workspace, prefect_env, run_in, set_params
from hosts import Host, Hosts, two_hosts

from cifarflow.executables import beside_python

POOL = "gpu-pool"
GIT = ("git", "-c", "user.name=t", "-c", "user.email=t@t")


def wait_for(what: str, check: Callable[[], Any], timeout_s: float, every_s: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")


@dataclass
class Rig:
    root: Path
    hosts: Hosts
    env: dict[str, str]  # a Prefect client's environment (PREFECT_API_URL ...)
    origin: Path  # the bare git remote the nodes clone from
    author: Path  # where commits are made and pushed from
    parent: Path  # the parent's clone
    shared: Path  # dvc-remote/ and checkpoints/

    def api(self, method: str, path: str, **body: object) -> Any:
        response = requests.request(method, self.env["PREFECT_API_URL"] + path, json=body or None, timeout=30)
        response.raise_for_status()
        return response.json()

    def child_runs(self, arch: str) -> list[dict[str, Any]]:
        runs = self.api("POST", "/flow_runs/filter", flow_runs={"name": {"any_": [f"train@{arch}"]}})
        return sorted(runs, key=lambda r: r["created"])

    def logs(self, flow_run_id: str) -> list[dict[str, Any]]:
        return self.api("POST", "/logs/filter", logs={"flow_run_id": {"any_": [flow_run_id]}}, limit=200)

    def host_of(self, worker: str) -> Host:
        return next(h for h in self.hosts.hosts if worker.startswith(h.name))

    def start_worker(self, host: Host) -> None:
        """One process worker per GPU slot (here one), as on a GPU node: its own Prefect home and temp
        folder (where the children's clones go), CUDA_VISIBLE_DEVICES for its GPU, the git remote as
        the node sees it."""
        home = self.root / host.name
        (home / "tmp").mkdir(parents=True, exist_ok=True)
        worker_env = self.env | {
            "PREFECT_HOME": str(home / "prefect"),
            "TMPDIR": str(home / "tmp"),
            "CF_GIT_REMOTE": str(self.origin),
            "CUDA_VISIBLE_DEVICES": "0",
            "PREFECT_WORKER_QUERY_SECONDS": "2",
            "PREFECT_WORKER_HEARTBEAT_SECONDS": "5",
        }
        name = f"{host.name}-gpu0"
        cmd = [beside_python("prefect"), "worker", "start", "--pool", POOL, "--type", "process", "--name", name,
               "--limit", "1"]  # fmt: skip
        host.start(cmd, worker_env, home / f"worker-{len(host.processes)}.log")

    def commit(self, message: str, **changes: Any) -> None:
        """A new commit of params changes, pushed, and the parent's clone brought to it."""
        set_params(self.author, **changes)
        run_in(self.author, *GIT, "commit", "-qam", message)
        run_in(self.author, "git", "push", "-q", str(self.origin), "HEAD:master")
        run_in(self.parent, "git", "pull", "-q", "--ff-only")

    def clone(self, name: str) -> Path:
        run_in(self.root, "git", "clone", "-q", str(self.origin), name)
        return self.root / name

    def flow_run(self, workspace: Path, log: Path) -> subprocess.Popen[str]:
        """`cifarflow flow run` of a parent workspace; its summary (JSON) on stdout."""
        env = self.env | {"PYTHONPATH": f"{workspace}{os.pathsep}{self.env['PYTHONPATH']}"}
        cmd = [sys.executable, "-m", "cifarflow", "flow", "run", "--workspace", str(workspace), "--no-promote"]
        return subprocess.Popen(cmd, cwd=workspace, env=env, stdout=subprocess.PIPE, stderr=log.open("w"), text=True)


def start_server(hosts: Hosts, home: Path) -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    """`prefect server start` on the address the hosts reach (never on every interface)."""
    port = free_port()
    env = prefect_env(f"http://{hosts.server_address}:{port}/api", home)
    server = subprocess.Popen(
        [beside_python("prefect"), "server", "start", "--host", hosts.server_address, "--port", str(port)],
        env=env | {"PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false"},
        stdout=(home / "server.log").open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )

    def healthy() -> bool:
        try:
            return requests.get(env["PREFECT_API_URL"] + "/health", timeout=2).ok
        except requests.RequestException:
            return False

    wait_for("the Prefect server", healthy, 120)
    return server, env


@contextmanager
def fanout_rig(root: Path, archs: list[str], cluster: dict[str, Any]) -> Iterator[Rig]:
    """Everything made, a worker started on each host; all of it stopped and removed after."""
    shared = root / "shared"
    author = new_workspace(root / "author")
    set_params(author, profile="smoke", archs=archs, cluster=cluster,
               **{"runtime.checkpoint_store": str(shared / "checkpoints")})  # fmt: skip
    run_in(author, "dvc", "remote", "add", "-d", "shared", str(shared / "dvc-remote"))
    run_in(author, *GIT, "add", "-A")
    run_in(author, *GIT, "commit", "-qm", "fan out to the GPU pool")
    origin = root / "origin.git"
    run_in(root, "git", "clone", "-q", "--bare", str(author), str(origin))
    (root / "prefect-home").mkdir()
    with two_hosts() as hosts:
        server, env = start_server(hosts, root / "prefect-home")
        try:
            rig = Rig(root, hosts, env, origin, author, root / "parent", shared)
            rig.clone("parent")
            subprocess.run([beside_python("prefect"), "work-pool", "create", POOL, "--type", "process"], env=env,
                           check=True, capture_output=True)  # fmt: skip
            deploy_env = {k: v for k, v in env.items() if not k.startswith("CF_GIT_")}
            deployed = subprocess.run([beside_python("prefect"), "--no-prompt", "deploy", "--name", "gpu"],
                                      cwd=rig.parent, env=deploy_env, capture_output=True, text=True)  # fmt: skip
            assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
            for host in hosts.hosts:
                rig.start_worker(host)
            yield rig
        finally:
            server.terminate()
            server.wait(timeout=30)
