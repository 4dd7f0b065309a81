"""The one list of model names: families (and the module that builds each), variants and stems
(input normalizations are cifarflow.pixels'). Names only, no Keras: params validation
(cifarflow.settings), the registry and the builders all read them from here."""

from __future__ import annotations

import typing
from typing import Literal

Family = Literal["simple_cnn", "lenet", "resnet56", "densenet121", "whitened_vgg"]
Variant = Literal["full", "tiny"]  # tiny: a small model of the same shape, for tests and smoke
Stem = Literal["imagenet", "cifar"]

FAMILIES: tuple[Family, ...] = typing.get_args(Family)
VARIANTS: tuple[Variant, ...] = typing.get_args(Variant)

# family -> the module whose `build(num_classes, variant, **options)` builds it, imported on demand
# (each imports Keras, which params validation and the CLI must not load early).
BUILDERS: dict[Family, str] = {
    "simple_cnn": "cifarflow.models.simple_cnn",
    "lenet": "cifarflow.models.lenet",
    "resnet56": "cifarflow.models.resnet",
    "densenet121": "cifarflow.models.densenet",
    "whitened_vgg": "cifarflow.models.whitened_vgg",
}

# family -> the stems it offers, the first being the seed's; families not listed have one fixed stem.
STEMS: dict[Family, tuple[Stem, ...]] = {"densenet121": typing.get_args(Stem)}

# families whose width a recipe may set (`width`: the first stage's channels), with the full variant's
WIDTHS: dict[Family, int] = {"whitened_vgg": 64}

# families that average test-time views inside the model (`tta_level`: 1 flip, 2 flip + translations)
TTA_FAMILIES: tuple[Family, ...] = ("whitened_vgg",)

# families whose training step compiles under XLA with op determinism on (every op has a
# deterministic XLA kernel; TensorFlow's MaxPool gradient has none on CPU): `jit_compile` is theirs
XLA_FAMILIES: tuple[Family, ...] = ("whitened_vgg",)
