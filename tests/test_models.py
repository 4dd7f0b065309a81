"""The seed architectures: parameter counts of the seeds' own code, and one real training step
for every tiny variant."""

from __future__ import annotations

import numpy as np
import pytest

from cifarflow.models import FAMILIES, build_model

SEED_PARAMS = {"simple_cnn": 1_084_234, "lenet": 122_570, "densenet121": 7_047_754}


@pytest.mark.parametrize("family", FAMILIES)
def test_full_variant_parameter_counts(family: str) -> None:
    options = {"stem": "imagenet"} if family == "densenet121" else {}
    count = build_model(family, **options).count_params()
    if family == "resnet56":
        assert abs(count - 855_000) <= 0.01 * 855_000, count  # 0.85-0.86M, ±1%
    else:
        assert count == SEED_PARAMS[family]


def test_densenet_matches_keras_applications() -> None:
    import keras

    inputs = keras.Input((32, 32, 3))
    features = keras.applications.DenseNet121(weights=None, input_shape=(32, 32, 3), include_top=False, pooling="avg")
    reference = keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(features(inputs)))
    ours = build_model("densenet121", stem="imagenet")
    assert sorted(tuple(w.shape) for w in ours.weights) == sorted(tuple(w.shape) for w in reference.weights)
    cifar = build_model("densenet121", stem="cifar")
    assert cifar.get_layer("conv1_conv").kernel.shape == (3, 3, 3, 64) and "pool1" not in [layer.name for layer in cifar.layers]


@pytest.mark.parametrize("family", FAMILIES)
def test_one_training_step_of_every_tiny_variant(family: str) -> None:
    import keras

    options = {"stem": "cifar"} if family == "densenet121" else {}
    model = build_model(family, variant="tiny", **options)
    model.compile(optimizer="adam", loss="categorical_crossentropy")
    x = np.random.default_rng(0).normal(size=(8, 32, 32, 3)).astype("float32")
    y = keras.utils.to_categorical(np.arange(8) % 10, 10)
    before = [w.numpy().copy() for w in model.trainable_weights]
    loss = model.train_on_batch(x, y)
    assert np.isfinite(loss)
    assert any(not np.array_equal(b, w.numpy()) for b, w in zip(before, model.trainable_weights, strict=True))
    probs = model.predict(x, verbose=0)
    assert probs.shape == (8, 10) and np.allclose(probs.sum(axis=1), 1, atol=1e-5)


def test_layers_are_named() -> None:
    for family in FAMILIES:
        options = {"stem": "imagenet"} if family == "densenet121" else {}
        names = [layer.name for layer in build_model(family, variant="tiny", **options).layers]
        assert len(set(names)) == len(names)
        assert not [n for n in names if n.split("_")[-1].isdigit() and n.rsplit("_", 1)[0] in {"conv2d", "dense"}]


def test_unknown_model() -> None:
    with pytest.raises(KeyError, match="valid: simple_cnn"):
        build_model("vgg")
