"""Time to accuracy of trained architectures, from what their train stages recorded: the wall
seconds from the stage process's start until its val accuracy first reached each threshold, and
the whole stage's wall time, each against the first architecture listed (the baseline, e.g.
simple_cnn), plus a PNG of val accuracy against wall seconds.

    python bench/time_to_accuracy.py --root . --archs simple_cnn whitened_vgg --png docs/time_to_accuracy.png

Reads data/runinfo/train/<arch>/run.json (`process_seconds` per epoch and at the end) and
data/models/<arch>/history.csv (val accuracy per validated epoch) under --root. A recipe with
`validate_every: N` is seen only every N-th epoch, so its times to a threshold are upper bounds
(up to N - 1 epochs late). Both stages should have run
on the same machine the same day, without a resume (a resumed stage counts from its own start).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

THRESHOLDS = (0.70, 0.80, 0.85, 0.90)


def curve(root: Path, arch: str) -> tuple[list[float], list[float], float, dict]:
    """(wall seconds at each validated epoch's end, its val accuracy, stage seconds, run info)."""
    info = json.loads((root / "data/runinfo/train" / arch / "run.json").read_text())
    if info.get("resumed_after_epoch") is not None:
        raise SystemExit(f"{arch}: its stage resumed after epoch {info['resumed_after_epoch']}: times are not from one process")
    with (root / "data/models" / arch / "history.csv").open() as f:
        accuracy = [float(row["val_accuracy"]) if row["val_accuracy"] else None for row in csv.DictReader(f)]
    seconds = [epoch["process_seconds"] for epoch in info["epochs"]]
    validated = [(s, a) for s, a in zip(seconds, accuracy, strict=True) if a is not None]  # recipe validate_every
    return [s for s, _ in validated], [a for _, a in validated], info["process_seconds"], info


def reached(seconds: list[float], accuracy: list[float], threshold: float) -> float | None:
    return next((s for s, a in zip(seconds, accuracy, strict=True) if a >= threshold), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("."), help="the DVC workspace the stages ran in")
    parser.add_argument("--archs", nargs="+", required=True, help="the first is the baseline")
    parser.add_argument("--png", type=Path, help="write val accuracy against wall seconds here")
    args = parser.parse_args()
    curves = {arch: curve(args.root, arch) for arch in args.archs}
    base = args.archs[0]
    header = " | ".join(f"{t:.0%} val" for t in THRESHOLDS)
    print(f"| arch | img/s | validated epochs | best val | {header} | stage wall | ratio to {base} |")
    print("|---|---:|---:|---:|" + "---:|" * len(THRESHOLDS) + "---:|---:|")
    for arch, (seconds, accuracy, stage, info) in curves.items():
        cells = [reached(seconds, accuracy, t) for t in THRESHOLDS]
        shown = " | ".join(f"{c:.0f} s" if c is not None else "–" for c in cells)
        ratio = stage / curves[base][2]
        print(
            f"| {arch} | {info['train_images_per_second']:.0f} | {len(accuracy)} | {max(accuracy):.2%} | {shown} "
            f"| {stage:.0f} s | {ratio:.2f} |"
        )
    if args.png:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        figure = Figure(figsize=(6.4, 4.0), dpi=100)
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        for arch, (seconds, accuracy, stage, _) in curves.items():
            axes.plot(seconds, accuracy, marker="o", label=f"{arch} (stage {stage:.0f} s)")
        for t in THRESHOLDS:
            axes.axhline(t, color="grey", linewidth=0.5, linestyle=":")
        axes.set_xlabel("wall seconds since the train stage started")
        axes.set_ylabel("val accuracy")
        axes.set_title("val accuracy against wall time, one process each")
        axes.legend(loc="lower right")
        axes.grid(alpha=0.3)
        figure.tight_layout()
        args.png.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(args.png, metadata={"Software": None})
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
