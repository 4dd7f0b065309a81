"""`cifarflow report`: the leaderboard as markdown and JSON, one row per architecture, with the
seeds' reported accuracies beside ours, all from DVC-tracked outputs, so the same params give the
same bytes. Training speeds depend on the machine and the run: they go to a run-info side file,
`<runinfo>/speeds.json`, never into the leaderboard."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from cifarflow.config import Params
from cifarflow.errors import InputError
from cifarflow.fileio import write_bytes_atomic, write_json_atomic

# What each seed tutorial reports (../shared/seeds/README.md), on the official CIFAR-10.
SEED_REPORTED = {
    "simple_cnn": (None, "seed 003 shows its accuracy only as an image"),
    "lenet": (0.72, "seed 001: ~72% peak eval accuracy"),
    "lenet_mixup": (0.75, "seed 001: ~75% with mixup"),
    "resnet56": (None, "seed 002 states none; He et al. 2016 report 93.03% at ~164 epochs"),
    "densenet121": (0.7518, "seed 000: 75.18% eval accuracy"),
}
PLOTS = "dvc_plots/index.html"  # where `dvc plots show` writes the curves, relative to the project (where dvc runs)


def _read(path: Path, stage: str) -> dict[str, Any]:
    if not path.is_file():
        raise InputError(f"{path}: not found; run the {stage} stage first")
    return json.loads(path.read_text())


def speeds(params: Params, runinfo: Path) -> dict[str, float | None]:
    """Median train img/s per arch from the train stages' run info (absent when restored from a cache)."""
    found = {}
    for arch in params.archs:
        run = runinfo / "train" / arch / "run.json"
        found[arch] = json.loads(run.read_text()).get("train_images_per_second") if run.is_file() else None
    return found


def rows(params: Params, models: Path, evals: Path) -> list[dict[str, Any]]:
    table = []
    for arch in params.archs:
        metrics = _read(evals / arch / "metrics.json", f"evaluate@{arch}")
        summary = _read(models / arch / "summary.json", f"train@{arch}")
        seed_value, seed_note = SEED_REPORTED.get(arch, (None, "no seed"))
        robust = metrics.get("robustness")
        table.append(
            {
                "arch": arch,
                "model": summary["model"],
                "variant": summary["variant"],
                "params": summary["params"],
                "epochs": summary["epochs"],
                "best_epoch": summary["best_epoch"],
                "val_accuracy": metrics["val"]["accuracy"],
                "val_ci95": [metrics["val"]["ci95_low"], metrics["val"]["ci95_high"]],
                "test_accuracy": metrics["test"]["accuracy"],
                "test_ci95": [metrics["test"]["ci95_low"], metrics["test"]["ci95_high"]],
                "temperature": metrics["temperature"],
                "test_ece": [metrics["test"]["ece"], metrics["test_calibrated"]["ece"]],  # raw, calibrated
                "mca": robust and robust["mca"],
                "mca_ci95": robust and [robust["ci95_low"], robust["ci95_high"]],
                "seed_reported_accuracy": seed_value,
                "seed_note": seed_note,
            }
        )
    return table


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}%"


def plots_link(out: Path) -> str:
    """The link to PLOTS from the leaderboard written in `out` (data/reports/ -> ../../dvc_plots/index.html);
    the stages run from the project folder, so PLOTS is relative to the current directory."""
    return Path(os.path.relpath(Path.cwd() / PLOTS, Path(out).resolve())).as_posix()


def render(table: list[dict[str, Any]], card: dict[str, Any] | None, profile: str, plots: str = PLOTS) -> str:
    kind = card.get("data_source_kind") if card else None
    data = {
        "synth": " Data: **synthetic** (generated): these figures say nothing about real images.",
        "archive": " Data: a CIFAR-10 binary archive.",
        "image-folder": " Data: an image folder.",
    }.get(kind, "")
    lines = [
        "# Leaderboard",
        "",
        f"Profile `{profile}`.{data} Selection on val; test is the honest final figure. "
        "Intervals are 95% Wilson (mCA: bootstrap over images). Test ECE: top-label, 15 bins, raw → after the "
        "temperature T fitted on val. mCA: mean accuracy over the corruption benchmark's cells. Seed figures are "
        "what the tutorials report on the official CIFAR-10.",
        "",
        "| arch | params | epochs (best) | val accuracy (95% CI) | test accuracy (95% CI) | test ECE (T) | mCA (95% CI) "
        "| seed reported |",
        "|---|---:|---:|---|---|---|---|---|",
    ]
    for r in table:
        mca = f"{_pct(r['mca'])} ({_pct(r['mca_ci95'][0])}–{_pct(r['mca_ci95'][1])})" if r["mca"] is not None else "–"
        lines.append(
            f"| {r['arch']} | {r['params']:,} | {r['epochs']} ({r['best_epoch']}) | {_pct(r['val_accuracy'])} "
            f"({_pct(r['val_ci95'][0])}–{_pct(r['val_ci95'][1])}) | {_pct(r['test_accuracy'])} "
            f"({_pct(r['test_ci95'][0])}–{_pct(r['test_ci95'][1])}) | {r['test_ece'][0]:.3f} → {r['test_ece'][1]:.3f} "
            f"(T = {r['temperature']:.2f}) | {mca} | {_pct(r['seed_reported_accuracy'])} |"
        )
    if card:
        verdict = "blessed" if card["blessed"] else "not blessed"
        lines += [
            "",
            f"Exported: **{card['arch']}** ({card['why']}), {verdict}:",
            *[f"- {reason}" for reason in card["blessing_reasons"]],
        ]
        if card.get("comparison"):
            c = card["comparison"]
            lines.append(
                f"- vs runner-up {c['runner_up']}: McNemar p = {c['p_value']:.4g} "
                f"({'significant' if c['significant'] else 'not significant'})"
            )
    lines += [
        "",
        "Seed notes: " + "; ".join(f"{r['arch']}: {r['seed_note']}" for r in table),
        "",
        f"Curves: `dvc plots show` writes [{PLOTS}]({plots}); confusion matrices and prediction grids are in "
        "`data/eval/<arch>/`. Training speeds (img/s) depend on the machine: they are run info, in "
        "`data/runinfo/speeds.json`.",
    ]
    return "\n".join(lines) + "\n"


def run(params: Params, models: Path, evals: Path, export: Path, runinfo: Path, out: Path) -> dict[str, Any]:
    table = rows(params, Path(models), Path(evals))
    card_path = Path(export) / "model_card.json"
    card = json.loads(card_path.read_text()) if card_path.is_file() else None
    report = {
        "profile": params.profile,
        "rows": table,
        "data_source_kind": card.get("data_source_kind") if card else None,
        "exported": None
        if card is None
        else {
            "arch": card["arch"],
            "blessed": card["blessed"],
            "reasons": card["blessing_reasons"],
            "comparison": card.get("comparison"),
        },
    }
    write_json_atomic(Path(out) / "leaderboard.json", report)
    write_bytes_atomic(Path(out) / "leaderboard.md", render(table, card, params.profile, plots_link(Path(out))).encode())
    write_json_atomic(Path(runinfo) / "speeds.json", {"train_images_per_second": speeds(params, Path(runinfo))})
    return report
