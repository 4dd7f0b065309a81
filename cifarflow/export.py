"""`cifarflow export`: select the best architecture on validation, judge it by the promotion policy,
and write a servable export with a reproducible model card.

Selection: `export.metric` on val (ties: fewer parameters). McNemar's exact test on the paired
val predictions says whether the winner is significantly better than the runner-up. The verdict
is cifarflow.policy's, against the champion as it is now (its SavedModel re-scored on this test
split, and on the benchmark when a robustness gate asks): every check with its reason, blessed
only when all pass. An unblessed export is still written, with its verdict. The serving check
loads the SavedModel in a fresh process with no project code and must reproduce evaluate's
calibrated test predictions.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from cifarflow import leaderboard, numerics, policy, registry
from cifarflow.contract import (
    HEATMAP,
    LABELS,
    MANIFEST,
    MODEL,
    MODEL_CARD,
    MODEL_CARD_MD,
    RELIABILITY,
    ROBUSTNESS,
    RUN_INFO,
    SAVED_MODEL,
    predictions,
    read_json,
    read_metrics,
    read_summary,
)
from cifarflow.errors import CifarflowError, InputError
from cifarflow.evaluate import read_predictions
from cifarflow.fileio import atomic_dir, dumps_json, sha256_file, write_json_atomic
from cifarflow.pixels import IMAGE_SHAPE
from cifarflow.provenance import describe, git_provenance
from cifarflow.serving import SERVING_BATCH, rescore, served_digests, write_served_manifest
from cifarflow.settings import Params
from cifarflow.sources import DATA_DESCRIBED

PROB_TOLERANCE = 1e-5  # SavedModel vs evaluate, per probability: float32 graphs that differ in fusion
TIE_MARGIN = 1e-6  # top-two probabilities this close may swap their argmax
SERVING_ERROR_TAIL = 3000  # characters of a failed serving check's stderr shown: its traceback's end


def mcnemar(first_correct: np.ndarray, second_correct: np.ndarray) -> dict[str, Any]:
    """Exact McNemar test on paired predictions: only the discordant pairs count."""
    from scipy.stats import binomtest

    only_first = int(np.sum(first_correct & ~second_correct))
    only_second = int(np.sum(~first_correct & second_correct))
    n = only_first + only_second
    p_value = 1.0 if n == 0 else float(binomtest(min(only_first, only_second), n, 0.5).pvalue)
    return {"only_winner_right": only_first, "only_runner_up_right": only_second, "p_value": float(f"{p_value:.6g}")}


def save_serving_model(model: Any, normalization: str, temperature: float, path: Path) -> None:
    """A SavedModel whose serving signature takes raw uint8 [N, 32, 32, 3] and returns calibrated
    class probabilities: the recipe's normalization and evaluate's temperature live inside the graph."""
    import keras
    import tensorflow as tf

    from cifarflow.calibration import calibrated_tf
    from cifarflow.normalization import normalize

    # The random layers' seed states (dropout's) are inert when serving (training=False), but they are
    # variables of the SavedModel, and Keras draws them afresh at every load_model (model.keras does not
    # keep them): fixed here, so the served digest depends on the weights alone, not on what the
    # process drew before (found by the fan-out's test: same model.keras, another served digest).
    for layer in model._flatten_layers(include_self=False):
        for generator in getattr(layer, "_seed_generators", []):
            generator.state.assign(tf.zeros_like(generator.state))
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
batch = {SERVING_BATCH}
probs = [list(serve(images=tf.constant(images[i:i + batch])).values())[0].numpy() for i in range(0, len(images), batch)]
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
            raise CifarflowError(f"serving check: loading or running the SavedModel failed:\n{done.stderr[-SERVING_ERROR_TAIL:]}")
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


def check_robustness_measured(params: Params, arch: str, metrics: dict[str, Any], evals: Path, corrupt_dir: Path | None) -> None:
    """A robustness gate that is set must have something to judge: the winner's benchmark scores,
    and (to re-score the champion on) the corrupt stage's folder."""
    gates = params.export
    gate = "robustness_vs_champion" if gates.robustness_vs_champion else None
    gate = gate or ("min_corruption_accuracy" if gates.min_corruption_accuracy is not None else None)
    if gate and ROBUSTNESS not in metrics:
        raise InputError(
            f"export.{gate} is set but {evals / arch} has no corruption benchmark: "
            f"run evaluate@{arch} with --corrupt (dvc repro runs it), or unset the gate"
        )
    if gates.robustness_vs_champion and corrupt_dir is None:
        raise InputError("export.robustness_vs_champion is set: export needs the corrupt stage's folder (--corrupt)")


def judge(
    params: Params, model: policy.Candidate, digest: str, champion_dir: Path, shards_dir: Path, corrupt_dir: Path | None
) -> policy.Verdict:
    """The policy's verdict on `model` (weights `digest`) against the registry's champion as it is now."""
    found = registry.current(champion_dir)
    champion = rescore(champion_dir, found, shards_dir, corrupt_dir, params) if found else None
    return policy.decide(model, champion, params.export, registry.rolled_back(champion_dir).get(digest))


def run(
    params: Params,
    shards_dir: Path,
    models: Path,
    evals: Path,
    out: Path,
    champion_dir: Path,
    project: Path,
    runinfo: Path | None = None,
    train_runinfo: Path | None = None,
    verdict: Path | None = None,
    corrupt_dir: Path | None = None,
) -> dict:
    from cifarflow.data.verdict import check_shards
    from cifarflow.models.registry import load_model
    from cifarflow.resolved import settings_sha256

    checked = check_shards(shards_dir, verdict, "parquet", ("test",))  # the test split export reads: validated and unchanged
    import keras
    import tensorflow as tf

    shards_dir, models, evals, out = Path(shards_dir), Path(models), Path(evals), Path(out)
    manifest = checked.manifest
    ranked = leaderboard.rank(leaderboard.rows(params.archs, evals, models), params.export.metric)
    winner = ranked[0]
    comparison = None
    if len(ranked) > 1:
        runner = ranked[1]
        labels, winner_probs = read_predictions(evals / winner.arch / predictions("val"))
        _, runner_probs = read_predictions(evals / runner.arch / predictions("val"))
        test = mcnemar(winner_probs.argmax(1) == labels, runner_probs.argmax(1) == labels)
        comparison = {"runner_up": runner.arch, **test, "significant": test["p_value"] < params.export.significance}
    winner_metrics = read_metrics(evals, winner.arch)
    check_robustness_measured(params, winner.arch, winner_metrics, evals, corrupt_dir)
    trained = read_summary(models, winner.arch)
    digest = trained["weights_sha256"]
    manifest_sha256 = sha256_file(shards_dir / MANIFEST)
    model = policy.Candidate.of(winner.arch, winner_metrics, manifest["source"]["kind"], manifest_sha256)
    judged = judge(params, model, digest, Path(champion_dir), shards_dir, corrupt_dir)
    metric = params.export.metric
    tied = len(ranked) > 1 and getattr(ranked[1], metric) == getattr(winner, metric)
    why = f"best {metric} on val ({getattr(winner, metric):.4f}) among {len(ranked)} architectures" + (
        ", fewest parameters among the tied" if tied else ""
    )
    card = {
        "arch": winner.arch,
        "why": why,
        "selection_metric": metric,
        "leaderboard": [r.record() for r in ranked],
        "comparison": comparison,
        "val": winner_metrics["val"],  # headline figures and details (per-class accuracy)
        "test": winner_metrics["test"],
        "temperature": winner_metrics["temperature"],  # served probabilities are calibrated with it
        "test_calibrated": winner_metrics["test_calibrated"],
        "robustness": winner_metrics.get(ROBUSTNESS),  # mCA with its bootstrap CI, and the grid
        "verdict": judged.record(),
        "profile": params.profile,
        "data_source_kind": model.data_source_kind,
        "weights_sha256": digest,
        "data_manifest_sha256": manifest_sha256,
        "settings_sha256": settings_sha256(params, "export"),  # what this stage read of params.yaml, resolved
        "provenance": git_provenance(project),  # the project's commit, and a private workspace's snapshot
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__},
        "trained_on": trained.get("numerics"),  # the host kind and libraries that decided the weights' bits
        "classes": checked.classes,
    }
    _, expected = read_predictions(evals / winner.arch / predictions("test"))
    with atomic_dir(out) as tmp:
        keras_model = load_model(models / winner.arch / MODEL)
        save_serving_model(keras_model, params.recipe(winner.arch).normalization, card["temperature"], tmp / SAVED_MODEL)
        card["serving_check"] = serving_check(tmp / SAVED_MODEL, shards_dir, expected)
        shutil.copyfile(models / winner.arch / MODEL, tmp / MODEL)
        shutil.copyfile(evals / winner.arch / RELIABILITY, tmp / RELIABILITY)
        if card["robustness"]:
            shutil.copyfile(evals / winner.arch / HEATMAP, tmp / HEATMAP)
        (tmp / LABELS).write_text(dumps_json(checked.classes))  # JSON: no name can split into two
        card["served"] = served_digests(tmp)  # reproducible: the weights the SavedModel holds, the labels
        write_served_manifest(tmp)  # every served file's sha256 (the SavedModel's bytes differ run to run)
        (tmp / MODEL_CARD).write_text(dumps_json(card))
        (tmp / MODEL_CARD_MD).write_text(model_card_md(card))
    if runinfo is not None:  # run-dependent facts stay out of the card, which must be reproducible
        info = Path(train_runinfo or "") / winner.arch / RUN_INFO
        write_json_atomic(
            runinfo,
            {
                "arch": winner.arch,
                "train_run": read_json(info, f"train@{winner.arch}") if train_runinfo and info.is_file() else None,
            },
        )
    return card


def model_card_md(card: dict[str, Any]) -> str:
    verdict = "**blessed**" if card["verdict"]["blessed"] else "**not blessed**"
    champion = card["verdict"]["champion"]
    against = (
        f"the champion {champion['version']} (test accuracy {champion['test_accuracy']:.4f}, re-scored on this test split)"
        if champion
        else "no champion (the registry was empty)"
    )
    data = DATA_DESCRIBED.get(card["data_source_kind"], card["data_source_kind"])
    lines = [
        f"# Model card: {card['arch']}",
        "",
        f"Profile `{card['profile']}`, trained and tested on {data}.",
        "",
        f"Chosen: {card['why']}.",
        "",
        f"Verdict: {verdict}, computed against {against}",
        *policy.markdown(card["verdict"]),
        "",
        "## Leaderboard (selection on val; test reported, not used to choose)",
        "",
        *leaderboard.markdown(card["leaderboard"]),
    ]
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
        mca = leaderboard.interval(robust["mca"], (robust["ci95_low"], robust["ci95_high"]))
        lines += [
            "## Robustness to corruptions",
            "",
            f"Mean corruption accuracy (mCA, over {len(robust['grid'])} corruptions x "
            f"{len(next(iter(robust['grid'].values())))} severities of {robust['n']} stratified test images, "
            f"re-implementations of CIFAR-10-C's): {mca} "
            "(95% CI, bootstrap over images); clean accuracy on the same images "
            f"{leaderboard.pct(robust['clean_accuracy'])}, relative mCA {robust['relative_mca']:.3f}. Not directly comparable "
            "with published CIFAR-10-C figures: the corruptions are a re-implementation, applied to this test split.",
            "",
            f"![accuracy per corruption and severity]({HEATMAP})",
            "",
        ]
    lines += [
        "## Provenance",
        "",
        f"- data manifest sha256: `{card['data_manifest_sha256']}`",
        f"- settings sha256 (what export read of params.yaml, resolved): `{card['settings_sha256']}`",
        f"- {describe(card['provenance'])}",
        f"- served weights sha256 (the SavedModel's variables): `{card['served']['weights_sha256']}`",
        f"- TensorFlow {card['versions']['tensorflow']}, Keras {card['versions']['keras']}",
        f"- trained on: {numerics.describe(card['trained_on'])}",
        f"- serving check: {card['serving_check']['images']} test images, max probability difference "
        f"{card['serving_check']['max_probability_difference']:.1e}",
    ]
    return "\n".join(lines) + "\n"
