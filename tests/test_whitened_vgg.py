"""The fast recipe's parts: the whitening layer, pooling written for deterministic XLA, test-time
augmentation inside the model, the per-step schedule, and one real training run of the tiny
variant under XLA with op determinism on (compiled, bit-identical twice, lookahead in the checkpoint)."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import keras
import numpy as np
import pytest
import yaml
from conftest import cli_env, train_params

from cifarflow.errors import ConfigError
from cifarflow.models import build_model
from cifarflow.models.layers import ReshapeMaxPool
from cifarflow.models.registry import load_model
from cifarflow.models.whitened_vgg import WHITEN_EPSILON, whitening_kernel
from cifarflow.settings import resolve
from cifarflow.training.schedule import LearningRate
from cifarflow.training.trainer import train

FAST = {
    "model": "whitened_vgg",
    "variant": "tiny",
    "epochs": 2,
    "batch_size": 50,
    "optimizer": {"name": "sgd", "learning_rate": 0.2, "momentum": 0.85, "nesterov": True, "norm_bias_rate": 8},
    "schedule": {"kind": "warmup_linear", "warmup": 0.3, "start": 0.2, "end": 0.1},
    "normalization": "center",
    "augmentation": "flip_translate",
    "label_smoothing": 0.2,
    "ema": {"momentum": 0.9, "every": 2},
    "jit_compile": True,
}


def test_whitening_makes_patches_uncorrelated_with_unit_variance() -> None:
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(12, 12))  # strongly correlated channels and neighbours
    images = (rng.normal(size=(40, 8, 8, 12)) @ mixing.T)[..., :3].astype(np.float32)
    kernel = whitening_kernel(images, epsilon=0.0)
    assert kernel.shape == (2, 2, 3, 24)
    np.testing.assert_array_equal(kernel[..., 12:], -kernel[..., :12])
    patches = np.stack([images[:, i : 7 + i, j : 7 + j, :] for i in range(2) for j in range(2)], axis=3).reshape(-1, 12)
    whitened = (patches - patches.mean(axis=0)) @ kernel[..., :12].reshape(12, 12)
    np.testing.assert_allclose(np.cov(whitened, rowvar=False, bias=True), np.eye(12), atol=1e-4)
    # the epsilon is relative to the pixels' variance: rescaling the images rescales the kernel
    # inversely (the whitened patches stay the same), and low-variance directions are damped
    damped = whitening_kernel(images)
    np.testing.assert_allclose(whitening_kernel(images * 1e-3), damped * 1e3, rtol=1e-4)
    mean_variance = np.trace(np.cov(patches, rowvar=False, bias=True)) / 12
    assert np.abs(damped).max() < 1 / np.sqrt(WHITEN_EPSILON * mean_variance)


@pytest.mark.parametrize("size", [31, 15, 7, 8])
def test_reshape_pooling_is_max_pooling(size: int) -> None:
    x = np.random.default_rng(size).normal(size=(3, size, size, 5)).astype(np.float32)
    expected = keras.layers.MaxPooling2D()(x)
    np.testing.assert_array_equal(np.asarray(ReshapeMaxPool()(x)), np.asarray(expected))


def test_inference_averages_an_image_and_its_mirror() -> None:
    keras.utils.set_random_seed(1)
    model = build_model("whitened_vgg", 10, "tiny")
    x = np.random.default_rng(2).normal(size=(6, 32, 32, 3)).astype(np.float32)
    served = np.asarray(model(x, training=False))
    assert served.shape == (6, 10)
    np.testing.assert_allclose(served, np.asarray(model(x[:, :, ::-1], training=False)), atol=1e-6)
    np.testing.assert_allclose(np.asarray(model(x[:1], training=False)), served[:1], atol=1e-6)  # per image
    assert np.asarray(model(x, training=True)).shape == (6, 10), "training sees each image once"


def test_level_2_averages_six_views_with_airbenchs_weights() -> None:
    """The logits of [image, mirror, shifted down-right, its mirror, shifted up-left, its mirror]
    (reflect-padded), weighted 1/4, 1/4, 1/8 x 4, then softmax."""
    keras.utils.set_random_seed(3)
    model = build_model("whitened_vgg", 10, "tiny", tta_level=2)
    logits = keras.Model(model.input, model.get_layer("logit_scale").output)  # the views' rows, unmerged
    x = np.random.default_rng(4).normal(size=(3, 32, 32, 3)).astype(np.float32)
    rows = np.asarray(logits(x, training=False)).reshape(6, 3, 10)
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    down_right, up_left = padded[:, :-2, :-2], padded[:, 2:, 2:]
    views = [x, x[:, :, ::-1], down_right, down_right[:, :, ::-1], up_left, up_left[:, :, ::-1]]
    for view, image in enumerate(views):
        np.testing.assert_allclose(rows[view], np.asarray(logits(image, training=False))[:3], atol=1e-5)
    merged = np.tensordot([0.25, 0.25, 0.125, 0.125, 0.125, 0.125], rows, axes=1)
    expected = np.exp(merged) / np.exp(merged).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(np.asarray(model(x, training=False)), expected, atol=1e-6)
    saved = keras.Model.from_config(model.get_config())  # the level is part of the model's config
    assert saved.get_layer("tta_views").level == saved.get_layer("tta_merge").level == 2


def test_warmup_linear_schedule_is_the_triangle() -> None:
    params = resolve({"archs": ["fast"], "train": {"fast": FAST | {"epochs": 4}}})
    lr = LearningRate(params.train["fast"], steps_per_epoch=10)
    schedule = lr.for_optimizer(0)
    rates = [float(schedule(step)) for step in (0, 6, 12, 26, 40)]
    # 40 steps, warm-up over the first 12: 0.2x -> 1x, then down to 0.1x at step 40
    np.testing.assert_allclose(rates, [0.04, 0.12, 0.2, 0.2 * (1 - 0.9 * 14 / 28), 0.02], rtol=1e-6)
    assert lr.rate(2) == pytest.approx(float(schedule(20)))


def test_lookahead_momentum_ramps_from_zero() -> None:
    """Step k (0-based) averages with momentum 0.8·(k/4): the average follows the weights at first."""
    from cifarflow.training.sgd import SGD

    weight = keras.Variable(np.zeros(1, np.float32))
    optimizer = SGD(total_steps=4, ema_ramp=1.0, learning_rate=1.0, use_ema=True, ema_momentum=0.8)
    expected = 0.0
    for k in range(4):
        optimizer.apply_gradients([(np.array([-1.0], np.float32), weight)])  # the weight moves to k + 1
        m = 0.8 * k / 4
        expected = m * expected + (1 - m) * (k + 1)
        assert float(optimizer._model_variables_moving_average[0].numpy()[0]) == pytest.approx(expected, rel=1e-6), k
    assert float(weight.numpy()[0]) == 4.0


def test_norm_bias_rate_speeds_up_batchnorm_offsets_only() -> None:
    """One `fit` step (the tf.distribute path) from the same weights: BatchNorm's beta moves 8x
    as far with norm_bias_rate 8, every other variable exactly as far."""
    from cifarflow.training.sgd import SGD

    x, y = np.random.default_rng(0).normal(size=(2, 8, 4)).astype(np.float32)
    moves = {}
    for rate in (1.0, 8.0):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4), keras.layers.BatchNormalization(scale=False)])
        before = [v.numpy().copy() for v in model.trainable_variables]
        model.compile(SGD(learning_rate=0.01, norm_bias_rate=rate), "mse")
        model.fit(x, y, batch_size=8, epochs=1, verbose=0)
        moves[rate] = {v.name: v.numpy() - b for v, b in zip(model.trainable_variables, before, strict=True)}
    assert set(moves[1.0]) == {"kernel", "bias", "beta"}
    np.testing.assert_allclose(moves[8.0]["beta"], 8 * moves[1.0]["beta"], rtol=1e-5)
    assert np.abs(moves[1.0]["beta"]).min() > 0
    for name in ("kernel", "bias"):
        np.testing.assert_array_equal(moves[8.0][name], moves[1.0][name])


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        ({"model": "lenet", "width": 16}, "width applies to whitened_vgg only"),
        ({"model": "lenet", "jit_compile": True}, "lenet is not one .max pooling's gradient"),
        ({"ema": {"momentum": 0.9}}, "applies to optimizer sgd only"),
        ({"model": "lenet", "tta_level": 2}, "tta_level applies to whitened_vgg only"),
    ],
)
def test_recipe_options_that_do_not_apply_are_refused(recipe: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        train_params(**recipe)


def test_multi_worker_refuses_xla() -> None:
    with pytest.raises(ConfigError, match="multi_worker runs without XLA"):
        resolve({"archs": ["fast"], "runtime": {"distribution": "multi_worker"}, "train": {"fast": FAST}})


@pytest.mark.parametrize("distribution", ["mirrored", "multi_worker"])
def test_lookahead_is_refused_where_keras_cannot_run_it(distribution: str) -> None:
    """Keras 3.15's EMA fails overwriting the weights under both strategies (a two-worker run raised
    RuntimeError in `_overwrite_model_variables_with_average_value`): refused at load, naming the recipe."""
    recipe = {**FAST, "jit_compile": False}
    with pytest.raises(ConfigError, match=rf"distribution: {distribution} cannot run lookahead.*train.fast"):
        resolve({"archs": ["fast"], "runtime": {"distribution": distribution}, "train": {"fast": recipe}})
    resolve({"archs": ["fast"], "runtime": {"distribution": "none"}, "train": {"fast": recipe}})  # the control


def test_tiny_recipe_trains_compiled_and_deterministic(tiny_shards: Path, verdict: Path, tmp_path: Path) -> None:
    """One run in this process, one by the CLI in a fresh one with XLA's dump on: the same weights and
    history, XLA really compiled the training step (its HLO modules are in the dump), the learning
    rate is the recipe's warm-up/linear curve computed by hand, and lookahead is in the optimizer."""
    raw = {
        "data": {"source": "synth:train=300,test=50", "md5": None, "val_size": 50, "shards": 2},
        "archs": ["fast"],
        "train": {"fast": FAST},
    }
    params = resolve(raw)
    run = train(params, "fast", tiny_shards, tmp_path / "out0", tmp_path / "run0", tmp_path / "ck0", verdict)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    dump = tmp_path / "xla-dump"
    env = cli_env() | {"XLA_FLAGS": f"--xla_dump_to={dump}", "TF_CPP_MIN_LOG_LEVEL": "2"}
    paths = {"shards": tiny_shards, "out": tmp_path / "out1", "runinfo": tmp_path / "run1", "checkpoints": tmp_path / "ck1"}
    done = subprocess.run(
        ["cifarflow", "--params", str(tmp_path / "params.yaml"), "train", "fast", "--verdict", str(verdict)]
        + [arg for name, path in paths.items() for arg in (f"--{name}", str(path))],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "out1/weights.sha256").read_text().strip() == run["weights_sha256"]
    assert (tmp_path / "out0/history.csv").read_bytes() == (tmp_path / "out1/history.csv").read_bytes()
    compiled = [p.name for p in dump.glob("*.txt") if "train" in p.name.lower() or "one_step" in p.name.lower()]
    assert compiled, f"no XLA module of the training step in {sorted(p.name for p in dump.iterdir())[:20]}"
    info = json.loads((tmp_path / "run0/run.json").read_text())
    first, second = info["epochs"]
    assert second["process_seconds"] > first["process_seconds"] > first["train_seconds"] > 0  # time to accuracy

    # FAST: rate 0.2 (no batch scaling), 250 train examples / batch 50 = 5 steps an epoch, 10 in all;
    # epoch 0 starts at t = 0 (x start 0.2), epoch 1 at t = 0.5, past the 0.3 warm-up: falling
    # linearly from x1 at t = 0.3 to x end 0.1 at t = 1.
    rows = list(csv.DictReader((tmp_path / "out0/history.csv").open()))
    assert [float(r["lr"]) for r in rows] == pytest.approx([0.2 * 0.2, 0.2 * (1 + (0.1 - 1) * (0.5 - 0.3) / (1 - 0.3))])

    optimizer = load_model(tmp_path / "out0/model.keras", compile=True).optimizer.get_config()
    assert (optimizer["use_ema"], optimizer["ema_momentum"], optimizer["ema_overwrite_frequency"]) == (True, 0.9, 2)

    model = load_model(tmp_path / "out0/model.keras")
    whiten = model.get_layer("whiten")
    assert not whiten.trainable
    from cifarflow.data.inputs import load_split
    from cifarflow.normalization import normalize

    first = load_split(tiny_shards, "train", "parquet").images
    np.testing.assert_array_equal(whiten.get_weights()[0], whitening_kernel(normalize(first, "center").numpy()))
