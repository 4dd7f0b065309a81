"""The stages' files: what each stage names the files it writes in its output folder, and the readers
the stages after it (and the flow, promote, predict) use. dvc.yaml gives the folders; the names
inside them are written here once, and writers and readers both take them from here.

Readers check what they read: a missing file names the stage that writes it, a file that is not a
regular file or is larger than any such file could be is an InputError naming it, never a hang or
a traceback. Light on purpose (standard library only): every stage and the flow import it.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from cifarflow.errors import InputError
from cifarflow.openfile import read_regular

# download (data/raw), preprocess (data/shards) and corrupt (data/corrupt): what each folder holds
MANIFEST = "manifest.json"
VERDICT = "verdict.json"  # validate's, beside its report; corrupt's own, in its folder
# resolve (data/resolved): one file per stage, `<stage>.json`, or per architecture, `<stage>/<arch>.json`
RESOLVED_SUFFIX = ".json"
# DVC metrics files (validate, train, evaluate): a few numbers each, since `dvc metrics show` puts every
# file's fields in one table; a stage's other figures are in its DETAILS file (train: its SUMMARY)
METRICS, DETAILS = "metrics.json", "details.json"
# train (data/models/<arch>/): SUMMARY is the whole record, METRICS its headline (trainer.HEADLINE)
MODEL, WEIGHTS_DIGEST, HISTORY, SUMMARY = "model.keras", "weights.sha256", "history.csv", "summary.json"
# train's run info (data/runinfo/train/<arch>/): run-dependent facts, never compared
RUN_INFO = "run.json"
ROBUSTNESS = "robustness"  # evaluate's metrics block (and a card's) of the corruption benchmark
# evaluate (data/eval/<arch>/): METRICS, DETAILS and
RELIABILITY, HEATMAP = "reliability.png", "corruption_heatmap.png"
CONFUSION_CSV, CONFUSION_PNG, GRID_PNG = "confusion_test.csv", "confusion_test.png", "predictions_grid.png"
# export (data/export/), which `promote` copies into a registry version whole
SAVED_MODEL, LABELS, MODEL_CARD, MODEL_CARD_MD = "saved_model", "labels.json", "model_card.json", "MODEL_CARD.md"
# ... and the sha256 of every file it serves (the SavedModel's, the labels), which promote and predict check:
SERVED = "served.json"
# report (data/reports/)
LEADERBOARD_MD, LEADERBOARD_JSON = "leaderboard.md", "leaderboard.json"

MAX_JSON_BYTES = 64 << 20  # the largest of these is a model card with its leaderboard: kilobytes


def predictions(split: str) -> str:
    """evaluate's calibrated predictions of `split` (val, test): the serving reference."""
    return f"predictions_{split}.csv"


def read_json(path: Path, stage: str) -> dict[str, Any]:
    """A JSON object a stage wrote; an InputError naming the file (and the stage to run) otherwise."""
    path = Path(path)
    data = read_regular(path, MAX_JSON_BYTES, missing=f"not found; run the {stage} stage first", what=f"{stage}'s JSON")
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):
        raise InputError(f"{path}: not valid JSON; rerun the {stage} stage") from None
    if not isinstance(value, dict):
        raise InputError(f"{path}: holds a {type(value).__name__}, not a JSON object; rerun the {stage} stage")
    return value


def read_summary(models: Path, arch: str) -> dict[str, Any]:
    return read_json(Path(models) / arch / SUMMARY, f"train@{arch}")


def read_metrics(evals: Path, arch: str) -> dict[str, Any]:
    """evaluate's metrics of `arch`: the headline (METRICS) and the details (DETAILS) merged per block."""
    folder, stage = Path(evals) / arch, f"evaluate@{arch}"
    merged, headline = read_json(folder / DETAILS, stage), read_json(folder / METRICS, stage)
    for key, block in headline.items():
        merged[key] = {**merged.get(key, {}), **block} if isinstance(block, dict) else block
    return merged


def read_card(export: Path) -> dict[str, Any]:
    return read_json(Path(export) / MODEL_CARD, "export")


def read_history(models: Path, arch: str) -> list[dict[str, float | None]]:
    """train's history.csv of `arch` as rows of numbers (None where an epoch was not validated)."""
    path = Path(models) / arch / HISTORY
    text = read_regular(path, MAX_JSON_BYTES, missing=f"not found; run the train@{arch} stage first", what="train's history")
    try:
        return [{k: float(v) if v else None for k, v in row.items()} for row in csv.DictReader(io.StringIO(text.decode()))]
    except (ValueError, UnicodeDecodeError):
        raise InputError(f"{path}: not train's history (numbers per epoch); rerun the train@{arch} stage") from None
