"""Benchmark: the Prefect flow over a fully up-to-date pipeline (every stage skipped) against
one `dvc repro` of the same workspace, measured in the same run.

    python bench/orchestration.py WORKSPACE [--archs lenet,simple_cnn] [--repeats 3]

WORKSPACE is a project clone whose pipeline is already up to date (e.g. after
`dvc exp run -S profile=smoke`). Prints both times and the flow's overhead per stage beyond
`dvc repro`'s own time; the ephemeral server's start is timed apart. Target: <= 1 s per stage.

    python bench/orchestration.py --fan-out [--repeats 5]     (as root for network namespaces)

The fan-out's overhead on the two-host setup of tests/test_cluster.py (tests/fanout_rig.py): per
run, a new commit makes lenet's training stale, the parent flow fans it out, and the Prefect
server's timestamps give (a) the hand-over: from the child flow run's creation (the parent's
`run_deployment`) to the child's `train@lenet: starts` (after its clone, checks and pulls), and
(b) the notice: from the child's end to the parent's `completed` line. Goal: <= 10 s each (median).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cifarflow.executables import beside_python  # noqa: E402  (after the path setup)


def dvc_repro_seconds(workspace: Path) -> float:
    started = time.perf_counter()
    subprocess.run([beside_python("dvc"), "repro"], cwd=workspace, check=True, capture_output=True)
    return time.perf_counter() - started


def when(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp)


def fan_out_overhead(repeats: int) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from fanout_rig import fanout_rig

    arch = "lenet"
    hand_overs, notices = [], []
    with tempfile.TemporaryDirectory(prefix="cifarflow-bench-") as tmp:
        with fanout_rig(Path(tmp), [arch], {"pickup_timeout_s": 300, "lost_after_s": 30, "poll_s": 1}) as rig:
            print(f"hosts: {rig.hosts.mode}")
            for i in range(repeats):
                rig.commit(f"bench run {i}", **{f"profiles.smoke.train.{arch}.batch_size": 30 + i})  # a new training
                log = Path(tmp) / f"parent-{i}.log"
                running = rig.flow_run(rig.parent, log)
                running.communicate(timeout=1800)
                if running.returncode != 0:
                    sys.exit(f"the flow run failed:\n{log.read_text()[-3000:]}")
                child = rig.child_runs(arch)[-1]
                [start] = [e for e in rig.logs(child["id"]) if e["message"].startswith(f"train@{arch}: starts")]
                parents = rig.api("POST", "/flow_runs/filter", flows={"name": {"any_": ["cifar10-pipeline"]}})
                parent = max(parents, key=lambda r: r["created"])
                [noticed] = [e for e in rig.logs(parent["id"]) if e["message"].startswith(f"train@{arch}: completed")]
                hand_overs.append((when(start["timestamp"]) - when(child["created"])).total_seconds())
                notices.append((when(noticed["timestamp"]) - when(child["end_time"])).total_seconds())
                print(f"run {i + 1}: hand-over {hand_overs[-1]:5.1f} s, notice {notices[-1]:5.1f} s")
    print(f"fan-out hand-over (median of {repeats})   {statistics.median(hand_overs):6.1f} s   goal <= 10 s")
    print(f"fan-out notice (median of {repeats})      {statistics.median(notices):6.1f} s   goal <= 10 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workspace", type=Path, nargs="?")
    parser.add_argument("--archs", help="comma-separated (default: params.yaml archs)")
    parser.add_argument("--repeats", type=int, default=None, help="3 (up-to-date flow), 5 (--fan-out)")
    parser.add_argument("--fan-out", action="store_true", help="the fan-out's overhead on two hosts")
    args = parser.parse_args()
    if args.fan_out:
        return fan_out_overhead(args.repeats or 5)
    if args.workspace is None:
        parser.error("WORKSPACE is required (or --fan-out)")
    args.repeats = args.repeats or 3
    workspace = args.workspace.resolve()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"

    from prefect import flow

    from cifarflow.flows.pipeline import cifar10_pipeline

    started = time.perf_counter()
    flow(lambda: None, name="warm-up")()  # starts the ephemeral server once
    server = time.perf_counter() - started
    archs = args.archs.split(",") if args.archs else None
    cifar10_pipeline(archs=archs, workspace=str(workspace), promote=False)  # applies the selection once
    flows, repros, stages = [], [], 0
    for _ in range(args.repeats):
        repros.append(dvc_repro_seconds(workspace))
        started = time.perf_counter()
        summary = cifar10_pipeline(archs=archs, workspace=str(workspace), promote=False)
        flows.append(time.perf_counter() - started)
        stages = len(summary["stages"])
        ran = [name for name, s in summary["stages"].items() if not s["skipped"]]
    flow_s, repro_s = statistics.median(flows), statistics.median(repros)
    print(f"workspace {workspace}, {stages} stages; ran (not skipped): {ran or 'none'}")
    print(f"ephemeral server start (once)     {server:6.2f} s")
    print(f"dvc repro, whole DAG (median)     {repro_s:6.2f} s")
    print(f"flow, stage by stage (median)     {flow_s:6.2f} s")
    print(f"overhead per stage                {(flow_s - repro_s) / stages:6.2f} s   target <= 1 s")


if __name__ == "__main__":
    main()
