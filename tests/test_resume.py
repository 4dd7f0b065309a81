"""Training II: a SIGKILLed training resumes bit-identically; stale resume state is discarded;
out of memory halves the micro-batch and keeps the optimizer state; MirroredStrategy over two
logical CPUs matches one device."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import built_once, cli_env, write_params

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("verdict")]
BASE = {
    "variant": "tiny",
    "epochs": 3,
    "batch_size": 32,
    "optimizer": {"name": "adam", "learning_rate": 0.002},
    "normalization": "minmax",
}
RECIPES = {
    # dropout (its random stream must be restored) and an exponential schedule
    "drop": {**BASE, "model": "simple_cnn", "schedule": {"kind": "exponential", "decay": 0.7}},
    # mixup from epoch 1 and a plateau schedule (state outside the model)
    "mix": {
        **BASE,
        "model": "lenet",
        "mixup": {"alpha": 1.0, "warmup": 1},
        "monitor": "val_loss",
        "schedule": {"kind": "plateau", "patience": 0, "factor": 0.5},
    },
    # XLA under op determinism, a per-step schedule and lookahead weights (optimizer state), a
    # data-derived whitening layer, label smoothing, reflect-padded translations
    "fast": {
        **BASE,
        "model": "whitened_vgg",
        "batch_size": 50,
        "optimizer": {"name": "sgd", "learning_rate": 0.2, "momentum": 0.85, "nesterov": True, "norm_bias_rate": 8},
        "schedule": {"kind": "warmup_linear", "warmup": 0.3},
        "normalization": "center",
        "augmentation": "flip_translate",
        "label_smoothing": 0.2,
        "ema": {"momentum": 0.9, "every": 3},
        "jit_compile": True,
    },
}


DATA = {"source": "synth:train=300,test=50", "md5": None, "val_size": 50, "shards": 2}


def params_file(root: Path, **runtime) -> Path:
    raw = {"data": DATA, "archs": list(RECIPES), "train": RECIPES, "runtime": runtime}
    root.mkdir(parents=True, exist_ok=True)
    return write_params(root, raw)


def train(root: Path, arch: str, shards: Path, params: Path, **env: str) -> subprocess.CompletedProcess[str]:
    cmd = [
        sys.executable,
        "-m",
        "cifarflow",
        "--params",
        str(params),
        "train",
        arch,
        "--shards",
        str(shards),
        "--out",
        str(root / "out" / arch),
        "--runinfo",
        str(root / "run" / arch),
        "--checkpoints",
        str(root / "ckpt" / arch),
        "--verdict",
        str(shards.parent / "validation" / "verdict.json"),
    ]
    return subprocess.run(cmd, env={**cli_env(), "TF_CPP_MIN_LOG_LEVEL": "2", **env}, capture_output=True, text=True)


def digest(root: Path, arch: str) -> str:
    return (root / "out" / arch / "weights.sha256").read_text().strip()


def run_info(root: Path, arch: str) -> dict:
    return json.loads((root / "run" / arch / "run.json").read_text())


@pytest.fixture(scope="session")
def uninterrupted(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    def build(root: Path) -> None:
        root.mkdir()
        params = params_file(root)
        for arch in RECIPES:
            done = train(root, arch, tiny_shards, params)
            assert done.returncode == 0, done.stderr
            assert run_info(root, arch)["resumed_after_epoch"] is None

    return built_once(tmp_path_factory, "uninterrupted", build)


# Kill points: at an epoch's first step, mid-epoch, and in a later epoch; the fast recipe (XLA, its
# state in the optimizer) mid-epoch only, where all of its state is in play, to keep CI short.
KILLS = [(arch, at) for arch in ("drop", "mix") for at in ("1:0", "1:4", "2:3")] + [("fast", "1:3")]


@pytest.mark.parametrize(("arch", "at"), KILLS)
def test_sigkill_then_resume_is_bit_identical(arch: str, at: str, uninterrupted: Path, tiny_shards: Path, tmp_path: Path) -> None:
    params = params_file(tmp_path)
    killed = train(tmp_path, arch, tiny_shards, params, CIFARFLOW_FAULT_KILL_AT=at)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (tmp_path / "out" / arch / "weights.sha256").exists()
    assert (tmp_path / "ckpt" / arch / "kill.fired").exists()
    resumed = train(tmp_path, arch, tiny_shards, params, CIFARFLOW_FAULT_KILL_AT=at)  # the marker: fires once
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert run_info(tmp_path, arch)["resumed_after_epoch"] == int(at.split(":")[0])
    assert digest(tmp_path, arch) == digest(uninterrupted, arch)
    for name in ("history.csv", "summary.json"):
        assert (tmp_path / "out" / arch / name).read_bytes() == (uninterrupted / "out" / arch / name).read_bytes()
    assert not (tmp_path / "ckpt" / arch).exists(), "a completed run deletes its resume state"


def test_state_with_another_fingerprint_is_discarded(uninterrupted: Path, tiny_shards: Path, tmp_path: Path) -> None:
    params = params_file(tmp_path)
    assert train(tmp_path, "mix", tiny_shards, params, CIFARFLOW_FAULT_KILL_AT="1:1").returncode == -9
    state = json.loads((tmp_path / "ckpt/mix/state.json").read_text())
    raw = json.loads(json.dumps(RECIPES))
    raw["mix"]["optimizer"]["learning_rate"] = 0.003  # a param edit: the old state must not be reused
    write_params(tmp_path, {"data": DATA, "archs": list(RECIPES), "train": raw})
    rerun = train(tmp_path, "mix", tiny_shards, params)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"fingerprint {state['fingerprint']}" in rerun.stderr and "discarding resume state" in rerun.stderr
    assert run_info(tmp_path, "mix")["resumed_after_epoch"] is None
    assert digest(tmp_path, "mix") != digest(uninterrupted, "mix")


def test_out_of_memory_halves_the_micro_batch_and_keeps_optimizer_state(tiny_shards: Path, tmp_path: Path) -> None:
    params = params_file(tmp_path)
    status = tmp_path / "status.json"
    first = train(tmp_path, "drop", tiny_shards, params, CIFARFLOW_FAULT_OOM_AT="1:2", CIFARFLOW_STATUS_FILE=str(status))
    assert first.returncode == 3, first.stderr[-2000:]
    assert json.loads(status.read_text())["class"] == "oom"
    assert "next attempt resumes with micro-batch 16" in first.stderr

    # The optimizer state in the checkpoint survives into a model compiled with accumulation.
    import keras

    from cifarflow.settings import load_params
    from cifarflow.training.trainer import build_compiled, restore

    checkpoint = tmp_path / "ckpt/drop/epoch-1.keras"
    saved = keras.models.load_model(checkpoint, compile=True)
    model = build_compiled(load_params(params).train["drop"], 10, 0.002, accumulation=2)
    copied = restore(model, checkpoint)
    assert "iteration" in copied and any(name.endswith("_momentum") for name in copied)
    saved_vars = {v.path.split("/", 1)[1]: np.asarray(v.numpy()) for v in saved.optimizer.variables}
    for variable in model.optimizer.variables:
        name = variable.path.split("/", 1)[1]
        if name in copied and name != "iteration":
            assert np.array_equal(np.asarray(variable.numpy()), saved_vars[name]), name
    # the step count survives: with accumulation Keras counts micro-steps, two per optimizer step
    assert int(model.optimizer.iterations.numpy()) == int(saved_vars["iteration"]) > 0

    second = train(tmp_path, "drop", tiny_shards, params, CIFARFLOW_FAULT_OOM_AT="1:2")
    assert second.returncode == 0, second.stderr[-2000:]
    info = run_info(tmp_path, "drop")
    assert info["resumed_after_epoch"] == 1
    assert info["runtime"]["micro_batch"] == 16 and info["runtime"]["accumulation"] == 2
    summary = json.loads((tmp_path / "out/drop/summary.json").read_text())
    assert summary["adaptations"] == [{"epoch": 2, "micro_batch": 16, "accumulation": 2}]


def test_mirrored_over_two_logical_cpus_matches_one_device(tiny_shards: Path, tmp_path: Path) -> None:
    """Same global batch (32 = 2 x 16) on one device and on two replicas. Tolerance: 1e-4 absolute
    on every weight after 2 epochs: the two differ only in the order of float additions (the
    all-reduce of two half-batch gradients); two independent runs differ by far more (checked)."""
    import keras

    recipe = {**RECIPES["mix"], "epochs": 2, "mixup": None}
    weights = {}
    for name, runtime in (("single", {"distribution": "none"}), ("mirrored", {"distribution": "mirrored", "logical_cpus": 2})):
        root = tmp_path / name
        root.mkdir()
        params = write_params(root, {"data": DATA, "archs": ["mix"], "train": {"mix": recipe}, "runtime": runtime})
        done = train(root, "mix", tiny_shards, params)
        assert done.returncode == 0, done.stderr[-2000:]
        info = run_info(root, "mix")
        assert info["runtime"]["replicas"] == (2 if name == "mirrored" else 1)
        # The strategy the trainer actually ran, as it recorded it, not what params asked for.
        used, devices = info["runtime"]["strategy"], info["runtime"]["devices"]
        if name == "mirrored":
            assert used == "MirroredStrategy" and len(devices) == 2, info["runtime"]
            assert all(d.endswith(f"CPU:{i}") for i, d in enumerate(devices)), devices
        else:
            assert used != "MirroredStrategy" and len(devices) == 1, info["runtime"]
        assert info["runtime"]["loop"] == "keras fit" and info["runtime"]["per_replica_batch"] == 32 // len(devices)
        weights[name] = keras.models.load_model(root / "out/mix/model.keras", compile=False).get_weights()
    differences = [float(np.max(np.abs(a - b))) for a, b in zip(weights["single"], weights["mirrored"], strict=True)]
    assert max(differences) < 1e-4, differences
    other = keras.models.load_model(tmp_path / "single/out/mix/model.keras", compile=False)
    keras.utils.set_random_seed(123)  # an independent initialisation is nowhere near that close
    from cifarflow.models import build_model

    fresh = build_model("lenet", variant="tiny").get_weights()
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(other.get_weights(), fresh, strict=True)) > 1e-2
    assert os.environ.get("CIFARFLOW_FAULT_KILL_AT") is None


@pytest.mark.parametrize(
    ("damage", "resumes_from", "set_aside"),
    [
        ("flipped byte in the last checkpoint", 1, "epoch-2.keras"),  # falls back to the state before: epoch 1 done
        ("truncated last checkpoint", 1, "epoch-2.keras"),
        ("torn state.json", 1, "state.json"),
        ("both states torn", None, "state.prev.json"),  # nothing intact: from scratch
    ],
)
def test_a_damaged_checkpoint_is_set_aside_and_the_run_resumes_from_the_last_good_one(
    damage: str, resumes_from: int | None, set_aside: str, uninterrupted: Path, tiny_shards: Path, tmp_path: Path
) -> None:
    """Before: a flipped byte (BadZipFile), a truncated checkpoint ("File not found") or a torn
    state.json (JSONDecodeError) failed every retry the same way. Now the damaged file is kept in
    damaged/, the run resumes from the newest intact state (or starts over) and ends bit-identical."""
    params = params_file(tmp_path)
    killed = train(tmp_path, "drop", tiny_shards, params, CIFARFLOW_FAULT_KILL_AT="2:3")  # epochs 1 and 2 committed
    assert killed.returncode == -9, killed.stderr[-2000:]
    ckpt = tmp_path / "ckpt" / "drop"
    last = ckpt / "epoch-2.keras"
    if damage.startswith("flipped"):
        data = bytearray(last.read_bytes())
        data[len(data) // 2] ^= 0xFF
        last.write_bytes(bytes(data))
    elif damage.startswith("truncated"):
        last.write_bytes(last.read_bytes()[: last.stat().st_size // 3])
    else:
        (ckpt / "state.json").write_text('{"fingerprint": "x", "state": {"epo')
        if damage == "both states torn":
            (ckpt / "state.prev.json").write_text("{")
    resumed = train(tmp_path, "drop", tiny_shards, params, CIFARFLOW_FAULT_KILL_AT="2:3")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    info = run_info(tmp_path, "drop")
    assert info["resumed_after_epoch"] == resumes_from, info
    assert any(set_aside in note for note in info["resume_notes"]), info["resume_notes"]
    assert (ckpt / "damaged" / set_aside).is_file()  # kept for a person to look at, not deleted
    assert "set aside" in resumed.stderr
    assert digest(tmp_path, "drop") == digest(uninterrupted, "drop")
