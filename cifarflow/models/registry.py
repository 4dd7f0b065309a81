"""Name -> builder. Builders take (num_classes, variant, **options) and return a keras.Model
that maps normalized float32 (N, 32, 32, 3) images to class probabilities. The names come from
cifarflow.models.catalog; a family's module is imported only when it is built."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from cifarflow.models.catalog import BUILDERS, FAMILIES, VARIANTS


def builder(family: str) -> Callable[..., Any]:
    """The `build` function of `family` (imports its module, hence Keras)."""
    if family not in BUILDERS:
        raise KeyError(f"unknown model {family!r}; valid: {', '.join(FAMILIES)}")
    return importlib.import_module(BUILDERS[family]).build


def data_init(family: str) -> Callable[..., Any] | None:
    """The family's `init_from_data(model, images)`, if its fresh weights depend on the training
    images (whitened_vgg's whitening layer); None otherwise."""
    return getattr(importlib.import_module(BUILDERS[family]), "init_from_data", None)


def load_model(path: Any, compile: bool = False) -> Any:
    """keras.models.load_model with the project's custom layers registered (imports Keras)."""
    import keras

    import cifarflow.models.layers  # noqa: F401  (registers the custom layers and initializers)

    return keras.models.load_model(path, compile=compile)


def build_model(family: str, num_classes: int = 10, variant: str = "full", **options: Any) -> Any:
    if variant not in VARIANTS:
        raise KeyError(f"unknown variant {variant!r}; valid: {', '.join(VARIANTS)}")
    return builder(family)(num_classes=num_classes, variant=variant, **options)
