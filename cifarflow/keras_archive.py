"""Byte-stable `.keras` files: the same model and weights give the same bytes.

Three things in a Keras save change from run to run although the model does not: the wall
clock in metadata.json (`date_saved`) and in the zip entry time of model.weights.h5, and in
config.json each `shared_object_id`, which is the Python `id()` (a memory address) of an object
that several layers share, such as the dtype policy. A DVC output that changes like that makes
dvc.lock differ between two identical runs, so the archive is rewritten with the stamps fixed
and the shared ids renumbered in order of first appearance (which keeps what is shared with what).
The weights file is already stable.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

EPOCH = (1980, 1, 1, 0, 0, 0)  # the zip format's earliest time, what Keras uses for its other entries
METADATA, CONFIG = "metadata.json", "config.json"
SHARED_ID = "shared_object_id"


def renumber_shared_ids(config: object, ids: dict[int, int]) -> None:
    if isinstance(config, dict):
        if SHARED_ID in config:
            config[SHARED_ID] = ids.setdefault(config[SHARED_ID], len(ids) + 1)
        for value in config.values():
            renumber_shared_ids(value, ids)
    elif isinstance(config, list):
        for value in config:
            renumber_shared_ids(value, ids)


def normalise(path: Path, target: Path) -> None:
    """Write the byte-stable form of the archive at `path` to `target`. No temp file of its own:
    the caller writes `target` atomically (trainer.save_model_atomic), so a kill leaves nothing
    here that the caller's PID-named temps do not cover."""
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(target, "w") as out:
        for info in source.infolist():
            data = source.read(info)
            if info.filename == METADATA:
                metadata = json.loads(data)
                metadata.pop("date_saved", None)
                data = json.dumps(metadata, sort_keys=True).encode()
            elif info.filename == CONFIG:
                config = json.loads(data)
                renumber_shared_ids(config, {})
                data = json.dumps(config).encode()
            entry = zipfile.ZipInfo(info.filename, date_time=EPOCH)
            entry.compress_type, entry.external_attr = info.compress_type, info.external_attr
            out.writestr(entry, data)
