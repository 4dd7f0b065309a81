"""`cifarflow compare-runs A B`: whether two trainings gave the same weights, and whether their
hosts could be expected to (cifarflow.numerics). A and B are a training's summary.json, a model
card, a run info (which has no weights digest), or a folder holding one of them.

Exit 0 when the weights are identical (or neither file has a digest), 1 when they differ: like
`cmp`, a script can test it. The text says whether a difference is the machine's or a real one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cifarflow import numerics
from cifarflow.contract import MODEL_CARD, RUN_INFO, SUMMARY, read_json
from cifarflow.errors import InputError

RECORDS = (SUMMARY, MODEL_CARD, RUN_INFO)  # in a folder, the first one there is read


def record_file(path: Path) -> Path:
    path = Path(path)
    if not path.is_dir():
        return path
    for name in RECORDS:
        if (path / name).is_file():
            return path / name
    raise InputError(f"{path}: holds none of {', '.join(RECORDS)}; give a training's folder (data/models/<arch>) or a file")


def load(path: Path) -> tuple[Path, str | None, dict[str, Any] | None]:
    """(the file read, its weights digest, its numerics record); a card's record is its `trained_on`."""
    file = record_file(path)
    data = read_json(file, "train")
    return file, data.get("weights_sha256"), data.get("numerics") or data.get("trained_on")


def compare_runs(a: Path, b: Path) -> tuple[str, bool]:
    """(the text to print, whether the weights are identical or unknown)."""
    (file_a, weights_a, host_a), (file_b, weights_b, host_b) = load(a), load(b)
    lines = [
        f"A: {file_a}: weights {str(weights_a or 'not recorded')[:12]}, {numerics.describe(host_a)}",
        f"B: {file_b}: weights {str(weights_b or 'not recorded')[:12]}, {numerics.describe(host_b)}",
    ]
    differ = numerics.differences(host_a, host_b)
    lines.append(
        "hosts and numeric settings: comparable" if not differ else f"hosts and numeric settings: {len(differ)} difference(s):"
    )
    lines += [f"  - {line}" for line in differ]
    if not (weights_a and weights_b):
        lines.append("weights: not compared (a run info has no digest; give summary.json or model_card.json)")
        return "\n".join(lines), True
    same = weights_a == weights_b
    if same:
        verdict = "weights: identical"
    elif differ:
        verdict = "weights: differ, which the differences above can explain (runtime.portable: true pins them)"
    else:
        verdict = "weights: differ on comparable hosts: a real difference (code, data or params), not the machine"
    return "\n".join([*lines, verdict]), same
