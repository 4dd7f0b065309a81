"""Unit tests of cifarflow.export's McNemar test (no model, no TensorFlow); the ranking is
tests/test_units_leaderboard.py's, the blessing tests/test_units_policy.py's."""

from __future__ import annotations

import numpy as np
import pytest

from cifarflow import export as ex


def test_mcnemar_uses_only_discordant_pairs() -> None:
    first = np.array([True] * 8 + [False] * 2 + [True] * 50 + [False] * 40)
    second = np.array([False] * 8 + [True] * 2 + [True] * 50 + [False] * 40)
    got = ex.mcnemar(first, second)
    assert got["only_winner_right"] == 8 and got["only_runner_up_right"] == 2
    assert got["p_value"] == pytest.approx(0.109375)  # 2·P(X <= 2), X ~ Binomial(10, 1/2)
    assert ex.mcnemar(second, first)["p_value"] == got["p_value"]
    same = ex.mcnemar(first, first)
    assert same == {"only_winner_right": 0, "only_runner_up_right": 0, "p_value": 1.0}
    tiny = ex.mcnemar(np.array([True] * 30), np.array([False] * 30))
    assert tiny["p_value"] == float(f"{2 * 0.5**30:.6g}") and tiny["p_value"] > 0
