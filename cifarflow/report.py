"""`cifarflow report`: the leaderboard as markdown and JSON, one row per architecture, with the
seeds' reported accuracies beside ours, all from DVC-tracked outputs, so the same params give the
same bytes. Training speeds depend on the machine and the run: they go to a run-info side file,
`<runinfo>/speeds.json`, never into the leaderboard."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cifarflow import leaderboard, policy
from cifarflow.contract import LEADERBOARD_JSON, LEADERBOARD_MD, MODEL_CARD, RUN_INFO, read_card, read_history, read_json
from cifarflow.fileio import write_bytes_atomic, write_json_atomic
from cifarflow.settings import Params
from cifarflow.sources import DATA_DESCRIBED, SYNTH

PLOTS = "dvc_plots/index.html"  # where `dvc plots show` writes the curves, relative to the project (where dvc runs)
CURVES = "curves.png"  # the same curves as a picture: dvc's HTML loads Vega from a CDN and is blank offline


def curves_png(histories: dict[str, list[dict[str, float | None]]]) -> bytes:
    """Val accuracy and training loss per epoch, one line per architecture (validated epochs only for val)."""
    from cifarflow.figures import figure, png

    fig = figure((10, 4))
    for column, (field, title) in enumerate((("val_accuracy", "val accuracy"), ("loss", "training loss"))):
        ax = fig.add_axes((0.07 + 0.5 * column, 0.13, 0.40, 0.78))
        for arch, rows in histories.items():
            points = [(r["epoch"], r[field]) for r in rows if r.get(field) is not None]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", markersize=3, label=arch)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.axes[0].legend(fontsize=8)
    return png(fig)


def speeds(params: Params, runinfo: Path) -> dict[str, float | None]:
    """Median train img/s per arch from the train stages' run info (absent when restored from a cache)."""
    found = {}
    for arch in params.archs:
        run = runinfo / "train" / arch / RUN_INFO
        found[arch] = read_json(run, f"train@{arch}").get("train_images_per_second") if run.is_file() else None
    return found


def plots_link(out: Path) -> str:
    """The link to PLOTS from the leaderboard written in `out` (data/reports/ -> ../../dvc_plots/index.html);
    the stages run from the project folder, so PLOTS is relative to the current directory."""
    return Path(os.path.relpath(Path.cwd() / PLOTS, Path(out).resolve())).as_posix()


def render(table: list[dict[str, Any]], card: dict[str, Any] | None, profile: str, plots: str = PLOTS) -> str:
    kind = card.get("data_source_kind") if card else None
    data = "" if kind not in DATA_DESCRIBED else f" Data: {DATA_DESCRIBED[kind]}."
    if kind == SYNTH:
        data = data.removesuffix(".") + ": these figures say nothing about real images."
    lines = [
        "# Leaderboard",
        "",
        f"Profile `{profile}`.{data} Selection on val; test is the honest final figure. "
        "Intervals are 95% Wilson (mCA: bootstrap over images). Test ECE: top-label, 15 bins, raw → after the "
        "temperature T fitted on val. mCA: mean accuracy over the corruption benchmark's cells. Seed figures are "
        "what the tutorials report on the official CIFAR-10.",
        "",
        *leaderboard.markdown(table),
    ]
    if card:
        verdict = "blessed" if card["verdict"]["blessed"] else "not blessed"
        lines += ["", f"Exported: **{card['arch']}** ({card['why']}), {verdict}:", *policy.markdown(card["verdict"])]
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
        f"Curves: [{CURVES}]({CURVES}) (val accuracy and training loss per epoch). `dvc plots show` writes "
        f"[{PLOTS}]({plots}), interactive but drawn by Vega from a CDN: blank offline. Confusion matrices, "
        "reliability diagrams and prediction grids are PNGs in `data/eval/<arch>/`. Training speeds (img/s) "
        "depend on the machine: they are run info, in `data/runinfo/speeds.json`.",
    ]
    return "\n".join(lines) + "\n"


def run(params: Params, models: Path, evals: Path, export: Path, runinfo: Path, out: Path) -> dict[str, Any]:
    table = [row.record() for row in leaderboard.rows(params.archs, Path(evals), Path(models))]
    card = read_card(Path(export)) if (Path(export) / MODEL_CARD).is_file() else None
    report = {
        "profile": params.profile,
        "rows": table,
        "data_source_kind": card.get("data_source_kind") if card else None,
        "exported": None
        if card is None
        else {"arch": card["arch"], "verdict": card["verdict"], "comparison": card.get("comparison")},
    }
    write_json_atomic(Path(out) / LEADERBOARD_JSON, report)
    write_bytes_atomic(Path(out) / CURVES, curves_png({arch: read_history(Path(models), arch) for arch in params.archs}))
    write_bytes_atomic(Path(out) / LEADERBOARD_MD, render(table, card, params.profile, plots_link(Path(out))).encode())
    write_json_atomic(Path(runinfo) / "speeds.json", {"train_images_per_second": speeds(params, Path(runinfo))})
    return report
