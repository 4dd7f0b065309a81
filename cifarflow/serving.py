"""The one client of an exported SavedModel: check that an export serves what its card claims, load
its serving signature, and push uint8 images through it SERVING_BATCH at a time. Used by predict, by
promote, by the champion's re-scoring (export and promote, on the test split and the corruption
benchmark) and, as its batch size, by export's serving check.

What an export serves is bound to its card two ways. `served.json` lists the sha256 of every served
file (the SavedModel's, the labels): a file swapped, added or removed is refused by name. The card
holds what is reproducible of them (TensorFlow writes a SavedModel's bytes and variable names
differently each time, its values never): the digest of the variables' values and of the labels.

`rescore` is what the promotion policy compares a candidate with: the current champion's accuracy on
the candidate's test split (and mCA on its benchmark when a gate asks), computed through the
champion's own SavedModel, once per (weights, data) thanks to the registry's score cache.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from cifarflow import registry
from cifarflow.contract import LABELS, MANIFEST, SAVED_MODEL, SERVED, read_card, read_json
from cifarflow.errors import InputError
from cifarflow.fileio import sha256_file, write_json_atomic
from cifarflow.policy import Champion
from cifarflow.settings import Params

# Images per call of the serving signature: 500 uint8 images are 1.5 MB in and 20 KB of scores
# out, large enough that the call overhead vanishes, small enough for any device's memory.
SERVING_BATCH = 500


def _variable_lines(saved_model: Path) -> list[str]:
    """One line per variable of a SavedModel: dtype, shape and the sha256 of its bytes, sorted (the
    names and their order differ between two writes of the same model; the values do not)."""
    import tensorflow as tf

    reader = tf.train.load_checkpoint(str(Path(saved_model) / "variables" / "variables"))
    lines = []
    for name in reader.get_variable_to_shape_map():
        if name.startswith("_CHECKPOINTABLE_OBJECT_GRAPH"):  # the object graph: names, not values
            continue
        value = np.ascontiguousarray(reader.get_tensor(name))
        lines.append(f"{value.dtype}|{value.shape}|{hashlib.sha256(value.tobytes()).hexdigest()}")
    return sorted(lines)


def served_digests(export: Path) -> dict[str, str]:
    """What a model card records of what the export serves: reproducible digests of the SavedModel's
    variable values and of the labels."""
    weights = hashlib.sha256("\n".join(_variable_lines(Path(export) / SAVED_MODEL)).encode()).hexdigest()
    return {"weights_sha256": weights, "labels_sha256": sha256_file(Path(export) / LABELS)}


def served_files(export: Path) -> dict[str, Path]:
    """The files an export serves, by path relative to it: the SavedModel's and the labels."""
    export = Path(export)
    found = {p.relative_to(export).as_posix(): p for p in sorted((export / SAVED_MODEL).rglob("*")) if not p.is_dir()}
    if (export / LABELS).exists():
        found[LABELS] = export / LABELS
    return found


def write_served_manifest(export: Path) -> None:
    """`served.json`: the sha256 of every file the export serves."""
    files = {rel: sha256_file(path) for rel, path in served_files(export).items()}
    write_json_atomic(Path(export) / SERVED, {"files": files})


def check_served(export: Path) -> None:
    """The export serves what its card claims: every file `served.json` lists is there with its
    sha256, no other served file is, and the SavedModel's variables and the labels have the digests
    the card recorded. An InputError naming the file (or what differs) otherwise."""
    export = Path(export)
    listed = read_json(export / SERVED, "export").get("files")
    card = read_card(export)
    if not isinstance(listed, dict) or not isinstance(card.get("served"), dict):
        raise InputError(f"{export}: no list of served files, or a card without them; export again")
    present = served_files(export)
    if missing := sorted(set(listed) - set(present)):
        raise InputError(f"{export / missing[0]}: listed in {SERVED} but missing; the export was changed after it was written")
    if added := sorted(set(present) - set(listed)):
        raise InputError(f"{export / added[0]}: not listed in {SERVED}; the export was changed after it was written")
    for rel, path in present.items():
        if not path.is_file() or path.is_symlink():
            raise InputError(f"{path}: not a regular file; an export holds only files and folders")
        if sha256_file(path) != listed[rel]:
            raise InputError(f"{path}: its sha256 differs from {SERVED}'s; this is not the file the export wrote")
    if served_digests(export) != card["served"]:
        raise InputError(
            f"{export}: the SavedModel's weights or the labels are not the ones its model card records "
            f"(served {card['served']}); export again"
        )


class ServedModel:
    """An export's SavedModel: raw uint8 (N, 32, 32, 3) in, calibrated class probabilities out."""

    def __init__(self, saved_model: Path) -> None:
        import tensorflow as tf

        self.path = Path(saved_model)
        try:
            loaded = tf.saved_model.load(str(self.path))
        except Exception as exc:  # a damaged or foreign SavedModel: TensorFlow's many exception types
            raise InputError(f"{self.path}: not a SavedModel TensorFlow can load ({exc.__class__.__name__})") from None
        serve = getattr(loaded, "signatures", {}).get("serving_default")
        spec = getattr(serve, "structured_input_signature", ((), {}))[1]
        if serve is None or list(spec) != ["images"] or spec["images"].dtype != tf.uint8:
            raise InputError(f"{self.path}: has no serving_default signature taking uint8 `images`; export it again")
        self._serve = serve

    def batches(self, images: np.ndarray) -> Iterator[np.ndarray]:
        """Probabilities for `images`, SERVING_BATCH rows at a time."""
        import tensorflow as tf

        for start in range(0, len(images), SERVING_BATCH):
            batch = tf.constant(np.ascontiguousarray(images[start : start + SERVING_BATCH], np.uint8))
            yield next(iter(self._serve(images=batch).values())).numpy()

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        parts = list(self.batches(images))
        return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)

    def accuracy(self, images: np.ndarray, labels: np.ndarray) -> float:
        """The fraction of `images` whose most probable class is the label (rounded to 6 places, as evaluate's)."""
        if not len(images):
            return 0.0
        return round(float(np.mean(self.probabilities(images).argmax(1) == labels)), 6)


def test_accuracy(saved_model: Path, shards_dir: Path) -> float:
    """A SavedModel's accuracy on the test split of `shards_dir`."""
    from cifarflow.data import shards

    test = shards.read_parquet(shards.shard_paths(shards_dir, "test", "parquet"))
    return ServedModel(saved_model).accuracy(test.images, test.labels)


def mean_corruption_accuracy(saved_model: Path, corrupt_dir: Path, params: Params) -> float:
    """A SavedModel's mCA on the corrupt stage's cells: the mean of its accuracy per cell."""
    from cifarflow.data import corrupt

    _, splits = corrupt.load(corrupt_dir, params)
    model = ServedModel(saved_model)
    cells = [splits[corrupt.cell(*c)] for c in corrupt.cells(params)]
    return round(float(np.mean([model.accuracy(c.images, c.labels) for c in cells])), 6)


def open_export(export: Path) -> ServedModel:
    """An export's served model, after `check_served`: never a SavedModel other than the card's."""
    check_served(export)
    return ServedModel(Path(export) / SAVED_MODEL)


def rescore(
    registry_dir: Path, champion: registry.Version, shards_dir: Path, corrupt_dir: Path | None, params: Params
) -> Champion:
    """The champion as the policy compares it: its test accuracy on `shards_dir` now, and its mCA on
    `corrupt_dir` when export.robustness_vs_champion asks for it; each cached per weights and data."""
    check_served(champion.path)  # the version is the model its card claims (its files, the registry checks)
    saved = champion.path / SAVED_MODEL
    data = sha256_file(Path(shards_dir) / MANIFEST)
    accuracy = registry.cached_score(registry_dir, champion, data, lambda _: test_accuracy(saved, Path(shards_dir)))
    mca = None
    if params.export.robustness_vs_champion and corrupt_dir is not None:
        benchmark = sha256_file(Path(corrupt_dir) / MANIFEST)
        mca = registry.cached_score(
            registry_dir, champion, benchmark, lambda _: mean_corruption_accuracy(saved, Path(corrupt_dir), params), key="mca"
        )
    return Champion(champion.name, champion.digest, accuracy, mca)
