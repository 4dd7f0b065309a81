"""DenseNet-121 as keras.applications builds it (seed 000: weights=None, include_top=False,
pooling="avg", then Dense(10, softmax)), written out flat so every layer is named after its block
and the stem can change. 7,047,754 parameters with the seed's ImageNet stem (keras.applications'
7,037,504 plus the 1024x10 softmax layer), 7,680 fewer with the CIFAR stem's 3x3 instead of 7x7 conv.

`stem="imagenet"` (the seed): 7x7/2 conv and a 3x3/2 max-pool, which shrink 32x32 inputs to
1x1 in the last block; that is why the seed stops near 75%. `stem="cifar"`: one 3x3/1 conv and
no pooling, the option that should beat it.
"""

from __future__ import annotations

import keras
from keras import layers

from cifarflow.models.catalog import STEMS as FAMILY_STEMS
from cifarflow.models.catalog import Stem, Variant
from cifarflow.pixels import IMAGE_SHAPE

BN_EPSILON = 1.001e-5  # as in keras.applications.densenet
# conv blocks per dense block, growth rate, stem width, per variant (catalog.VARIANTS)
CONFIGS: dict[Variant, tuple[tuple[int, ...], int, int]] = {"full": ((6, 12, 24, 16), 32, 64), "tiny": ((1, 1, 1, 1), 8, 16)}
STEMS = FAMILY_STEMS["densenet121"]
# keras.applications' 0.99 for the seed; a tiny variant trains for tens of steps (tests, the smoke
# profile), so its moving statistics follow the batches faster.
BN_MOMENTUM: dict[Variant, float] = {"full": 0.99, "tiny": 0.9}


def _bn_relu(x: keras.KerasTensor, name: str, momentum: float) -> keras.KerasTensor:
    x = layers.BatchNormalization(axis=3, momentum=momentum, epsilon=BN_EPSILON, name=f"{name}_bn")(x)
    return layers.Activation("relu", name=f"{name}_relu")(x)


def _conv_block(x: keras.KerasTensor, growth: int, name: str, momentum: float) -> keras.KerasTensor:
    y = _bn_relu(x, f"{name}_0", momentum)
    y = layers.Conv2D(4 * growth, 1, use_bias=False, name=f"{name}_1_conv")(y)
    y = _bn_relu(y, f"{name}_1", momentum)
    y = layers.Conv2D(growth, 3, padding="same", use_bias=False, name=f"{name}_2_conv")(y)
    return layers.Concatenate(axis=3, name=f"{name}_concat")([x, y])


def _transition(x: keras.KerasTensor, name: str, momentum: float) -> keras.KerasTensor:
    channels = x.shape[3]
    x = _bn_relu(x, name, momentum)
    x = layers.Conv2D(int(channels * 0.5), 1, use_bias=False, name=f"{name}_conv")(x)
    return layers.AveragePooling2D(2, strides=2, name=f"{name}_pool")(x)


def build(num_classes: int = 10, variant: Variant = "full", stem: Stem = "imagenet") -> keras.Model:
    if stem not in STEMS:
        raise KeyError(f"unknown densenet stem {stem!r}; valid: {', '.join(STEMS)}")
    blocks, growth, width = CONFIGS[variant]
    momentum = BN_MOMENTUM[variant]
    inputs = keras.Input(IMAGE_SHAPE, name="image")
    if stem == "imagenet":
        x = layers.ZeroPadding2D(3, name="conv1_pad")(inputs)
        x = layers.Conv2D(width, 7, strides=2, use_bias=False, name="conv1_conv")(x)
        x = _bn_relu(x, "conv1", momentum)
        x = layers.ZeroPadding2D(1, name="pool1_pad")(x)
        x = layers.MaxPooling2D(3, strides=2, name="pool1")(x)
    else:
        x = layers.Conv2D(width, 3, padding="same", use_bias=False, name="conv1_conv")(inputs)
        x = _bn_relu(x, "conv1", momentum)
    for stage, count in enumerate(blocks, start=2):
        for i in range(count):
            x = _conv_block(x, growth, f"conv{stage}_block{i + 1}", momentum)
        if stage < 1 + len(blocks):
            x = _transition(x, f"pool{stage}", momentum)
    x = layers.BatchNormalization(axis=3, momentum=momentum, epsilon=BN_EPSILON, name="bn")(x)
    x = layers.Activation("relu", name="relu")(x)
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="probs")(x)
    return keras.Model(inputs, outputs, name=f"densenet121_{stem}_{variant}")
