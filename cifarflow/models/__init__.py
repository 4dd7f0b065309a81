"""Model families as a registry from name to builder, each with a tiny variant for tests; the
names live in cifarflow.models.catalog."""

from cifarflow.models.catalog import FAMILIES, STEMS, VARIANTS
from cifarflow.models.registry import build_model

__all__ = ["FAMILIES", "STEMS", "VARIANTS", "build_model"]
