"""Hostile-input suite, second round: no hang, no wedge, no NaN at exit 0, and no failure that looks
like something it is not. FIFOs where pipeline files belong, non-finite model outputs, a full or
read-only disk, a NUL byte in a source, settings DVC would read otherwise than the check does, an
unwritable PREFECT_HOME, unbounded command-line sizes. Each is a clear error in its class, bounded."""

from __future__ import annotations

import errno
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
from conftest import REPO, cli_env, make_params, train_params, write_params

from cifarflow.cli import main, write_failure
from cifarflow.errors import ConfigError, InputError
from cifarflow.settings import resolve

HANG_GUARD_S = 60  # a FIFO read blocks forever: the subprocess is killed past this, and the test fails


def cifarflow(*args: str, cwd: Path, timeout: float = HANG_GUARD_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cifarflow", *args], cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=timeout
    )


def test_a_fifo_as_params_yaml_is_refused_at_once(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "params.yaml")
    done = cifarflow("params", "--check", cwd=tmp_path)
    assert done.returncode == 2 and "params.yaml: is a FIFO (named pipe), not a regular file" in done.stderr, done.stderr


@pytest.mark.parametrize("which", ["verdict", "manifest"])
def test_a_fifo_as_a_verdict_or_a_manifest_is_refused_at_once(
    which: str, tiny_shards: Path, verdict: Path, tmp_path: Path
) -> None:
    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    copied = tmp_path / "verdict.json"
    shutil.copy2(verdict, copied)
    victim = copied if which == "verdict" else shards / "manifest.json"
    victim.unlink()
    os.mkfifo(victim)
    write_params(tmp_path, train_params().model_dump(mode="json"))
    done = cifarflow(
        *("train", "lenet", "--shards", str(shards), "--out", "o", "--runinfo", "r", "--checkpoints", "c"),
        *("--verdict", str(copied)),
        cwd=tmp_path,
    )
    assert done.returncode == 2 and f"{victim}: is a FIFO (named pipe), not a regular file" in done.stderr, done.stderr[-2000:]


def test_a_nul_byte_in_a_source_is_a_config_error_not_a_traceback(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data.source: .*control or non-printable character \(not shown\)"):
        resolve({"data": {"source": "/tmp/a\0b.tgz", "md5": None, "allow_unverified": True}})
    write_params(tmp_path, {"data": {"source": "/tmp/a\0b.tgz", "md5": None, "allow_unverified": True}})
    done = cifarflow("params", "--check", cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr


def test_archs_in_a_profile_overlay_is_refused_where_dvc_would_ignore_it() -> None:
    with pytest.raises(ConfigError, match=r"profiles.smoke.archs: DVC's foreach reads the top-level archs"):
        resolve(
            {
                "profile": "smoke",
                "profiles": {"smoke": {"archs": ["lenet"]}},
                "train": {"lenet": train_params().train["lenet"].model_dump()},
            }
        )


def test_synth_archive_sizes_are_bounded_on_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["synth-archive", str(tmp_path / "a.tgz"), "--train", "1000000000", "--test", "10"])
    assert code == 2 and "synth train=1000000000" in capsys.readouterr().err and not (tmp_path / "a.tgz").exists()


@pytest.mark.parametrize(
    ("code", "text"),
    [(errno.ENOSPC, "No space left on device"), (errno.EROFS, "Read-only file system"), (errno.EFBIG, "File too large")],
)
def test_a_disk_that_cannot_be_written_is_one_line_naming_the_file(
    code: int, text: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stage fails (exit 1, retried by the flow), names the file and the reason, prints no traceback,
    and leaves the previous output as it was (atomic writes)."""
    from cifarflow import resolved

    write_params(tmp_path, make_params(source="synth:train=100,test=50", md5=None, val_size=20, shards=2).model_dump(mode="json"))
    out = tmp_path / "resolved"
    assert main(["--params", str(tmp_path / "params.yaml"), "resolve", "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.rglob("*.json")}

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(code, os.strerror(code))  # as f.write raises it: no file name

    monkeypatch.setattr(resolved, "dumps_json", full)
    capsys.readouterr()
    assert main(["--params", str(tmp_path / "params.yaml"), "resolve", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot write {out}: {text}" in err and "Traceback" not in err  # the output it was writing
    assert {p.name: p.read_bytes() for p in out.rglob("*.json")} == before
    assert write_failure(OSError(errno.ENOENT, "x"), False) is None  # anything else is not a write failure: a traceback


def test_an_unwritable_prefect_home_is_a_config_error_naming_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: "timed out connecting to the ephemeral API server" after 26 s."""
    from cifarflow.flows.pipeline import check_prefect_home

    home = tmp_path / "prefect-home"
    home.mkdir()
    home.chmod(0o500)
    if os.access(home, os.W_OK):  # root writes anywhere: make the folder a file's name instead
        home.chmod(0o700)
        home.rmdir()
        home.write_text("not a folder")
    monkeypatch.setenv("PREFECT_HOME", str(home))
    with pytest.raises(ConfigError, match=rf"PREFECT_HOME {home} is not writable"):
        check_prefect_home()


def test_non_finite_model_outputs_stop_evaluate_and_predict(tiny_shards: Path, tmp_path: Path) -> None:
    """A model with NaN outputs: evaluate wrote NaN metrics and a temperature fitted on NaN at exit 0,
    predict printed `airplane nan` and non-standard JSON. Both are exit-2 errors naming the model now."""
    from cifarflow.evaluate import check_finite_outputs

    probs = np.full((4, 10), 0.1, np.float32)
    assert check_finite_outputs(probs, Path("m.keras"), "val") is probs
    probs[2, 3] = np.nan
    with pytest.raises(InputError, match=r"^m.keras: gives non-finite outputs \(NaN or infinite\) for 1 of 4 val images"):
        check_finite_outputs(probs, Path("m.keras"), "val")

    from PIL import Image

    from cifarflow import predict
    from cifarflow.data import cifar_binary as cb

    class NaNs:
        def probabilities(self, images: np.ndarray) -> np.ndarray:
            return np.full((len(images), 10), np.nan, np.float32)

    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    original = predict.load_model
    predict.load_model = lambda model_dir: (list(cb.CIFAR10_CLASSES), NaNs())
    try:
        with pytest.raises(InputError, match="the model gives non-finite outputs"):
            predict.classify(tmp_path / "model", [tmp_path / "a.png"], 4096)
    finally:
        predict.load_model = original


@pytest.mark.slow
def test_verify_repro_removes_its_clones_when_stopped(tmp_path: Path) -> None:
    """SIGTERM (a CI timeout, a `kill`) while verify-repro runs: its clones (~100 MB each) and the
    dvc processes in them are gone when it has stopped."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    process = subprocess.Popen(
        [sys.executable, "-m", "cifarflow", "verify-repro", "--repo", str(REPO), "--archs", "lenet"],
        env=cli_env() | {"TMPDIR": str(temp)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not list(temp.glob("cifarflow-verify-*/clone-2/.git")):
        time.sleep(0.5)  # the clones exist: now stop it
    assert list(temp.glob("cifarflow-verify-*")), "verify-repro never made its clones"
    time.sleep(3)
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode != 0 and list(temp.glob("cifarflow-verify-*")) == [], list(temp.rglob("*"))[:5]
    assert "Traceback" not in process.stderr.read()
    time.sleep(1)
    survivors = subprocess.run(["pgrep", "-f", str(temp)], capture_output=True, text=True).stdout.split()
    assert survivors == [], survivors


def test_an_export_whose_serving_signature_is_foreign_is_refused_naming_it(tmp_path: Path) -> None:
    """A SavedModel with another signature (a different model's export swapped in): an InputError
    naming it, not a KeyError traceback."""
    import tensorflow as tf

    from cifarflow.serving import ServedModel

    module = tf.Module()
    module.f = tf.function(lambda x: {"y": x * 2}, input_signature=[tf.TensorSpec([None], tf.float32, name="x")])
    tf.saved_model.save(module, str(tmp_path / "sm"), signatures={"serving_default": module.f})
    with pytest.raises(InputError, match=r"sm: has no serving_default signature taking uint8 `images`"):
        ServedModel(tmp_path / "sm")
    (tmp_path / "junk").mkdir()
    with pytest.raises(InputError, match=r"junk: not a SavedModel TensorFlow can load"):
        ServedModel(tmp_path / "junk")


def test_every_json_the_stages_read_is_bounded_and_regular(tmp_path: Path) -> None:
    from cifarflow.contract import read_json

    os.mkfifo(tmp_path / "card.json")
    with pytest.raises(InputError, match=r"card.json: is a FIFO \(named pipe\), not a regular file"):
        read_json(tmp_path / "card.json", "export")
    (tmp_path / "list.json").write_text(json.dumps([1]))
    with pytest.raises(InputError, match=r"list.json: holds a list, not a JSON object; rerun the export stage"):
        read_json(tmp_path / "list.json", "export")
    (tmp_path / "bad.json").write_text(yaml.safe_dump({"a": 1}))
    with pytest.raises(InputError, match=r"bad.json: not valid JSON"):
        read_json(tmp_path / "bad.json", "export")
