"""`cifarflow promote`: the champion registry's commands (promote, --list, --rollback, --gc).

Promotion re-checks the export against the champion as it is when the registry's lock is held:
the champion is re-scored on the current test split (cached per weights and data manifest), so a
stale `blessed: true` from an earlier export, or a verdict computed before a rollback, is never
acted on. The mechanics (versions, pointer, lock, history) live in `cifarflow.registry`.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from cifarflow import registry
from cifarflow.config import Params
from cifarflow.errors import InputError
from cifarflow.fileio import sha256_file

log = logging.getLogger(__name__)


def gate(params: Params, registry_dir: Path, shards_dir: Path) -> registry.Gate:
    manifest = Path(shards_dir) / "manifest.json"
    if not manifest.is_file():
        raise InputError(
            f"{manifest}: not found; the champion is re-scored on the test split (run the pipeline, or pass --shards)"
        )
    digest = sha256_file(manifest)

    def score(champion: registry.Version) -> float:
        from cifarflow.export import SAVED_MODEL, saved_model_accuracy

        return registry.cached_score(
            registry_dir, champion, digest, lambda v: saved_model_accuracy(v.path / SAVED_MODEL, Path(shards_dir))
        )

    return registry.Gate(params.export.min_accuracy, params.export.tolerance, digest, score)


def run(args: argparse.Namespace, params: Params, registry_dir: Path) -> int:
    if args.list:
        print(registry.render(registry_dir), end="")
        return 0
    if args.gc:
        removed = registry.collect_garbage(registry_dir, args.keep, args.wait)
        print(f"removed {len(removed)} version(s){': ' + ', '.join(removed) if removed else ''}")
        return 0
    if args.rollback is not None:
        event = registry.rollback(registry_dir, args.rollback or None, args.by, args.wait)
        print(f"rolled back: {event['from']} -> {event['to']} ({event['arch']}); {registry_dir / registry.CURRENT}")
        return 0
    event = registry.promote(args.export, registry_dir, gate(params, registry_dir, args.shards), args.force, args.by, args.wait)
    if event["kind"] == "unchanged":
        print(f"unchanged: {event['reason']} ({event['to']})")
    else:
        verdict = event["verdict"]
        against = verdict["champion"]
        print(
            f"promoted {event['arch']} as {event['to']}"
            + (" (FORCED: " + "; ".join(verdict["reasons"]) + ")" if verdict["forced"] else "")
            + (f"; compared with {against['version']} at {against['test_accuracy']:.4f}" if against else "; first champion")
        )
        log.debug("%s", json.dumps(event))
    return 0
