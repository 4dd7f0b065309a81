"""A small VGG with a fixed patch-whitening first layer: the network of airbench94 (Keller Jordan,
"94% on CIFAR-10 in 3.29 seconds on a single GPU", arXiv 2404.00498; KellerJordan/cifar10-airbench),
re-derived in Keras for deterministic CPU training.

  whiten: 2x2 conv, 24 filters, frozen: the eigenvectors (each also negated) of the covariance of
          2x2x3 patches of the training images, scaled by 1/sqrt(eigenvalue + 5e-4 x the mean pixel
          variance) (`init_from_data`)
  GELU
  3 groups of width w, 4w, 4w: conv3x3 - maxpool2 - BN - GELU - conv3x3 - BN - GELU (31 -> 15 -> 7 -> 3)
  global max over 3x3, linear (no bias) x 1/9, softmax

Convs have no bias; BatchNorm has no scale (airbench freezes it at 1), momentum 0.6 and eps 1e-12;
each conv starts as an identity on its first input channels (airbench's partial dirac init). The
pooling is `ReshapeMaxPool`, so the training step compiles under XLA with op determinism on. At
inference the model averages the logits of each image and its mirror (and, at `tta_level` 2, of
both shifted by a pixel: `TestTimeViews`/`MergeViews`): what evaluate reports is what the exported
model serves. L2 on conv/linear kernels is airbench's coupled weight decay, expressed for a mean
loss: 0.0153 / 11.5 (its decay over its rate)."""

from __future__ import annotations

import keras
import numpy as np
from keras import layers, regularizers

from cifarflow.models.catalog import WIDTHS, Variant
from cifarflow.models.layers import MergeViews, PartialIdentity, ReshapeMaxPool, Scale, TestTimeViews
from cifarflow.normalization import normalize
from cifarflow.pixels import IMAGE_SHAPE

PATCH = 2  # the whitening conv's kernel
WHITEN_EPSILON = 5e-4  # airbench: added to the eigenvalues before 1/sqrt
WHITEN_IMAGES = 5000  # the first this many training images (in shard order) estimate the covariance
BN_MOMENTUM, BN_EPSILON = 0.6, 1e-12
L2 = 0.5 * 0.0153 / 11.5  # keras L2(l) adds l*|w|^2, whose gradient is 2*l*w: airbench's coefficient is 0.0153/11.5
LOGIT_SCALE = 1 / 9
# the first group's width per variant (catalog.VARIANTS); the second and third are 4x (airbench: 64/256/256)
CONFIGS: dict[Variant, int] = {"full": WIDTHS["whitened_vgg"], "tiny": 8}


def _conv(filters: int, name: str) -> layers.Conv2D:
    return layers.Conv2D(
        filters,
        3,
        padding="same",
        use_bias=False,
        kernel_initializer=PartialIdentity(),
        kernel_regularizer=regularizers.L2(L2),
        name=name,
    )


def _norm_gelu(x: keras.KerasTensor, name: str) -> keras.KerasTensor:
    x = layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=BN_EPSILON, scale=False, name=f"{name}_bn")(x)
    return layers.Activation("gelu", name=f"{name}_gelu")(x)


def build(num_classes: int = 10, variant: Variant = "full", width: int | None = None, tta_level: int = 1) -> keras.Model:
    """`width`: the first group's (default per variant); the other two are 4x. `tta_level`: the
    test-time views averaged at inference (layers.VIEW_WEIGHTS: 1 flip, 2 flip and translations)."""
    w = width or CONFIGS[variant]
    inputs = keras.Input(IMAGE_SHAPE, name="image")
    x = TestTimeViews(tta_level, name="tta_views")(inputs)
    whiten = layers.Conv2D(2 * PATCH * PATCH * 3, PATCH, use_bias=False, trainable=False, name="whiten")
    x = layers.Activation("gelu", name="whiten_gelu")(whiten(x))
    for group, filters in enumerate((w, 4 * w, 4 * w), start=1):
        x = _conv(filters, f"group{group}_conv1")(x)
        x = ReshapeMaxPool(name=f"group{group}_pool")(x)
        x = _norm_gelu(x, f"group{group}_1")
        x = _conv(filters, f"group{group}_conv2")(x)
        x = _norm_gelu(x, f"group{group}_2")
    x = layers.GlobalMaxPooling2D(name="global_max")(x)
    x = layers.Dense(num_classes, use_bias=False, kernel_regularizer=regularizers.L2(L2), name="logits")(x)
    x = Scale(LOGIT_SCALE, name="logit_scale")(x)
    x = MergeViews(tta_level, name="tta_merge")(x)
    outputs = layers.Activation("softmax", name="probs")(x)
    return keras.Model(inputs, outputs, name=f"whitened_vgg_{variant}_{w}")


def whitening_kernel(images: np.ndarray, epsilon: float = WHITEN_EPSILON) -> np.ndarray:
    """(N, H, W, 3) normalized float images -> the (2, 2, 3, 24) whitening kernel: for each
    eigenvector v of the 2x2x3 patch covariance (eigenvalue l, descending), v/sqrt(l + eps·s) and
    its negation, s the mean pixel variance. Computed in float64 from every 2x2 patch (stride 1)."""
    x = np.asarray(images, np.float64)
    _, h, w, c = x.shape
    patches = np.stack(
        [x[:, i : h - PATCH + 1 + i, j : w - PATCH + 1 + j, :] for i in range(PATCH) for j in range(PATCH)], axis=3
    ).reshape(-1, PATCH * PATCH * c)  # (patches, 12) in (row, col, channel) order, as the kernel reads them
    centred = patches - patches.mean(axis=0)
    covariance = centred.T @ centred / len(centred)
    values, vectors = np.linalg.eigh(covariance)
    values, vectors = values[::-1], vectors[:, ::-1]  # largest variance first, as airbench orders them
    # airbench's epsilon is for pixels of unit variance (it standardizes per channel first): scale
    # it by the pixels' variance here, so that every input normalization is damped alike
    filters = vectors / np.sqrt(values + epsilon * np.trace(covariance) / len(covariance))  # column k: eigenvector k
    kernel = filters.reshape(PATCH, PATCH, c, -1)
    return np.concatenate([kernel, -kernel], axis=-1).astype(np.float32)


def init_from_data(model: keras.Model, images: np.ndarray, normalization: str) -> None:
    """Set the frozen whitening layer from the first training images (uint8, in shard order)."""
    x = normalize(images[:WHITEN_IMAGES], normalization).numpy()
    model.get_layer("whiten").set_weights([whitening_kernel(x)])
