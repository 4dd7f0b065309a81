"""Name -> builder. Builders take (num_classes, variant, **options) and return a keras.Model
that maps normalized float32 (N, 32, 32, 3) images to class probabilities."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

FAMILIES = ("simple_cnn", "lenet", "resnet56", "densenet121")
VARIANTS = ("full", "tiny")


def _builder(family: str) -> Callable[..., Any]:
    # Imported on demand: each family's module imports Keras, which the CLI must not load early.
    if family == "simple_cnn":
        from cifarflow.models.simple_cnn import build
    elif family == "lenet":
        from cifarflow.models.lenet import build
    elif family == "resnet56":
        from cifarflow.models.resnet import build
    elif family == "densenet121":
        from cifarflow.models.densenet import build
    else:
        raise KeyError(f"unknown model {family!r}; valid: {', '.join(FAMILIES)}")
    return build


def build_model(family: str, num_classes: int = 10, variant: str = "full", **options: Any) -> Any:
    if variant not in VARIANTS:
        raise KeyError(f"unknown variant {variant!r}; valid: {', '.join(VARIANTS)}")
    return _builder(family)(num_classes=num_classes, variant=variant, **options)
