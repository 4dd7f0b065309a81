"""The leaderboard: one row per architecture from the train and evaluate stages' outputs, ranked on
val for export's selection, rendered once as markdown (the model card and the report) and once as
plain records (the flow's table artifact). Standard library only."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cifarflow.contract import ROBUSTNESS, read_metrics, read_summary
from cifarflow.errors import InputError

# What each seed tutorial reports (../shared/seeds/README.md), on the official CIFAR-10.
SEED_REPORTED = {
    "simple_cnn": (None, "seed 003 shows its accuracy only as an image"),
    "lenet": (0.72, "seed 001: ~72% peak eval accuracy"),
    "lenet_mixup": (0.75, "seed 001: ~75% with mixup"),
    "resnet56": (None, "seed 002 states none; He et al. 2016 report 93.03% at ~164 epochs"),
    "densenet121": (0.7518, "seed 000: 75.18% eval accuracy"),
}


@dataclass(frozen=True)
class Row:
    """One architecture: its size, its training and its scores (intervals are 95%)."""

    arch: str
    model: str
    variant: str
    params: int
    epochs: int
    best_epoch: int  # counted from 1, as the training log counts
    val_accuracy: float
    val_ci95: tuple[float, float]
    val_loss: float
    test_accuracy: float
    test_ci95: tuple[float, float]
    test_loss: float
    temperature: float
    test_ece: tuple[float, float]  # raw, after the temperature
    mca: float | None = None  # mean corruption accuracy, when evaluate scored the benchmark
    mca_ci95: tuple[float, float] | None = None  # bootstrap over images
    seed_reported_accuracy: float | None = None
    seed_note: str = "no seed"

    def record(self) -> dict[str, Any]:
        return asdict(self)


def rows(archs: list[str], evals: Path, models: Path) -> list[Row]:
    """One Row per arch, in the order of `archs`."""
    if not archs:
        raise InputError("archs is empty: nothing to rank; list at least one architecture in params.yaml archs:")
    table = []
    for arch in archs:
        metrics, summary = read_metrics(Path(evals), arch), read_summary(Path(models), arch)
        robust = metrics.get(ROBUSTNESS)
        seed_value, seed_note = SEED_REPORTED.get(arch, (None, "no seed"))
        table.append(
            Row(
                arch=arch,
                model=summary["model"],
                variant=summary["variant"],
                params=summary["params"],
                epochs=summary["epochs"],
                best_epoch=summary["best_epoch"],
                val_accuracy=metrics["val"]["accuracy"],
                val_ci95=(metrics["val"]["ci95_low"], metrics["val"]["ci95_high"]),
                val_loss=metrics["val"]["loss"],
                test_accuracy=metrics["test"]["accuracy"],
                test_ci95=(metrics["test"]["ci95_low"], metrics["test"]["ci95_high"]),
                test_loss=metrics["test"]["loss"],
                temperature=metrics["temperature"],
                test_ece=(metrics["test"]["ece"], metrics["test_calibrated"]["ece"]),
                mca=robust["mca"] if robust else None,
                mca_ci95=(robust["ci95_low"], robust["ci95_high"]) if robust else None,
                seed_reported_accuracy=seed_value,
                seed_note=seed_note,
            )
        )
    return table


def rank(table: list[Row], metric: str) -> list[Row]:
    """Best first by `metric` on val; ties go to fewer parameters, then to the name."""
    sign = -1 if metric == "val_accuracy" else 1
    return sorted(table, key=lambda r: (sign * getattr(r, metric), r.params, r.arch))


def pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}%"


def interval(value: float | None, bounds: tuple[float, float] | list[float] | None) -> str:
    return "–" if value is None or bounds is None else f"{pct(value)} ({pct(bounds[0])}–{pct(bounds[1])})"


def markdown(table: list[dict[str, Any]]) -> list[str]:
    """The table's markdown lines, from rows as records (a card or leaderboard.json holds them so)."""
    lines = [
        "| arch | params | epochs (best) | val accuracy (95% CI) | val loss | test accuracy (95% CI) | test ECE (T) "
        "| mCA (95% CI) | seed reported |",
        "|---|---:|---:|---|---:|---|---|---|---|",
    ]
    for r in table:
        lines.append(
            f"| {r['arch']} | {r['params']:,} | {r['epochs']} ({r['best_epoch']}) | {interval(r['val_accuracy'], r['val_ci95'])} "
            f"| {r['val_loss']:.4f} | {interval(r['test_accuracy'], r['test_ci95'])} | {r['test_ece'][0]:.3f} → "
            f"{r['test_ece'][1]:.3f} (T = {r['temperature']:.2f}) | {interval(r['mca'], r['mca_ci95'])} "
            f"| {pct(r['seed_reported_accuracy'])} |"
        )
    return lines


def artifact_table(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows as a table artifact shows them: one flat record each, intervals as text."""
    return [
        {
            "arch": r["arch"],
            "params": r["params"],
            "epochs (best)": f"{r['epochs']} ({r['best_epoch']})",
            "val accuracy (95% CI)": interval(r["val_accuracy"], r["val_ci95"]),
            "test accuracy (95% CI)": interval(r["test_accuracy"], r["test_ci95"]),
            "mCA (95% CI)": interval(r["mca"], r["mca_ci95"]),
            "seed reported": pct(r["seed_reported_accuracy"]),
        }
        for r in table
    ]
