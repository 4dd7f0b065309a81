"""PNG figures whose bytes depend only on what they draw (DVC outputs, model cards)."""

from __future__ import annotations

import io
from typing import Any


def figure(size: tuple[float, float]) -> Any:
    """A bare Agg figure: no pyplot (no global figure registry, no backend lookup); callers place
    axes with fixed margins instead of tight_layout, which draws every text twice to measure it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig


def png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80, metadata={"Software": None})  # no version stamp in the bytes
    return buffer.getvalue()
