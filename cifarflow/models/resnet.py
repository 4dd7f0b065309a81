"""The CIFAR ResNet of TensorFlow's official resnet_cifar_model (seed 002): a 3x3 stem, three
stages of basic blocks (16/32/64 filters), batch norm, L2 weight decay, global mean, fc10.

Quirk kept from the original: every stage's first block has a 1x1 projection shortcut, the
first stage's included (stride 1, 16->16): 320 parameters (a 1x1 16->16 conv and its batch norm)
that a plain identity shortcut would not have. ResNet-56 = 9 blocks per stage, 860,346 parameters
(batch norm moving statistics included).
"""

from __future__ import annotations

import keras
from keras import layers, regularizers

from cifarflow.models.catalog import Variant
from cifarflow.pixels import IMAGE_SHAPE

# The seed's 0.997 needs ~1,000 steps before the moving statistics fit; a tiny variant trains for tens of
# steps (tests, the smoke profile), so its statistics follow the batches faster.
BN_MOMENTUM: dict[Variant, float] = {"full": 0.997, "tiny": 0.9}
BN_EPSILON = 1e-5
L2_WEIGHT_DECAY = 2e-4
# blocks per stage and the three stage widths, per variant (catalog.VARIANTS)
CONFIGS: dict[Variant, tuple[int, tuple[int, int, int]]] = {"full": (9, (16, 32, 64)), "tiny": (1, (8, 16, 32))}


def _conv(filters: int, kernel: int, strides: int, name: str, padding: str = "same") -> layers.Conv2D:
    return layers.Conv2D(
        filters,
        kernel,
        strides=strides,
        padding=padding,
        use_bias=False,
        kernel_initializer="he_normal",
        kernel_regularizer=regularizers.L2(L2_WEIGHT_DECAY),
        name=name,
    )


def _bn(name: str, momentum: float) -> layers.BatchNormalization:
    return layers.BatchNormalization(axis=3, momentum=momentum, epsilon=BN_EPSILON, name=name)


def _block(
    x: keras.KerasTensor, filters: int, stage: int, block: int, strides: int, project: bool, momentum: float
) -> keras.KerasTensor:
    conv, bn = f"res{stage}block_{block}_branch", f"bn{stage}block_{block}_branch"
    y = _conv(filters, 3, strides, conv + "2a")(x)
    y = layers.Activation("relu", name=f"{conv}2a_relu")(_bn(bn + "2a", momentum)(y))
    y = _bn(bn + "2b", momentum)(_conv(filters, 3, 1, conv + "2b")(y))
    shortcut = _bn(bn + "1", momentum)(_conv(filters, 1, strides, conv + "1")(x)) if project else x
    y = layers.Add(name=f"{conv}_add")([y, shortcut])
    return layers.Activation("relu", name=f"{conv}_relu")(y)


def build(num_classes: int = 10, variant: Variant = "full") -> keras.Model:
    blocks, widths = CONFIGS[variant]
    momentum = BN_MOMENTUM[variant]
    inputs = keras.Input(IMAGE_SHAPE, name="image")
    x = layers.ZeroPadding2D(1, name="conv1_pad")(inputs)
    x = _conv(widths[0], 3, 1, "conv1", padding="valid")(x)
    x = layers.Activation("relu", name="conv1_relu")(_bn("bn_conv1", momentum)(x))
    for stage, filters in enumerate(widths, start=2):
        for block in range(blocks):
            strides = 2 if block == 0 and stage > 2 else 1
            x = _block(x, filters, stage, block, strides, project=block == 0, momentum=momentum)
    x = layers.GlobalAveragePooling2D(name="reduce_mean")(x)
    outputs = layers.Dense(
        num_classes,
        activation="softmax",
        kernel_initializer=keras.initializers.RandomNormal(stddev=0.01),
        kernel_regularizer=regularizers.L2(L2_WEIGHT_DECAY),
        bias_regularizer=regularizers.L2(L2_WEIGHT_DECAY),
        name="fc10",
    )(x)
    return keras.Model(inputs, outputs, name=f"resnet{6 * blocks + 2}_{variant}")
