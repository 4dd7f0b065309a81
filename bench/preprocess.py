"""Benchmark: the full 60k-image archive through download (local archive: verify, extract,
parse, validate) + preprocess (split, Parquet + TFRecord shards) + validate, against the floor
measured in the same run: decompressing and reading the archive's bytes with no processing.

    python bench/preprocess.py [--archive PATH] [--workdir DIR]

Uses the real archive built by ../shared/data/make_cifar10_binary.py when that folder exists
(or CIFARFLOW_REAL_DATA points at it), else a generated 60k-image archive. Building the archive,
the interpreter start and `import tensorflow` are reported apart, not counted in stage time.
Targets (2 cores): stages <= 10 s and >= 6,000 img/s end to end, <= 6x the floor; peak RSS
<= 1.5 GiB with TensorFlow imported; Parquet read-back >= 500,000 img/s.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's start-up chatter out of the figures
sys.path.insert(0, str(ROOT))

from cifarflow.data import download, preprocess, shards, validate  # noqa: E402
from cifarflow.data.synth import write_synth_archive  # noqa: E402
from cifarflow.settings import resolve  # noqa: E402


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def build_archive(workdir: Path) -> tuple[Path, str]:
    shared = Path(os.environ.get("CIFARFLOW_REAL_DATA", ROOT.parent / "shared" / "data"))
    out = workdir / "cifar-10-binary.tar.gz"
    if (shared / "make_cifar10_binary.py").is_file():
        subprocess.run([sys.executable, str(shared / "make_cifar10_binary.py"), str(out)], check=True, capture_output=True)
        return out, "real CIFAR-10 (JPEG copy), built by make_cifar10_binary.py"
    write_synth_archive(out, 50000, 10000, seed=0)
    return out, "generated 60k-image archive (../shared/data not found)"


def floor_seconds(archive: Path) -> float:
    """Decompress and read every member's bytes, doing nothing with them."""
    started = time.perf_counter()
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            handle = tar.extractfile(member)
            if handle is not None:
                while handle.read(1 << 20):
                    pass
    return time.perf_counter() - started


def readback(root: Path) -> float:
    """Median img/s of reading the train Parquet shards into one uint8 array (after one warm-up)."""
    paths = shards.shard_paths(root, "train", "parquet")
    shards.read_parquet(paths)  # the first call pays pyarrow's one-time set-up
    rates = []
    for _ in range(10):
        started = time.perf_counter()
        split = shards.read_parquet(paths)
        rates.append(len(split) / (time.perf_counter() - started))
        del split
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", type=Path, help="use this archive instead of building one")
    parser.add_argument("--workdir", type=Path, help="scratch folder (default: a temp dir, removed)")
    parser.add_argument("--readback", type=Path, help=argparse.SUPPRESS)  # internal: the read-back child
    args = parser.parse_args()
    if args.readback:
        print(readback(args.readback))
        return
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="cifarflow-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        started = time.perf_counter()
        archive, label = (args.archive, "given archive") if args.archive else build_archive(workdir)
        print(f"archive: {label}, {archive.stat().st_size / 1e6:.1f} MB (built in {time.perf_counter() - started:.1f} s)")

        started = time.perf_counter()
        import tensorflow  # noqa: F401  (reported apart; the RSS figure includes it)

        print(
            f"import tensorflow: {time.perf_counter() - started:.2f} s, RSS after import {rss_mib():.0f} MiB "
            "(not counted in stage time)"
        )

        floor = min(floor_seconds(archive) for _ in range(2))
        sha = download.digests(archive)["sha256"]
        params = resolve({"data": {"source": str(archive), "sha256": sha, "md5": None}})
        times = {}
        t0 = time.perf_counter()
        raw = download.run(params, workdir / "raw", workdir / "cache")
        times["download (verify, extract, parse, write)"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        manifest = preprocess.run(params, workdir / "raw", workdir / "shards")
        times["preprocess (split, Parquet + TFRecord)"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        validate.run(params, workdir / "shards", workdir / "metrics.json", workdir / "report.md")
        times["validate (schema, stats, duplicates)"] = time.perf_counter() - t2
        total = time.perf_counter() - t0
        images = raw["counts"]["train"] + raw["counts"]["test"]
        peak = rss_mib()

        # Read-back runs in a fresh process, as a training job would start: no TensorFlow
        # threads or allocator state from the stages above.
        read_rate = float(
            subprocess.run(
                [sys.executable, __file__, "--readback", str(workdir / "shards")], check=True, capture_output=True, text=True
            ).stdout
        )

        print(f"\nimages: {images} ({manifest['counts']})")
        for name, seconds in times.items():
            print(f"  {name:<44} {seconds:6.2f} s")
        print(f"  {'total':<44} {total:6.2f} s   target <= 10 s")
        print(f"end to end: {images / total:,.0f} img/s   target >= 6,000")
        print(f"floor (gunzip + read members): {floor:.2f} s -> ratio {total / floor:.2f}x   target <= 6x")
        print(f"peak RSS (TensorFlow imported): {peak:.0f} MiB   target <= 1536 MiB")
        print(
            f"Parquet read-back of train to one uint8 (N, 32, 32, 3) array: {read_rate:,.0f} img/s (median of 10)   "
            "target >= 500,000"
        )
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
