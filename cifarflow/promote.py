"""`cifarflow promote`: the champion registry's commands (promote, --list, --rollback, --gc, --repair,
--archive-history).

Promotion applies the promotion policy (cifarflow.policy) again while it holds the registry's lock,
against the champion as it is then: re-scored on the current test split (and benchmark, when a
robustness gate asks), cached per weights and data. A verdict an export computed earlier, before
another promotion or a rollback, therefore decides nothing: only the one re-decided under the lock
does. The mechanics (versions, pointer, lock, history) live in `cifarflow.registry`.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cifarflow import policy, registry
from cifarflow.contract import MANIFEST
from cifarflow.errors import InputError
from cifarflow.fileio import sha256_file
from cifarflow.settings import Params

log = logging.getLogger(__name__)


def judge(
    params: Params, registry_dir: Path, shards_dir: Path, corrupt_dir: Path | None
) -> Callable[[dict[str, Any], registry.Version | None, dict[str, Any] | None], policy.Verdict]:
    """The decision the registry makes under its lock: the policy, on the export's card, against the
    champion then (re-scored now on these shards and benchmark) and the data there is now."""
    from cifarflow.serving import rescore

    manifest = Path(shards_dir) / MANIFEST
    if not manifest.is_file():
        raise InputError(
            f"{manifest}: not found; the champion is re-scored on the test split (run the pipeline, or pass --shards)"
        )
    if params.export.robustness_vs_champion and (corrupt_dir is None or not (Path(corrupt_dir) / MANIFEST).is_file()):
        raise InputError(
            f"export.robustness_vs_champion is set: the champion is re-scored on the corruption benchmark, "
            f"and {corrupt_dir} has none (run the pipeline, or pass --corrupt)"
        )
    now = sha256_file(manifest)

    def decide(card: dict[str, Any], champion: registry.Version | None, rolled_back: dict[str, Any] | None) -> policy.Verdict:
        model = policy.Candidate.from_card(card)
        scored = rescore(registry_dir, champion, Path(shards_dir), corrupt_dir, params) if champion else None
        return policy.decide(model, scored, params.export, rolled_back, now)

    return decide


def run(args: argparse.Namespace, params: Params, registry_dir: Path) -> int:
    if args.list:
        print(registry.render(registry_dir), end="")
        return 0
    if args.gc:
        removed = registry.collect_garbage(registry_dir, args.keep, args.wait)
        print(f"removed {len(removed)} version(s){': ' + ', '.join(removed) if removed else ''}")
        return 0
    if args.repair:
        done = registry.repair(registry_dir, args.by, args.wait)
        print(
            f"repaired {registry_dir}: kept {done['kept_events']} history line(s), rebuilt {len(done['rebuilt'])} from the "
            f"versions' records ({', '.join(done['rebuilt']) or 'none'}); champion {done['champion'] or '(none)'}; "
            "nothing deleted"
        )
        return 0
    if args.archive_history:
        event = registry.archive_history(registry_dir, args.by, args.wait)
        print(f"archived the history to {registry_dir / event['archived_to']}; a new history carries what it decided")
        return 0
    if args.rollback is not None:
        event = registry.rollback(registry_dir, args.rollback or None, args.by, args.wait)
        print(f"rolled back: {event['from']} -> {event['to']} ({event['arch']}); {registry_dir / registry.CURRENT}")
        return 0
    from cifarflow.serving import check_served

    check_served(args.export)  # before anything is staged: the export serves what its card claims
    decide = judge(params, registry_dir, args.shards, args.corrupt)
    event = registry.promote(args.export, registry_dir, decide, args.force, args.by, args.wait)
    if event["kind"] == "unchanged":
        print(f"unchanged: {event['reason']} ({event['to']})")
    else:
        verdict = event["verdict"]
        against = verdict["champion"]
        failed = [c["reason"] for c in verdict["checks"] if not c["passed"]]
        print(
            f"promoted {event['arch']} as {event['to']}"
            + (" (FORCED: " + "; ".join(failed) + ")" if verdict["forced"] else "")
            + (f"; compared with {against['version']} at {against['test_accuracy']:.4f}" if against else "; first champion")
        )
        log.debug("%s", json.dumps(event))
    return 0
