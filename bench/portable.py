"""What portable mode (runtime.portable: true) costs in training speed, per recipe of params.yaml's
full profile: seconds per training step with the native environment and with the portable one,
each in a fresh process (the libraries read the environment only when they load), interleaved,
the same steps on the same random batch, compile and warm-up steps left out.

    python bench/portable.py [--steps 8] [--reps 2] [--archs simple_cnn,whitened_vgg]

Prints the median wall and CPU seconds per step of each mode and the ratio portable / native.
CPU seconds are the steadier figure on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WARMUP = 2  # compile and first-touch steps, not timed


def committed_recipes() -> dict:
    import yaml

    from cifarflow.settings import resolve

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["profile"] = "full"
    raw.pop("profiles", None)
    params = resolve(raw)
    return {arch: params.recipe(arch) for arch in params.archs}


def child(arch: str, steps: int) -> None:
    """One mode's timing, in this process: the environment was set by the parent."""
    import keras
    import numpy as np
    import tensorflow as tf

    from cifarflow.training.trainer import build_compiled

    recipe = committed_recipes()[arch]
    keras.utils.set_random_seed(0)
    tf.config.experimental.enable_op_determinism()
    model = build_compiled(recipe, 10, recipe.optimizer.learning_rate)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((recipe.batch_size, 32, 32, 3)).astype(np.float32)
    y = keras.utils.to_categorical(rng.integers(0, 10, recipe.batch_size), 10)
    walls, cpus = [], []
    for step in range(WARMUP + steps):
        wall, cpu = time.perf_counter(), time.process_time()
        model.train_on_batch(x, y)
        if step >= WARMUP:
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
    print(json.dumps({"wall": statistics.median(walls), "cpu": statistics.median(cpus)}))


def measure(arch: str, mode: str, steps: int) -> dict[str, float]:
    from cifarflow import portable

    env = portable.environment(mode == "portable", 2 if mode == "portable" else 0)
    env |= {"TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, __file__, "--child", arch, "--steps", str(steps)], env=env, capture_output=True, text=True, timeout=3600
    )
    if done.returncode:
        raise SystemExit(f"{arch} {mode} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--archs", help="comma-separated (default: params.yaml archs)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.steps)
    archs = args.archs.split(",") if args.archs else list(committed_recipes())
    print(f"{'recipe':14} {'native wall/cpu s':>18} {'portable wall/cpu s':>20} {'ratio wall':>10} {'ratio cpu':>9}")
    for arch in archs:
        runs: dict[str, list[dict[str, float]]] = {"native": [], "portable": []}
        for _ in range(args.reps):
            for mode in runs:
                runs[mode].append(measure(arch, mode, args.steps))
        n, p = ({k: statistics.median(r[k] for r in runs[m]) for k in ("wall", "cpu")} for m in ("native", "portable"))
        print(
            f"{arch:14} {n['wall']:8.3f} / {n['cpu']:7.3f} {p['wall']:9.3f} / {p['cpu']:7.3f} "
            f"{p['wall'] / n['wall']:10.2f} {p['cpu'] / n['cpu']:9.2f}",
            flush=True,
        )


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
