"""Scoring the corruption benchmark (the corrupt stage's cells): accuracy per family x severity,
the mean corruption accuracy (mCA, the mean over all cells), relative mCA (mCA / clean accuracy
on the same images) and a 95% interval for mCA from a bootstrap over images: every cell holds the
same images, so the cells' errors are correlated and per-cell binomial intervals do not combine;
resampling images (with all their cells) keeps that correlation.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cifarflow.figures import figure, png

RESAMPLES = 2000  # bootstrap resamples: the 2.5/97.5 percentiles move by < 0.1 point beyond this
BOOTSTRAP_STREAM = 0xC1FA  # the bootstrap's own random stream of the seed ("CIFA"), apart from its other uses


def score(correct: dict[tuple[str, int], np.ndarray], clean: np.ndarray, seed: int) -> dict[str, Any]:
    """`correct`: per (family, severity) cell, a bool per image (the same images in every cell, in
    the same order as `clean`, the model's correctness on them uncorrupted)."""
    matrix = np.stack([correct[c] for c in correct]).astype(np.float64)  # cells x images
    per_image = matrix.mean(axis=0)  # each image's share of cells it survives
    rng = np.random.default_rng([seed, BOOTSTRAP_STREAM])
    resampled = per_image[rng.integers(0, len(per_image), (RESAMPLES, len(per_image)))].mean(axis=1)
    low, high = np.percentile(resampled, [2.5, 97.5])
    mca, clean_accuracy = float(matrix.mean()), float(clean.mean())
    grid: dict[str, dict[str, float]] = {}
    for (family, severity), row in correct.items():
        grid.setdefault(family, {})[str(severity)] = round(float(row.mean()), 6)
    return {
        "mca": round(mca, 6),
        "ci95_low": round(float(low), 6),
        "ci95_high": round(float(high), 6),
        "relative_mca": round(mca / clean_accuracy, 6) if clean_accuracy else None,
        "clean_accuracy": round(clean_accuracy, 6),
        "n": len(clean),
        "grid": grid,
        "resamples": RESAMPLES,
    }


def heatmap_png(grid: dict[str, dict[str, float]], title: str) -> bytes:
    """Accuracy per family (rows) and severity (columns), the value in each cell."""
    families = list(grid)
    severities = sorted({s for row in grid.values() for s in row}, key=int)
    values = np.array([[grid[f].get(s, np.nan) for s in severities] for f in families])
    width, height = 1.2 * len(severities) + 3.2, 0.32 * len(families) + 1.6  # inches
    fig = figure((width, height))
    bottom, top = 0.55 / height, 1 - 0.5 / height  # fixed margins in inches, as fractions
    ax = fig.add_axes((2.4 / width, bottom, 1 - 3.3 / width, top - bottom))
    image = ax.imshow(values, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(severities)), [f"severity {s}" for s in severities], fontsize=8)
    ax.set_yticks(range(len(families)), families, fontsize=8)
    ax.set_title(title, fontsize=9)
    for (i, j), value in np.ndenumerate(values):
        if np.isfinite(value):
            color = "white" if value < 0.6 else "black"
            ax.text(j, i, f"{100 * value:.1f}", ha="center", va="center", fontsize=7, color=color)
    fig.colorbar(image, cax=fig.add_axes((1 - 0.75 / width, bottom, 0.15 / width, top - bottom)))
    return png(fig)
