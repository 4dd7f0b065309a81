"""Benchmark: the Prefect flow over a fully up-to-date pipeline (every stage skipped) against
one `dvc repro` of the same workspace, measured in the same run.

    python bench/orchestration.py WORKSPACE [--archs lenet,simple_cnn] [--repeats 3]

WORKSPACE is a project clone whose pipeline is already up to date (e.g. after
`dvc exp run -S profile=smoke`). Prints both times and the flow's overhead per stage beyond
`dvc repro`'s own time; the ephemeral server's start is timed apart. Target: <= 1 s per stage.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cifarflow.executables import beside_python  # noqa: E402  (after the path setup)


def dvc_repro_seconds(workspace: Path) -> float:
    started = time.perf_counter()
    subprocess.run([beside_python("dvc"), "repro"], cwd=workspace, check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workspace", type=Path)
    parser.add_argument("--archs", help="comma-separated (default: params.yaml archs)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
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
