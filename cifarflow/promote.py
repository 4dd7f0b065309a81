"""`cifarflow promote`: copy a blessed export to the champion folder, keeping the previous
champion as `<champion>.previous`. The champion lives outside DVC outputs, so no rerun deletes it."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from cifarflow.errors import InputError

log = logging.getLogger(__name__)
CARD = "model_card.json"


def promote(export: Path, champion: Path, force: bool = False) -> Path:
    """Returns the champion folder. Refuses an unblessed export unless `force`."""
    export, champion = Path(export), Path(champion)
    if not (export / CARD).is_file():
        raise InputError(f"{export / CARD}: not found; run the export stage first")
    card = json.loads((export / CARD).read_text())
    if not card["blessed"] and not force:
        reasons = "; ".join(card["blessing_reasons"])
        raise InputError(f"{export} is not blessed ({reasons}); refusing to promote it (use --force to override)")
    champion.parent.mkdir(parents=True, exist_ok=True)
    incoming = champion.with_name(f".{champion.name}.incoming")
    shutil.rmtree(incoming, ignore_errors=True)
    shutil.copytree(export, incoming)  # copied first: a failure leaves the current champion alone
    backup = champion.with_name(f"{champion.name}.previous")
    if champion.exists():
        shutil.rmtree(backup, ignore_errors=True)
        os.replace(champion, backup)
    os.replace(incoming, champion)
    log.info("promoted %s (%s, blessed=%s) to %s; previous champion in %s", export, card["arch"], card["blessed"],
             champion, backup if backup.exists() else "(none)")
    return champion
