"""Images as every stage holds them, and the input normalizations the recipes may name: constants
only, importing nothing, so that data, models, settings and export share them without importing
each other."""

from __future__ import annotations

import typing
from typing import Literal

HEIGHT = WIDTH = 32
CHANNELS = 3
IMAGE_SHAPE = (HEIGHT, WIDTH, CHANNELS)  # uint8 HWC on disk; float32 HWC inside the models

Normalization = Literal["center", "minmax", "standardize"]
NORMALIZATIONS: tuple[Normalization, ...] = typing.get_args(Normalization)
NORMALIZATION_HELP = "center: x/255-0.5; minmax: per-image (x-min)/(max-min); standardize: per-image (x-mean)/std"
