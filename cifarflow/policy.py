"""The promotion policy: every rule that decides whether a model may serve, in one place.

Export applies it to the model it selects (the card's verdict), and promote applies it again under
the registry's lock, against the champion as it is then (re-scored on the candidate's data), so a
verdict is never acted on after the facts it rests on changed. A verdict is a list of checks, each
passed or failed with its reason; the model is blessed exactly when every check passed, so a card's
`blessed` always agrees with its reasons. Pure: no TensorFlow, no files.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from cifarflow.contract import ROBUSTNESS
from cifarflow.errors import InputError
from cifarflow.sources import SYNTH


class Rules(Protocol):
    """The settings the policy reads (settings.ExportParams)."""

    min_accuracy: float
    tolerance: float
    min_corruption_accuracy: float | None
    robustness_vs_champion: bool


@dataclass(frozen=True)
class Candidate:
    """The model asking to serve: what its export measured."""

    arch: str
    test_accuracy: float
    mca: float | None  # mean corruption accuracy, when evaluate scored the benchmark
    data_source_kind: str  # archive, image-folder or synth
    data_manifest_sha256: str  # the shards its test accuracy was measured on

    @classmethod
    def of(cls, arch: str, metrics: dict[str, Any], source_kind: str, manifest_sha256: str) -> Candidate:
        """From a model's evaluation: evaluate's metrics, or a model card (which holds them)."""
        robust = metrics.get(ROBUSTNESS)
        return cls(arch, metrics["test"]["accuracy"], robust["mca"] if robust else None, source_kind, manifest_sha256)

    @classmethod
    def from_card(cls, card: dict[str, Any]) -> Candidate:
        """From an export's model card; an InputError when it lacks what the policy reads."""
        try:
            return cls.of(card["arch"], card, card["data_source_kind"], card["data_manifest_sha256"])
        except (KeyError, TypeError):
            raise InputError(
                "the model card lacks arch, test.accuracy, data_source_kind or data_manifest_sha256; export again"
            ) from None


@dataclass(frozen=True)
class Champion:
    """The serving model, re-scored now on the candidate's test split (and benchmark, when a gate asks)."""

    version: str
    weights_sha256: str
    test_accuracy: float
    mca: float | None = None


@dataclass(frozen=True)
class Check:
    rule: str
    passed: bool
    reason: str


@dataclass(frozen=True)
class Verdict:
    checks: tuple[Check, ...]
    champion: Champion | None

    @property
    def blessed(self) -> bool:
        return all(check.passed for check in self.checks)

    @property
    def failures(self) -> list[str]:
        return [check.reason for check in self.checks if not check.passed]

    def record(self) -> dict[str, Any]:
        """As a model card and the registry's history keep it."""
        return {
            "blessed": self.blessed,
            "checks": [asdict(check) for check in self.checks],
            "champion": asdict(self.champion) if self.champion else None,
        }


def markdown(record: dict[str, Any]) -> list[str]:
    """A recorded verdict's checks as markdown list items: passed or FAILED, and why."""
    return [f"- {'passed' if c['passed'] else 'FAILED'}: {c['reason']}" for c in record["checks"]]


def _ok(rule: str, passed: bool, reason: str) -> Check:
    return Check(rule, bool(passed), reason)


def decide(
    candidate: Candidate,
    champion: Champion | None,
    rules: Rules,
    rolled_back: dict[str, Any] | None = None,
    data_manifest_now: str | None = None,
) -> Verdict:
    """Every rule, in order: a number, the threshold, the champion's accuracy within tolerance, the
    robustness gates (when set), real data, not rolled back, measured on the data there is now."""
    accuracy = candidate.test_accuracy
    number = isinstance(accuracy, (int, float)) and not isinstance(accuracy, bool)
    finite = number and math.isfinite(accuracy) and 0 <= accuracy <= 1
    checks = [_ok("a_number", finite, f"test accuracy {accuracy} is {'' if finite else 'not '}a number in [0, 1]")]
    if not finite:  # nothing else can be compared
        return Verdict(tuple(checks), champion)
    passed = accuracy >= rules.min_accuracy
    checks.append(
        _ok(
            "min_accuracy",
            passed,
            f"test accuracy {accuracy:.4f} {'>=' if passed else '<'} export.min_accuracy {rules.min_accuracy}",
        )
    )
    if champion is None:
        checks.append(_ok("vs_champion", True, "no champion to compare with"))
    else:
        checks.append(
            _vs_champion("vs_champion", "test accuracy", accuracy, champion.test_accuracy, champion, rules, "this test split")
        )
    checks += robustness_checks(candidate.mca, champion, rules)
    checks.append(
        _ok(
            "real_data",
            candidate.data_source_kind != SYNTH,
            "trained and tested on synthetic data (data.source synth:...): never promotable without --force"
            if candidate.data_source_kind == SYNTH
            else f"trained and tested on real data ({candidate.data_source_kind})",
        )
    )
    if rolled_back is not None:
        checks.append(
            _ok(
                "not_rolled_back",
                False,
                f"these weights were rolled back from version {rolled_back['from']} at {rolled_back['time']}",
            )
        )
    if data_manifest_now is not None and candidate.data_manifest_sha256 != data_manifest_now:
        checks.append(
            _ok(
                "same_data",
                False,
                "its test accuracy was measured on other data than the shards there are now (rerun the pipeline)",
            )
        )
    return Verdict(tuple(checks), champion)


def _vs_champion(rule: str, what: str, mine: float, theirs: float, champion: Champion, rules: Rules, on: str) -> Check:
    """`mine` no more than export.tolerance below the champion's `theirs`, re-scored `on` the same data."""
    passed = mine >= theirs - rules.tolerance
    return _ok(
        rule,
        passed,
        f"{what} {mine:.4f} is {'within' if passed else 'more than'} export.tolerance {rules.tolerance} below the "
        f"champion {champion.version}'s {theirs:.4f} (re-scored on {on})",
    )


def robustness_checks(mca: float | None, champion: Champion | None, rules: Rules) -> list[Check]:
    """The optional gates on mean corruption accuracy: a threshold, and not worse than the champion's."""
    checks = []
    if rules.min_corruption_accuracy is not None:
        passed = mca is not None and mca >= rules.min_corruption_accuracy
        shown = "not measured" if mca is None else f"{mca:.4f}"
        checks.append(
            _ok(
                "min_corruption_accuracy",
                passed,
                f"mean corruption accuracy {shown} {'>=' if passed else '<'} export.min_corruption_accuracy "
                f"{rules.min_corruption_accuracy}",
            )
        )
    if rules.robustness_vs_champion:
        if champion is None:
            checks.append(_ok("robustness_vs_champion", True, "no champion to compare robustness with"))
        elif mca is None or champion.mca is None:
            checks.append(_ok("robustness_vs_champion", False, "mean corruption accuracy not measured for both models"))
        else:
            checks.append(
                _vs_champion(
                    "robustness_vs_champion", "mean corruption accuracy", mca, champion.mca, champion, rules, "this benchmark"
                )
            )
    return checks
