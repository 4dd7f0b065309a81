"""The corruption benchmark's cost, each against a baseline measured in the same run: the corrupt
stage's wall time, and each architecture's evaluation with the benchmark against its evaluation
without it (clean val and test only), both as `cifarflow` processes from start to exit.

    python bench/robustness.py --root WS --archs simple_cnn whitened_vgg [--out DIR]

WS is a workspace whose validate and train stages have run (data/shards, data/validation/verdict.json,
data/models/<arch>); its params.yaml decides the benchmark's size (`robustness`). Outputs go to
--out (default: a temporary folder), never into WS's DVC outputs. Targets at the CPU default
(2,000 images x 14 corruptions x 5 severities): corrupt stage <= 180 s; a small model's corrupted
evaluation <= 180 s.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLI = [str(Path(sys.executable).with_name("cifarflow"))]  # the running environment's own command


def timed(args: list[str], cwd: Path) -> float:
    started = time.perf_counter()
    done = subprocess.run([*CLI, *args], cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"cifarflow {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True, help="a workspace with shards, a verdict and trained models")
    parser.add_argument("--archs", nargs="+", required=True)
    parser.add_argument("--out", type=Path, help="where the benchmark and evaluations go (default: a temporary folder)")
    args = parser.parse_args()
    root = args.root.resolve()
    with tempfile.TemporaryDirectory() as tmp:
        out = (args.out or Path(tmp)).resolve()
        data = ["--shards", "data/shards", "--verdict", "data/validation/verdict.json"]
        corrupt = timed(["corrupt", *data, "--out", str(out / "corrupt")], root)
        print(f"corrupt stage: {corrupt:.1f} s (target <= 180 s at the CPU default)")
        print("\n| arch | evaluate, clean only | with the corruption benchmark | added | ratio |\n|---|---:|---:|---:|---:|")
        for arch in args.archs:
            common = ["evaluate", arch, *data, "--model", f"data/models/{arch}"]
            clean = timed([*common, "--out", str(out / "clean" / arch)], root)
            full = timed([*common, "--out", str(out / "eval" / arch), "--corrupt", str(out / "corrupt")], root)
            print(f"| {arch} | {clean:.1f} s | {full:.1f} s | {full - clean:.1f} s | {full / clean:.2f}x |")


if __name__ == "__main__":
    main()
