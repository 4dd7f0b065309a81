"""Unit tests of cifarflow.policy: every rule of the promotion policy, alone and together, and the
verdict's one invariant (blessed exactly when every check passed). Pure: no model, no files."""

from __future__ import annotations

import math

import pytest

from cifarflow.policy import Candidate, Champion, decide, markdown
from cifarflow.settings import ExportParams

RULES = ExportParams(min_accuracy=0.5, tolerance=0.01)


def model(accuracy: float = 0.6, mca: float | None = None, kind: str = "archive", data: str = "d1") -> Candidate:
    return Candidate("lenet", accuracy, mca, kind, data)


def champion(accuracy: float, mca: float | None = None) -> Champion:
    return Champion("0003-abcdefabcdef", "f" * 64, accuracy, mca)


def rules(**changes: object) -> ExportParams:
    return ExportParams(**{**RULES.model_dump(), **changes})


@pytest.mark.parametrize(
    ("accuracy", "champion_accuracy", "blessed"),
    [(0.5, None, True), (0.4999, None, False), (0.6, 0.61, True), (0.6, 0.6101, False), (0.62, 0.61, True), (0.6, 0.6, True)],
)
def test_threshold_and_the_champion_within_tolerance(accuracy: float, champion_accuracy: float | None, blessed: bool) -> None:
    verdict = decide(model(accuracy), champion(champion_accuracy) if champion_accuracy is not None else None, RULES)
    assert verdict.blessed is blessed


def test_at_exactly_the_tolerance_below_the_champion_it_is_blessed() -> None:
    verdict = decide(model(0.5), champion(0.75), rules(tolerance=0.25))  # 0.75 - 0.25 == 0.5 exactly
    assert verdict.blessed and "is within export.tolerance 0.25 below the champion" in verdict.checks[2].reason


def test_each_check_says_what_it_compared() -> None:
    verdict = decide(model(0.4), champion(0.9), RULES)
    assert [(c.rule, c.passed, c.reason) for c in verdict.checks] == [
        ("a_number", True, "test accuracy 0.4 is a number in [0, 1]"),
        ("min_accuracy", False, "test accuracy 0.4000 < export.min_accuracy 0.5"),
        (
            "vs_champion",
            False,
            "test accuracy 0.4000 is more than export.tolerance 0.01 below the champion 0003-abcdefabcdef's 0.9000 "
            "(re-scored on this test split)",
        ),
        ("real_data", True, "trained and tested on real data (archive)"),
    ]
    assert verdict.failures == [verdict.checks[1].reason, verdict.checks[2].reason]
    assert decide(model(0.6), None, RULES).checks[2].reason == "no champion to compare with"


@pytest.mark.parametrize("accuracy", [math.nan, math.inf, -0.1, 1.5, None])
def test_an_accuracy_that_is_not_a_number_in_range_is_never_blessed(accuracy: object) -> None:
    verdict = decide(model(accuracy), champion(0.1), rules(min_accuracy=0.0, tolerance=1.0))
    assert not verdict.blessed and [c.rule for c in verdict.checks] == ["a_number"]


def test_synthetic_data_is_never_blessed_and_says_so() -> None:
    verdict = decide(model(kind="synth"), None, RULES)
    assert not verdict.blessed
    assert verdict.failures == ["trained and tested on synthetic data (data.source synth:...): never promotable without --force"]


def test_rolled_back_weights_and_other_data_are_refused() -> None:
    rollback = {"from": "0004-aaaaaaaaaaaa", "time": "2026-12-07T02:00:00Z"}
    verdict = decide(model(), None, RULES, rolled_back=rollback)
    assert verdict.failures == ["these weights were rolled back from version 0004-aaaaaaaaaaaa at 2026-12-07T02:00:00Z"]
    assert decide(model(data="d1"), None, RULES, data_manifest_now="d1").blessed
    stale = decide(model(data="d1"), None, RULES, data_manifest_now="d2")
    assert stale.failures == ["its test accuracy was measured on other data than the shards there are now (rerun the pipeline)"]


@pytest.mark.parametrize(
    ("gates", "mca", "champion_mca", "blessed", "reason"),
    [
        (
            {"min_corruption_accuracy": 0.6},
            0.5,
            None,
            False,
            "mean corruption accuracy 0.5000 < export.min_corruption_accuracy 0.6",
        ),
        (
            {"min_corruption_accuracy": 0.5},
            0.5,
            None,
            True,
            "mean corruption accuracy 0.5000 >= export.min_corruption_accuracy 0.5",
        ),
        ({"min_corruption_accuracy": 0.5}, None, None, False, "mean corruption accuracy not measured < export.min_corruption"),
        (
            {"robustness_vs_champion": True},
            0.5,
            0.5101,
            False,
            "mean corruption accuracy 0.5000 is more than export.tolerance 0.01 below the",
        ),
        (
            {"robustness_vs_champion": True},
            0.5,
            0.51,
            True,
            "mean corruption accuracy 0.5000 is within export.tolerance 0.01 below the",
        ),
        ({"robustness_vs_champion": True}, 0.5, None, False, "mean corruption accuracy not measured for both models"),
    ],
)
def test_each_robustness_gate_alone(
    gates: dict, mca: float | None, champion_mca: float | None, blessed: bool, reason: str
) -> None:
    verdict = decide(model(mca=mca), champion(0.6, champion_mca), rules(**gates))
    robust = [c for c in verdict.checks if c.rule in gates]
    assert verdict.blessed is blessed and len(robust) == 1 and robust[0].reason.startswith(reason), robust


def test_robustness_gates_block_on_their_own_and_an_unset_gate_changes_nothing() -> None:
    both = rules(min_corruption_accuracy=0.6, robustness_vs_champion=True)
    assert not decide(model(mca=0.5), champion(0.6, 0.4), both).blessed  # fails the threshold, passes the champion
    assert not decide(model(mca=0.7), champion(0.6, 0.8), both).blessed  # passes the threshold, fails the champion
    no_champion = decide(model(mca=0.5), None, rules(robustness_vs_champion=True))
    assert no_champion.blessed and no_champion.checks[-2].reason == "no champion to compare robustness with"
    plain = decide(model(), champion(0.6), RULES)
    assert decide(model(mca=0.1), champion(0.6, 0.9), RULES) == plain.__class__(plain.checks, champion(0.6, 0.9))


def test_blessed_is_exactly_every_check_passed_and_the_record_says_so() -> None:
    for accuracy in (0.3, 0.6):
        for kind in ("archive", "synth"):
            verdict = decide(model(accuracy, kind=kind), champion(0.6), RULES)
            record = verdict.record()
            assert record["blessed"] is all(c["passed"] for c in record["checks"]) is verdict.blessed
            assert markdown(record) == [f"- {'passed' if c.passed else 'FAILED'}: {c.reason}" for c in verdict.checks]
    assert decide(model(), champion(0.6), RULES).record()["champion"] == {
        "version": "0003-abcdefabcdef",
        "weights_sha256": "f" * 64,
        "test_accuracy": 0.6,
        "mca": None,
    }
