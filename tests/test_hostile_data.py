"""Hostile data and killed stages: training reads only shards that validate passed and that are
unchanged since (labels out of range, a missing shard, changed bytes all stop it with exit 2), the
DAG runs validate before training without retraining on a report rewording, and a stage removes
the temp files a killed run of it left behind, never a live process's."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import cli_env, make_params, run_in, train_params, write_params

from cifarflow.cli import main
from cifarflow.data import shards as shard_io
from cifarflow.data import tfrecord
from cifarflow.fileio import dumps_json, sha256_file, write_json_atomic

TRAIN_SHARD = "train-00001-of-00002"


@pytest.fixture
def data(tiny_shards: Path, tmp_path: Path) -> Path:
    """A private copy of the session's tiny shards (the tests damage them), and a params file for them."""
    shutil.copytree(tiny_shards, tmp_path / "shards")
    write_params(tmp_path, train_params("lenet", epochs=1).model_dump(mode="json"))
    return tmp_path / "shards"


def cli(capsys: pytest.CaptureFixture[str], root: Path, *args: str | Path, fmt: str | None = None) -> tuple[int, str]:
    """`cifarflow <args>` with the params file in `root` (data.format overridden if `fmt`); (exit code, stderr)."""
    params = root / "params.yaml"
    if fmt:
        raw = yaml.safe_load(params.read_text())
        raw["data"]["format"] = fmt
        params = root / f"params-{fmt}.yaml"
        params.write_text(yaml.safe_dump(raw, sort_keys=False))
    capsys.readouterr()
    code = main(["--params", str(params), *map(str, args)])
    return code, capsys.readouterr().err


def validate(capsys: pytest.CaptureFixture[str], shards: Path) -> tuple[int, str]:
    root = shards.parent
    return cli(
        capsys,
        root,
        "validate",
        "--shards",
        shards,
        "--metrics",
        root / "validation/metrics.json",
        "--report",
        root / "validation/report.md",
        "--verdict",
        root / "validation/verdict.json",
    )


def train(capsys: pytest.CaptureFixture[str], shards: Path, fmt: str | None = None) -> tuple[int, str]:
    root = shards.parent
    return cli(
        capsys,
        root,
        "train",
        "lenet",
        "--shards",
        shards,
        "--out",
        root / "out",
        "--runinfo",
        root / "run",
        "--checkpoints",
        root / "ckpt",
        "--verdict",
        root / "validation/verdict.json",
        fmt=fmt,
    )


def evaluate(capsys: pytest.CaptureFixture[str], shards: Path, fmt: str | None = None) -> tuple[int, str]:
    root = shards.parent
    return cli(
        capsys,
        root,
        "evaluate",
        "lenet",
        "--shards",
        shards,
        "--model",
        root / "out",
        "--out",
        root / "eval",
        "--verdict",
        root / "validation/verdict.json",
        fmt=fmt,
    )


def relabel(shards: Path, fmt: str, name: str, label: int) -> Path:
    """Rewrite one shard with every label set to `label`, and record its new sha256 in the manifest,
    so that only a label check can tell."""
    source = shard_io.read_parquet_file(shards / "parquet" / f"{name}.parquet")  # the same rows in both formats
    images, index = np.array(source.images), np.array(source.index)  # copies: the file is memory-mapped
    del source
    path = shards / fmt / f"{name}.{fmt}"
    tmp = path.with_name("rewrite")
    writer = shard_io.write_parquet if fmt == "parquet" else tfrecord.write_tfrecord
    writer(tmp, images, np.full(len(index), label, np.uint8), index)
    os.replace(tmp, path)
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["shards"][f"{fmt}/{path.name}"] = sha256_file(path)
    (shards / "manifest.json").write_text(dumps_json(manifest))
    return path


# --- (a) labels out of range ----------------------------------------------------------------------


def test_labels_out_of_range_stop_validate_and_train(data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    verdict = data.parent / "validation/verdict.json"
    assert validate(capsys, data)[0] == 0
    stale = verdict.read_bytes()
    bad = relabel(data, "parquet", TRAIN_SHARD, 200)

    code, err = validate(capsys, data)
    assert code == 2 and f"{bad}: schema violation: label 200 >= 10 classes" in err, err
    assert not verdict.exists(), "a failed validation leaves no verdict behind"

    code, err = train(capsys, data)  # no verdict at all
    assert code == 2 and f"{verdict}: not found" in err and "run the validate stage" in err, err
    verdict.write_bytes(stale)  # the verdict of the shards before the tampering
    code, err = train(capsys, data)
    assert code == 2 and "the shards changed after validation" in err and str(data / "manifest.json") in err, err
    assert not (data.parent / "out").exists() and not (data.parent / "ckpt").exists()


@pytest.mark.parametrize("fmt", ["parquet", "tfrecord"])
def test_training_checks_the_labels_it_loads(fmt: str, data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Even with a verdict forged for the tampered manifest, whichever format training reads, the labels
    it loads are checked and the shard holding the first bad one is named."""
    from cifarflow.data.verdict import write_verdict

    bad = relabel(data, fmt, TRAIN_SHARD, 200)
    write_verdict(data.parent / "validation/verdict.json", (data / "manifest.json").read_bytes())
    code, err = train(capsys, data, fmt=fmt)
    assert code == 2 and f"{bad}: label 200 >= 10 classes (125 such labels in train)" in err, err
    assert "rerun preprocess, then validate" in err
    assert not (data.parent / "out").exists()


# --- (b) a missing shard ----------------------------------------------------------------------------


def test_missing_train_shard_stops_validate_and_train(data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    verdict = data.parent / "validation/verdict.json"
    assert validate(capsys, data)[0] == 0
    missing = data / "parquet" / f"{TRAIN_SHARD}.parquet"
    missing.unlink()

    code, err = train(capsys, data)  # the verdict from before the deletion names this very manifest
    assert code == 2 and f"{missing}: listed in {data / 'manifest.json'} but missing" in err, err
    code, err = validate(capsys, data)
    assert code == 2 and f"{missing}: listed in manifest.json but missing" in err, err
    assert not verdict.exists()
    code, err = train(capsys, data)
    assert code == 2 and f"{verdict}: not found" in err, err


def test_unlisted_shard_stops_train(data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert validate(capsys, data)[0] == 0
    extra = data / "parquet" / "train-00002-of-00002.parquet"  # the loader's glob would read it
    shutil.copyfile(data / "parquet" / f"{TRAIN_SHARD}.parquet", extra)
    code, err = train(capsys, data)
    assert code == 2 and f"{extra}: not listed in {data / 'manifest.json'}" in err, err


# --- (c) shard bytes that differ from the manifest ------------------------------------------------


@pytest.mark.parametrize("fmt", ["parquet", "tfrecord"])
def test_changed_shard_bytes_stop_train_and_evaluate(fmt: str, data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert validate(capsys, data)[0] == 0  # the verdict stays, and names the unchanged manifest
    shard = data / fmt / f"val-00000-of-00002.{fmt}"
    damaged = bytearray(shard.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF  # one pixel: the shard still parses
    shard.write_bytes(bytes(damaged))
    expected = f"{shard}: sha256 differs from {data / 'manifest.json'}"
    code, err = train(capsys, data, fmt=fmt)
    assert code == 2 and expected in err and "rerun preprocess, then validate" in err, err
    code, err = evaluate(capsys, data, fmt=fmt)  # checked before the (absent) model is looked for
    assert code == 2 and expected in err, err


def test_export_checks_the_test_shards(data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert validate(capsys, data)[0] == 0
    shard = data / "parquet" / "test-00001-of-00002.parquet"
    shard.write_bytes(shard.read_bytes()[:-1])
    root = data.parent
    for extra in ([], ["--verdict", root / "validation/verdict.json"]):
        code, err = cli(
            capsys,
            root,
            "export",
            "--shards",
            data,
            "--models",
            root / "out",
            "--evals",
            root / "eval",
            "--out",
            root / "export",
            *extra,
        )
        assert code == 2 and f"{shard}: sha256 differs" in err, err


def test_validated_shards_train_and_evaluate(data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The control: the same commands on undamaged, validated shards succeed."""
    assert validate(capsys, data)[0] == 0
    verdict = json.loads((data.parent / "validation/verdict.json").read_text())
    assert verdict == {"valid": True, "manifest_sha256": sha256_file(data / "manifest.json")}
    assert train(capsys, data)[0] == 0
    assert evaluate(capsys, data)[0] == 0
    assert json.loads((data.parent / "eval/details.json").read_text())["test"]["n"] == 50


# --- (d) the DAG: validate before training, without retraining on report rewording ----------------


@pytest.mark.slow
def test_rewording_the_report_reruns_validate_only(workspace: Path) -> None:
    upstream = run_in(workspace, "dvc", "dag", "train@lenet").stdout
    assert "validate" in upstream, upstream
    lock = yaml.safe_load((workspace / "dvc.lock").read_text())["stages"]
    for stage in ("train@lenet", "evaluate@lenet", "export"):
        assert "data/validation/verdict.json" in {d["path"] for d in lock[stage]["deps"]}, stage
    verdict = (workspace / "data/validation/verdict.json").read_bytes()

    module = workspace / "cifarflow/data/validate.py"
    text = module.read_text()
    assert text.count('"# Data validation report"') == 1
    module.write_text(text.replace('"# Data validation report"', '"# Data validation report (reworded)"'))
    run_in(workspace, "dvc", "repro", "resolve")  # the cheap stage: validate's code digest changed
    status = json.loads(run_in(workspace, "dvc", "status", "--json").stdout)
    assert set(status) - {"download", "resolve"} == {"validate"}, status
    done = run_in(workspace, "dvc", "repro")
    ran = [line.split("'")[1] for line in done.stdout.splitlines() if line.startswith("Running stage")]
    assert sorted(ran) == ["download", "resolve", "validate"], done.stdout
    assert "# Data validation report (reworded)" in (workspace / "data/validation/report.md").read_text()
    assert (workspace / "data/validation/verdict.json").read_bytes() == verdict
    assert set(json.loads(run_in(workspace, "dvc", "status", "--json").stdout)) == {"download", "resolve"}


# --- (e) leftovers of killed stages -----------------------------------------------------------------


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: the PID names no process now
    return child.pid


def test_killed_preprocess_leftover_is_removed_by_the_next_run(tmp_path: Path) -> None:
    from cifarflow.data import download

    source = {"source": "synth:train=5000,test=500,seed=3", "md5": None, "val_size": 500, "shards": 2}
    download.run(make_params(**source), tmp_path / "raw", tmp_path / "cache")
    params = write_params(tmp_path, {"data": source})
    cmd = [
        sys.executable,
        "-m",
        "cifarflow",
        "--params",
        str(params),
        "preprocess",
        "--raw",
        str(tmp_path / "raw"),
        "--out",
        str(tmp_path / "shards"),
    ]
    env = {**cli_env(), "TF_CPP_MIN_LOG_LEVEL": "2"}

    killed = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while not list(tmp_path.glob(f".shards.{killed.pid}.*.tmp")):
            assert killed.poll() is None, "preprocess ended before its temp directory was seen"
            assert time.monotonic() < deadline, "no temp directory appeared"
            time.sleep(0.002)
        killed.send_signal(signal.SIGKILL)
    finally:
        if killed.poll() is None:
            killed.kill()
        killed.wait()
    assert killed.returncode == -signal.SIGKILL
    leftover = list(tmp_path.glob(".shards.*.tmp"))
    assert [p.name.split(".")[2] for p in leftover] == [str(killed.pid)] and not (tmp_path / "shards").exists()

    old_style = tmp_path / ".shards.k3x9q2ab.tmp"  # a leftover of the code before temps carried a PID
    old_style.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        live = tmp_path / f".shards.{sleeper.pid}.abcdefgh.tmp"  # a writer that is still running
        live.mkdir()
        (live / "part").write_bytes(b"in progress")
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        assert (tmp_path / "shards/manifest.json").is_file()
        assert sorted(tmp_path.glob(".shards.*")) == [live], "the killed run's and the old-style temps are gone"
        assert (live / "part").read_bytes() == b"in progress"
    finally:
        sleeper.kill()
        sleeper.wait()


def test_atomic_writes_remove_dead_writers_temps_only(tmp_path: Path) -> None:
    from cifarflow.fileio import stale_temps

    target = tmp_path / "metrics.json"
    dead = dead_pid()
    stale = [tmp_path / f".metrics.json.{dead}.a1b2c3d4.tmp", tmp_path / ".metrics.json.zz9y8x7w.tmp"]
    for path in stale:
        path.write_text("half")
    ours_earlier = tmp_path / f".metrics.json.{os.getpid()}.q1w2e3r4.tmp"  # our PID, but not made by this process
    ours_earlier.write_text("half")
    keep = [
        tmp_path / ".metrics.json.1.a1b2c3d4.tmp",  # PID 1 is always alive
        tmp_path / f".other.json.{dead}.a1b2c3d4.tmp",  # another target's
        tmp_path / f".metrics.json.v2.{dead}.a1b2c3d4.tmp",
    ]  # the temp of a target named metrics.json.v2
    for path in keep:
        path.write_text("keep")
    assert stale_temps(target) == sorted([*stale, ours_earlier])
    write_json_atomic(target, {"ok": True})
    assert json.loads(target.read_text()) == {"ok": True}
    assert sorted(tmp_path.iterdir()) == sorted([target, *keep])


def test_model_save_removes_a_killed_saves_temps(tmp_path: Path) -> None:
    import keras

    from cifarflow.models import build_model
    from cifarflow.training.trainer import save_model_atomic

    checkpoint = tmp_path / "epoch-0.keras"
    dead = dead_pid()
    leftovers = [tmp_path / f".epoch-0.keras.{dead}.a1b2c3d4.tmp", tmp_path / f".epoch-0.keras.{dead}.e5f6g7h8.tmp.keras"]
    for path in leftovers:
        path.write_bytes(b"PK half a zip")
    keras.utils.set_random_seed(0)
    model = build_model("lenet", 10, "tiny")
    save_model_atomic(model, checkpoint)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-0.keras"]
    first = checkpoint.read_bytes()
    save_model_atomic(model, checkpoint)
    assert checkpoint.read_bytes() == first, "the normalised archive is byte-stable"


# --- labels cannot shift: class names, hidden and empty folders, and the official order ----------


def class_folders(root: Path, names: list[str], per_class: int = 2, empty: tuple[str, str] | None = None) -> Path:
    """An image folder with these class folder names (PNG images), `empty` = (split, name) left empty."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in names:
            (root / split / name).mkdir(parents=True)
            if (split, name) == empty:
                continue
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / split / name / f"{i}.png")
    return root


@pytest.mark.parametrize(
    ("names", "hidden", "empty", "refused"),
    [
        (["auto\nmobile", "bird", "cat"], None, None, r"class name 'auto\\nmobile' holds a control or line-separator"),
        (["auto\u2028mobile", "bird"], None, None, r"class name 'auto\\u2028mobile' holds a control or line-separator"),
        (["bird", "cat"], ".ipynb_checkpoints", None, r"\.ipynb_checkpoints: a hidden folder among the class folders"),
        (["bird", "cat"], None, ("test", "cat"), r"test/cat: no \.png/\.jpg images in this class folder"),
        (["bird", "cat"], None, ("train", "bird"), r"train/bird: no \.png/\.jpg images in this class folder"),
        (["caf\u00e9", "cafe\u0301"], None, None, r"are the same name \(Unicode NFC\)"),
    ],
)
def test_class_folders_that_would_shift_labels_are_refused_naming_them(
    tmp_path: Path, names: list[str], hidden: str | None, empty: tuple[str, str] | None, refused: str
) -> None:
    """Before: a name with a newline became two names (bird images labelled "mobile"), a hidden
    folder became class 0 with no images, an empty class passed, NFC/NFD twins became two classes."""
    from cifarflow.data import download
    from cifarflow.errors import InputError

    root = class_folders(tmp_path / "folder", names, empty=empty)
    if hidden:
        for split in ("train", "test"):
            (root / split / hidden).mkdir()
    with pytest.raises(InputError, match=refused) as raised:
        download.run(make_params(source=str(root), md5=None), tmp_path / "raw", tmp_path / "cache")
    assert str(root) in str(raised.value)
    assert not (tmp_path / "raw").exists()


def test_cifar10_names_in_another_order_are_refused() -> None:
    from cifarflow.data import cifar_binary as cb
    from cifarflow.errors import InputError

    shuffled = [*cb.CIFAR10_CLASSES[1:], cb.CIFAR10_CLASSES[0]]
    with pytest.raises(InputError, match=r"CIFAR-10's class names in another order .*every label would name the wrong class"):
        cb.parse_meta(cb.format_meta(shuffled))
    assert cb.parse_meta(cb.format_meta(cb.CIFAR10_CLASSES)) == list(cb.CIFAR10_CLASSES)
    assert cb.parse_meta(b"sea lion\ncat\n\n") == ["sea lion", "cat"]  # a name may hold a space
    with pytest.raises(InputError, match="line-separator"):
        cb.parse_meta("bird\nauto\u2028mobile\n".encode())  # one line, never split into two names


def test_a_class_with_no_examples_fails_validate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Shards where one class has no test example: validate refuses them (exit 2) and writes no verdict."""
    from cifarflow.data import cifar_binary as cb
    from cifarflow.data import download, preprocess

    rng = np.random.default_rng(1)
    labels = np.arange(300) % 10
    test_labels = np.arange(100) % 9  # class 9, truck, never in test
    files = cb.batch_files(
        rng.integers(0, 256, (300, 32, 32, 3), dtype=np.uint8), labels.astype(np.uint8),
        rng.integers(0, 256, (100, 32, 32, 3), dtype=np.uint8), test_labels.astype(np.uint8), cb.CIFAR10_CLASSES,
    )  # fmt: skip
    archive = tmp_path / "archive.tar.gz"
    cb.write_archive(archive, files)
    params = make_params(source=str(archive), md5=None, allow_unverified=True, val_size=50, shards=2)
    download.run(params, tmp_path / "raw", tmp_path / "cache")
    preprocess.run(params, tmp_path / "raw", tmp_path / "shards")
    write_params(tmp_path, {})
    code, err = validate(capsys, tmp_path / "shards")
    assert code == 2 and "1 class(es) with no examples: truck in test" in err, err
    assert not (tmp_path / "validation/verdict.json").exists()
