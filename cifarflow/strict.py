"""The base of every params model: strict, frozen, finite (shared by the settings and the data sources)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """Unknown keys are errors, values are immutable, and no float is infinite or NaN (`.inf` would
    pass any `gt=0` bound and poison a run)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)
