"""`cifarflow export`: select the best architecture on validation, gate it (blessing), and write a
servable export with a reproducible model card.

Selection: `export.metric` on val (ties: fewer parameters). McNemar's exact test on the paired
val predictions says whether the winner is significantly better than the runner-up. Blessing:
test accuracy >= `export.min_accuracy`, and not below the champion's (re-scored now, on this
test split) by more than `export.tolerance`. An unblessed export is still written, with
`blessed: false` and the reasons. The serving check loads the SavedModel in a fresh process
with no project code and must reproduce evaluate's test predictions.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cifarflow import registry
from cifarflow.config import Params
from cifarflow.data.layout import IMAGE_SHAPE, MANIFEST
from cifarflow.errors import CifarflowError, InputError
from cifarflow.evaluate import HEATMAP, RELIABILITY, ROBUSTNESS, read_metrics, read_predictions
from cifarflow.fileio import atomic_dir, dumps_json, sha256_file, write_json_atomic

SAVED_MODEL = "saved_model"
PROB_TOLERANCE = 1e-5  # SavedModel vs evaluate, per probability
TIE_MARGIN = 1e-6  # top-two probabilities this close may swap their argmax


@dataclass
class Entry:
    """One architecture's line of the leaderboard."""

    arch: str
    params: int
    epochs: int
    val_accuracy: float
    val_ci95: list[float]
    val_loss: float
    test_accuracy: float
    test_ci95: list[float]
    test_loss: float
    mca: float | None = None  # mean corruption accuracy, when evaluate scored the benchmark
    mca_ci95: list[float] | None = None  # bootstrap over images


def leaderboard(archs: list[str], evals: Path, models: Path) -> list[Entry]:
    """One Entry per arch, in the order of `archs`, from the evaluate and train stages' outputs."""
    rows = []
    for arch in archs:
        metrics_path, summary_path = evals / arch / "metrics.json", models / arch / "summary.json"
        for path, stage in ((metrics_path, f"evaluate@{arch}"), (summary_path, f"train@{arch}")):
            if not path.is_file():
                raise InputError(f"{path}: not found; run the {stage} stage first")
        m, s = json.loads(metrics_path.read_text()), json.loads(summary_path.read_text())
        robust = m.get(ROBUSTNESS)
        rows.append(
            Entry(
                arch,
                s["params"],
                s["epochs"],
                m["val"]["accuracy"],
                [m["val"]["ci95_low"], m["val"]["ci95_high"]],
                m["val"]["loss"],
                m["test"]["accuracy"],
                [m["test"]["ci95_low"], m["test"]["ci95_high"]],
                m["test"]["loss"],
                robust and robust["mca"],
                robust and [robust["ci95_low"], robust["ci95_high"]],
            )
        )
    if not rows:
        raise InputError("archs is empty: nothing to export; list at least one architecture in params.yaml archs:")
    return rows


def rank(rows: list[Entry], metric: str) -> list[Entry]:
    """Best first by `metric` on val; ties go to fewer parameters, then to the name."""
    sign = -1 if metric == "val_accuracy" else 1
    return sorted(rows, key=lambda r: (sign * getattr(r, metric), r.params, r.arch))


def select(archs: list[str], metric: str, evals: Path, models: Path) -> list[Entry]:
    """The leaderboard of `archs` from their evaluation and training outputs, ranked: the first is exported."""
    return rank(leaderboard(archs, Path(evals), Path(models)), metric)


def mcnemar(first_correct: np.ndarray, second_correct: np.ndarray) -> dict[str, Any]:
    """Exact McNemar test on paired predictions: only the discordant pairs count."""
    from scipy.stats import binomtest

    only_first = int(np.sum(first_correct & ~second_correct))
    only_second = int(np.sum(~first_correct & second_correct))
    n = only_first + only_second
    p_value = 1.0 if n == 0 else float(binomtest(min(only_first, only_second), n, 0.5).pvalue)
    return {"only_winner_right": only_first, "only_runner_up_right": only_second, "p_value": float(f"{p_value:.6g}")}


@dataclass
class Robustness:
    """The blessing's optional robustness gates and what they compare (mean corruption accuracy)."""

    mca: float | None  # the winner's, from its evaluation
    min_mca: float | None = None  # export.min_corruption_accuracy
    champion_mca: float | None = None  # re-scored now; None with no champion or with the gate off
    vs_champion: bool = False  # export.robustness_vs_champion


def bless(
    accuracy: float, champion: float | None, min_accuracy: float, tolerance: float, robust: Robustness | None = None
) -> tuple[bool, list[str]]:
    """The verdict and its reasons, one per check."""
    reasons = []
    ok_threshold = accuracy >= min_accuracy
    reasons.append(f"test accuracy {accuracy:.4f} {'>=' if ok_threshold else '<'} export.min_accuracy {min_accuracy}")
    ok_champion = True
    if champion is None:
        reasons.append("no champion to compare with")
    else:
        ok_champion = accuracy >= champion - tolerance
        reasons.append(
            f"test accuracy {accuracy:.4f} is {'within' if ok_champion else 'more than'} export.tolerance "
            f"{tolerance} of the champion's {champion:.4f} (re-scored on this test split)"
        )
    ok_robust = True
    if robust is not None and robust.mca is not None:
        if robust.min_mca is not None:
            ok = robust.mca >= robust.min_mca
            ok_robust &= ok
            reasons.append(
                f"mean corruption accuracy {robust.mca:.4f} {'>=' if ok else '<'} export.min_corruption_accuracy {robust.min_mca}"
            )
        if robust.vs_champion and robust.champion_mca is None:
            reasons.append("no champion to compare robustness with")
        elif robust.vs_champion:
            ok = robust.mca >= robust.champion_mca - tolerance
            ok_robust &= ok
            reasons.append(
                f"mean corruption accuracy {robust.mca:.4f} is {'within' if ok else 'more than'} export.tolerance "
                f"{tolerance} of the champion's {robust.champion_mca:.4f} (re-scored on this benchmark)"
            )
    return ok_threshold and ok_champion and ok_robust, reasons


def save_serving_model(model: Any, normalization: str, temperature: float, path: Path) -> None:
    """A SavedModel whose serving signature takes raw uint8 [N, 32, 32, 3] and returns calibrated
    class probabilities: the recipe's normalization and evaluate's temperature live inside the graph."""
    import keras
    import tensorflow as tf

    from cifarflow.calibration import calibrated_tf
    from cifarflow.models.normalization import normalize

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        name="serving_default",
        fn=lambda images: calibrated_tf(model(normalize(images, normalization), training=False), temperature),
        input_signature=[tf.TensorSpec([None, *IMAGE_SHAPE], tf.uint8, name="images")],
    )
    archive.write_out(str(path), verbose=False)


# Runs in a fresh interpreter: TensorFlow, numpy and pyarrow only, nothing from this project.
SERVING_CHECK = f"""
import sys, numpy as np, pyarrow.parquet as pq, tensorflow as tf
saved_model, out, shards = sys.argv[1], sys.argv[2], sys.argv[3:]
serve = tf.saved_model.load(saved_model).signatures["serving_default"]
images = np.concatenate([np.frombuffer(b"".join(pq.read_table(s, columns=["image"]).column("image").to_pylist()),
                                       np.uint8).reshape(-1, *{IMAGE_SHAPE!r}) for s in shards])  # uint8 HWC
probs = [list(serve(images=tf.constant(images[i:i + 500])).values())[0].numpy() for i in range(0, len(images), 500)]
np.save(out, np.concatenate(probs))
"""


def serving_check(saved_model: Path, shards_dir: Path, expected: np.ndarray) -> dict[str, Any]:
    """Load the SavedModel in a fresh process and compare with evaluate's test predictions."""
    from cifarflow.data import shards

    test_shards = [str(p.resolve()) for p in shards.shard_paths(shards_dir, "test", "parquet")]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "probs.npy"
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"TF_CPP_MIN_LOG_LEVEL": "2"}
        done = subprocess.run(
            [sys.executable, "-c", SERVING_CHECK, str(saved_model.resolve()), str(out), *test_shards],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp,
        )
        if done.returncode != 0:
            raise CifarflowError(f"serving check: loading or running the SavedModel failed:\n{done.stderr[-3000:]}")
        served = np.load(out)
    if served.shape != expected.shape:
        raise CifarflowError(f"serving check: SavedModel gave {served.shape} probabilities, evaluate {expected.shape}")
    top2 = np.sort(expected, axis=1)[:, -2:]
    near_tie = (top2[:, 1] - top2[:, 0]) <= TIE_MARGIN
    disagree = (served.argmax(axis=1) != expected.argmax(axis=1)) & ~near_tie
    max_diff = float(np.max(np.abs(served - expected))) if len(expected) else 0.0
    if disagree.any() or max_diff > PROB_TOLERANCE:
        raise CifarflowError(
            f"serving check failed: {int(disagree.sum())} argmax disagreements (near-ties excluded), "
            f"max probability difference {max_diff:.2e} (allowed {PROB_TOLERANCE})"
        )
    return {
        "images": len(expected),
        "argmax_disagreements": 0,
        "near_ties": int(near_tie.sum()),
        "max_probability_difference": max_diff,
    }


def served_correct(serve: Any, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per image, whether a serving signature's argmax is the label (batches of 500)."""
    import tensorflow as tf

    predicted = [
        next(iter(serve(images=tf.constant(images[i : i + 500])).values())).numpy().argmax(1) for i in range(0, len(images), 500)
    ]
    return np.concatenate(predicted) == labels if predicted else np.zeros(0, bool)


def load_serving(saved: Path) -> Any:
    import tensorflow as tf

    return tf.saved_model.load(str(saved)).signatures["serving_default"]


def saved_model_accuracy(saved: Path, shards_dir: Path) -> float:
    """A SavedModel's accuracy on the test split of `shards_dir`, through its serving signature."""
    from cifarflow.data import shards

    test = shards.read_parquet(shards.shard_paths(shards_dir, "test", "parquet"))
    return round(float(np.mean(served_correct(load_serving(saved), test.images, test.labels))), 6)


def saved_model_mca(saved: Path, corrupt_dir: Path, params: Params) -> float:
    """A SavedModel's mean corruption accuracy on the corrupt stage's cells, through its serving signature."""
    from cifarflow.data import corrupt

    _, splits = corrupt.load(corrupt_dir, params)
    serve = load_serving(saved)
    cells = [splits[corrupt.cell(*c)] for c in corrupt.cells(params)]
    return round(float(np.mean([served_correct(serve, c.images, c.labels).mean() for c in cells])), 6)


def champion_score(registry_dir: Path, shards_dir: Path) -> dict[str, Any] | None:
    """The current champion (version, weights digest) and its accuracy on this test split, re-scored
    now (cached per weights and data manifest), or None when the registry has no champion."""
    champion = registry.current(registry_dir)
    if champion is None:
        return None
    manifest = sha256_file(shards_dir / MANIFEST)
    accuracy = registry.cached_score(
        registry_dir, champion, manifest, lambda v: saved_model_accuracy(v.path / SAVED_MODEL, shards_dir)
    )
    return {"version": champion.name, "weights_sha256": champion.digest, "test_accuracy": accuracy}


def champion_mca(registry_dir: Path, corrupt_dir: Path, params: Params) -> float | None:
    """The current champion's mCA on this corruption benchmark, re-scored now (cached per weights
    and the corrupt stage's manifest), or None when the registry has no champion."""
    champion = registry.current(registry_dir)
    if champion is None:
        return None
    manifest = sha256_file(Path(corrupt_dir) / MANIFEST)
    return registry.cached_score(
        registry_dir, champion, manifest, lambda v: saved_model_mca(v.path / SAVED_MODEL, corrupt_dir, params), key="mca"
    )


def robustness_gates(
    params: Params, arch: str, measured: dict[str, Any] | None, evals: Path, corrupt_dir: Path | None
) -> Robustness:
    """The blessing's robustness gates for the winner; a gate that is set but cannot be checked is an error."""
    gates = params.export
    gate = "min_corruption_accuracy" if gates.min_corruption_accuracy is not None else None
    gate = "robustness_vs_champion" if gates.robustness_vs_champion else gate
    if gate and measured is None:
        raise InputError(
            f"export.{gate} is set but {evals / arch / 'metrics.json'} has no corruption benchmark: "
            f"run evaluate@{arch} with --corrupt (dvc repro runs it), or unset the gate"
        )
    champion = None
    if gates.robustness_vs_champion:
        if corrupt_dir is None:
            raise InputError("export.robustness_vs_champion is set: export needs the corrupt stage's folder (--corrupt)")
        champion = champion_mca(Path(gates.champion_dir), Path(corrupt_dir), params)
    return Robustness(measured and measured["mca"], gates.min_corruption_accuracy, champion, gates.robustness_vs_champion)


def git_commit() -> str | None:
    done = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def params_hash(params: Params) -> str:
    return hashlib.sha256(dumps_json(params.model_dump(mode="json")).encode()).hexdigest()


def run(
    params: Params,
    shards_dir: Path,
    models: Path,
    evals: Path,
    out: Path,
    runinfo: Path | None = None,
    train_runinfo: Path | None = None,
    verdict: Path | None = None,
    corrupt_dir: Path | None = None,
) -> dict:
    from cifarflow.data.verdict import check_shards
    from cifarflow.models.registry import load_model

    check_shards(shards_dir, verdict, "parquet", ("test",))  # the test split export reads: validated and unchanged
    import keras
    import tensorflow as tf

    shards_dir, models, evals, out = Path(shards_dir), Path(models), Path(evals), Path(out)
    manifest = json.loads((shards_dir / MANIFEST).read_text())
    classes = manifest["classes"]
    ranked = select(params.archs, params.export.metric, evals, models)
    winner = ranked[0]
    comparison = None
    if len(ranked) > 1:
        runner = ranked[1]
        labels, winner_probs = read_predictions(evals / winner.arch / "predictions_val.csv")
        _, runner_probs = read_predictions(evals / runner.arch / "predictions_val.csv")
        test = mcnemar(winner_probs.argmax(1) == labels, runner_probs.argmax(1) == labels)
        comparison = {"runner_up": runner.arch, **test, "significant": test["p_value"] < params.export.significance}
    champion = champion_score(Path(params.export.champion_dir), shards_dir)
    winner_metrics = read_metrics(evals / winner.arch)
    robust = robustness_gates(params, winner.arch, winner_metrics.get(ROBUSTNESS), evals, corrupt_dir)
    if champion and robust.champion_mca is not None:
        champion["mca"] = robust.champion_mca
    blessed, reasons = bless(
        winner.test_accuracy, champion and champion["test_accuracy"], params.export.min_accuracy, params.export.tolerance, robust
    )
    source_kind = manifest["source"]["kind"]
    if source_kind == "synth":  # a verdict on generated data says nothing about real photos
        reasons.append("trained and tested on synthetic data (data.source synth:...): never promotable without --force")
    metric = params.export.metric
    tied = len(ranked) > 1 and getattr(ranked[1], metric) == getattr(winner, metric)
    why = f"best {metric} on val ({getattr(winner, metric):.4f}) among {len(ranked)} architectures" + (
        ", fewest parameters among the tied" if tied else ""
    )
    card = {
        "arch": winner.arch,
        "why": why,
        "selection_metric": params.export.metric,
        "leaderboard": [asdict(r) for r in ranked],
        "comparison": comparison,
        "val": winner_metrics["val"],  # headline figures and details (per-class accuracy)
        "test": winner_metrics["test"],
        "temperature": winner_metrics["temperature"],  # served probabilities are calibrated with it
        "test_calibrated": winner_metrics["test_calibrated"],
        "robustness": winner_metrics.get(ROBUSTNESS),  # mCA with its bootstrap CI, and the grid
        "blessed": blessed,
        "blessing_reasons": reasons,
        "champion": champion,
        "profile": params.profile,
        "data_source_kind": source_kind,
        "weights_sha256": json.loads((models / winner.arch / "summary.json").read_text())["weights_sha256"],
        "data_manifest_sha256": sha256_file(shards_dir / MANIFEST),
        "params_sha256": params_hash(params),
        "git_commit": git_commit(),
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__},
        "classes": classes,
    }
    _, expected = read_predictions(evals / winner.arch / "predictions_test.csv")
    with atomic_dir(out) as tmp:
        model = load_model(models / winner.arch / "model.keras")
        save_serving_model(model, params.recipe(winner.arch).normalization, card["temperature"], tmp / SAVED_MODEL)
        card["serving_check"] = serving_check(tmp / SAVED_MODEL, shards_dir, expected)
        shutil.copyfile(models / winner.arch / "model.keras", tmp / "model.keras")
        shutil.copyfile(evals / winner.arch / RELIABILITY, tmp / RELIABILITY)
        if card["robustness"]:
            shutil.copyfile(evals / winner.arch / HEATMAP, tmp / HEATMAP)
        (tmp / "labels.txt").write_text("\n".join(classes) + "\n")
        (tmp / "model_card.json").write_text(dumps_json(card))
        (tmp / "MODEL_CARD.md").write_text(model_card_md(card))
    if runinfo is not None:  # run-dependent facts stay out of the card, which must be reproducible
        info = Path(train_runinfo or "") / winner.arch / "run.json"
        write_json_atomic(
            runinfo,
            {"arch": winner.arch, "train_run": json.loads(info.read_text()) if train_runinfo and info.is_file() else None},
        )
    return card


def _pct(value: float) -> str:
    return f"{100 * value:.2f}%"


def model_card_md(card: dict[str, Any]) -> str:
    verdict = "**blessed**" if card["blessed"] else "**not blessed**"
    champion = card["champion"]
    against = (
        f"the champion {champion['version']} (test accuracy {champion['test_accuracy']:.4f}, re-scored on this test split)"
        if champion
        else "no champion (the registry was empty)"
    )
    data = {
        "synth": "**synthetic** (generated) data",
        "archive": "a CIFAR-10 binary archive",
        "image-folder": "an image folder",
    }.get(card["data_source_kind"], card["data_source_kind"])
    lines = [
        f"# Model card: {card['arch']}",
        "",
        f"Profile `{card['profile']}`, trained and tested on {data}.",
        "",
        f"Chosen: {card['why']}.",
        "",
        f"Verdict: {verdict}, computed against {against}",
        *[f"- {r}" for r in card["blessing_reasons"]],
        "",
        "## Leaderboard (selection on val; test reported, not used to choose)",
        "",
        "| arch | params | epochs | val accuracy (95% CI) | val loss | test accuracy (95% CI) | mCA (95% CI) |",
        "|---|---:|---:|---|---:|---|---|",
    ]
    for r in card["leaderboard"]:
        mca = f"{_pct(r['mca'])} ({_pct(r['mca_ci95'][0])}–{_pct(r['mca_ci95'][1])})" if r.get("mca") is not None else "–"
        lines.append(
            f"| {r['arch']} | {r['params']:,} | {r['epochs']} | {_pct(r['val_accuracy'])} "
            f"({_pct(r['val_ci95'][0])}–{_pct(r['val_ci95'][1])}) | {r['val_loss']:.4f} | "
            f"{_pct(r['test_accuracy'])} ({_pct(r['test_ci95'][0])}–{_pct(r['test_ci95'][1])}) | {mca} |"
        )
    c = card["comparison"]
    if c:
        lines += [
            "",
            f"Winner vs runner-up ({c['runner_up']}), McNemar exact test on val: only the winner right "
            f"{c['only_winner_right']}, only the runner-up right {c['only_runner_up_right']}, "
            f"p = {c['p_value']:.4g}: {'significantly better' if c['significant'] else 'not significantly better'}.",
        ]
    raw, calibrated = card["test"], card["test_calibrated"]
    lines += [
        "",
        "## Confidence calibration",
        "",
        f"Served probabilities are divided in log space by a temperature T = {card['temperature']:.3f}, fitted on val "
        "NLL (argmax unchanged). On test, before → after: expected calibration error (top-label, 15 equal-width "
        f"bins) {raw['ece']:.4f} → {calibrated['ece']:.4f}, NLL {raw['loss']:.4f} → {calibrated['loss']:.4f}, "
        f"Brier {raw['brier']:.4f} → {calibrated['brier']:.4f}.",
        "",
        f"![reliability diagram]({RELIABILITY})",
        "",
    ]
    robust = card["robustness"]
    if robust:
        lines += [
            "## Robustness to corruptions",
            "",
            f"Mean corruption accuracy (mCA, over {len(robust['grid'])} corruptions x "
            f"{len(next(iter(robust['grid'].values())))} severities of {robust['n']} stratified test images, "
            f"re-implementations of CIFAR-10-C's): {_pct(robust['mca'])}, 95% CI {_pct(robust['ci95_low'])}–"
            f"{_pct(robust['ci95_high'])} (bootstrap over images); clean accuracy on the same images "
            f"{_pct(robust['clean_accuracy'])}, relative mCA {robust['relative_mca']:.3f}. Not directly comparable "
            "with published CIFAR-10-C figures: the corruptions are a re-implementation, applied to this test split.",
            "",
            f"![accuracy per corruption and severity]({HEATMAP})",
            "",
        ]
    lines += [
        "## Provenance",
        "",
        f"- data manifest sha256: `{card['data_manifest_sha256']}`",
        f"- params sha256: `{card['params_sha256']}`",
        f"- git commit: `{card['git_commit']}`",
        f"- TensorFlow {card['versions']['tensorflow']}, Keras {card['versions']['keras']}",
        f"- serving check: {card['serving_check']['images']} test images, max probability difference "
        f"{card['serving_check']['max_probability_difference']:.1e}",
    ]
    return "\n".join(lines) + "\n"
