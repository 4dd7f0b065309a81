"""`cifarflow resolve`: the cheap first stage. It writes, for every later stage (and every
architecture of the per-architecture ones), a small JSON file of what that stage reads of
params.yaml with every default filled in, and a digest of the code that decides its outputs. The
stages depend on their file, not on params keys or code paths, so:

- a default in cifarflow.settings that a recipe uses (say `ema.ramp`) is in that recipe's file:
  changing it reruns exactly the stages whose files change;
- a reworded message in settings changes no file: nothing reruns after `resolve`;
- editing evaluation code changes evaluate's code digest, not train's: nothing retrains.

`resolve` itself depends on params.yaml whole and on the package folder; it costs about a second
and never imports TensorFlow. The resume fingerprint of a training run is computed from the same
`inputs(params, "train", arch)`, so a checkpoint is reused exactly when the stage would not rerun.

Code lists (STAGE_CODE) name what decides a stage's outputs, relative to the package. Modules whose
code cannot change them are left out: the settings (their values are in the file), errors and
messages, the CLI. cifarflow.contract counts only for the stages that read other stages' files
through its readers (evaluate, export, report); for the others it is file names, which are also
the outs dvc.yaml declares, so a renamed file changes the stage itself.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from cifarflow.contract import RESOLVED_SUFFIX
from cifarflow.fileio import atomic_dir, dumps_json
from cifarflow.settings import Params

CODE_ROOT = Path(__file__).resolve().parent  # the cifarflow package

_DATA = ("data/shards.py", "data/cifar_binary.py", "data/verdict.py", "pixels.py", "fileio.py")
_MODELS_LOADED = ("models/catalog.py", "models/registry.py", "models/layers.py", "normalization.py")  # load_model
STAGE_CODE: dict[str, tuple[str, ...]] = {
    "preprocess": ("data/preprocess.py", "data/tfrecord.py", *_DATA),
    "validate": ("data/validate.py", *_DATA),
    "corrupt": ("data/corrupt.py", "data/corruptions.py", "data/preprocess.py", *_DATA),  # preprocess: stratified_split
    # the trainer, every model family, and what turns shards into batches and weights into files
    "train": (
        "training",
        "models",
        "data/inputs.py",
        "normalization.py",
        "digest.py",
        "keras_archive.py",
        "numerics.py",  # summary.json's record of the host
        "portable.py",  # the numeric environment every TensorFlow stage's process starts with
        *_DATA,
    ),
    "evaluate": (
        "evaluate.py",
        "calibration.py",
        "robustness.py",
        "figures.py",
        "contract.py",  # its readers
        "data/corrupt.py",
        "data/inputs.py",
        "portable.py",
        *_MODELS_LOADED,
        *_DATA,
    ),
    "export": (
        "export.py",
        "policy.py",
        "leaderboard.py",
        "serving.py",
        "registry.py",
        "evaluate.py",  # its predictions CSVs, read back
        "calibration.py",
        "figures.py",  # reliability.png
        "provenance.py",  # the card's provenance and MODEL_CARD.md's line of it
        "numerics.py",  # MODEL_CARD.md's line of the training host
        "sources.py",  # what the card calls the data
        "contract.py",  # its readers
        "data/corrupt.py",
        "portable.py",
        *_MODELS_LOADED,
        *_DATA,
    ),
    "report": ("report.py", "leaderboard.py", "policy.py", "figures.py", "sources.py", "contract.py", "fileio.py"),
}
PER_ARCH = ("train", "evaluate")  # dvc.yaml's `foreach: ${archs}` stages
# What training imports besides STAGE_CODE["train"], none of which can change its outputs
# (tests/test_train.py checks that training loads nothing else).
NOT_DECIDING_TRAIN = (
    "__init__.py",
    "data/__init__.py",
    "settings.py",  # parses params.yaml: the values it yields are in the resolved file
    "strict.py",
    "sources.py",
    "bounded_yaml.py",
    "dvcfile.py",
    "champion.py",
    "openfile.py",
    "contract.py",  # file names: also dvc.yaml's declared outs
    "resolved.py",
    "errors.py",  # exception classes and exit codes
    "redact.py",  # how URLs appear in messages
)


def code_sha256(stage: str) -> str:
    """sha256 over the stage's code files (every .py under a listed folder), names and bytes."""
    digest = hashlib.sha256()
    for rel in STAGE_CODE[stage]:
        path = CODE_ROOT / rel
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            digest.update(f"{file.relative_to(CODE_ROOT).as_posix()}\0".encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()


# Runtime settings training reads that cannot change its outputs: where the checkpoints live is not
# what they hold (a run resumed from another store ends with the same bytes).
RUNTIME_NOT_DECIDING = frozenset({"checkpoint_store"})


def _train(params: Params, arch: str) -> dict[str, Any]:
    return {
        "seed": params.seed,
        "data": {"format": params.data.format},
        "runtime": params.runtime.model_dump(mode="json", exclude=set(RUNTIME_NOT_DECIDING)),
        "recipe": params.recipe(arch).model_dump(mode="json"),
    }


def _numerics(params: Params) -> dict[str, Any]:
    """What sets the numeric environment of a TensorFlow stage's process (cifarflow.portable)."""
    return {"runtime": {"portable": params.runtime.portable, "threads": params.runtime.threads}}


def reads(params: Params, stage: str, arch: str | None = None) -> dict[str, Any]:
    """What `stage` (of `arch`, for the per-architecture stages) reads of the resolved params."""
    if stage == "preprocess":
        return {"seed": params.seed, "data": {"val_size": params.data.val_size, "shards": params.data.shards}}
    if stage == "validate":
        return {"data": {"fail_on_leakage": params.data.fail_on_leakage}}
    if stage == "corrupt":
        return {"seed": params.seed, "robustness": params.robustness.model_dump(mode="json")}
    if stage == "train":
        return _train(params, str(arch))
    if stage == "evaluate":
        return {
            "seed": params.seed,  # the prediction grid's sample, the benchmark's bootstrap
            "data": {"format": params.data.format},
            "evaluate": params.evaluate.model_dump(mode="json"),
            "robustness": params.robustness.model_dump(mode="json"),
            "normalization": params.recipe(str(arch)).normalization,
            **_numerics(params),
        }
    if stage == "export":
        return {
            "profile": params.profile,
            "seed": params.seed,
            "archs": params.archs,
            "export": params.export.model_dump(mode="json"),
            "robustness": params.robustness.model_dump(mode="json"),
            "normalization": {a: params.recipe(a).normalization for a in params.archs},
            **_numerics(params),
        }
    if stage == "report":
        return {"profile": params.profile, "archs": params.archs}
    raise KeyError(f"no stage {stage!r} reads resolved settings; stages: {', '.join(STAGE_CODE)}")


def inputs(params: Params, stage: str, arch: str | None = None) -> dict[str, Any]:
    """The content of the stage's resolved file: what it reads, and its code's digest."""
    return {"reads": reads(params, stage, arch), "code_sha256": code_sha256(stage)}


def settings_sha256(params: Params, stage: str, arch: str | None = None) -> str:
    """sha256 of the stage's resolved file's bytes (what a model card records as its settings)."""
    return hashlib.sha256(dumps_json(inputs(params, stage, arch)).encode()).hexdigest()


def relative_path(stage: str, arch: str | None = None) -> str:
    """The file of `stage` (of `arch`) inside the resolve stage's folder."""
    return f"{stage}/{arch}{RESOLVED_SUFFIX}" if stage in PER_ARCH else f"{stage}{RESOLVED_SUFFIX}"


def files(params: Params) -> dict[str, dict[str, Any]]:
    """Every resolved file: relative path -> content."""
    found = {}
    for stage in STAGE_CODE:
        for arch in params.archs if stage in PER_ARCH else [None]:
            found[relative_path(stage, arch)] = inputs(params, stage, arch)
    return found


def run(params: Params, out: Path) -> dict[str, dict[str, Any]]:
    """Write every resolved file into `out` (replaced whole, atomically)."""
    written = files(params)
    with atomic_dir(Path(out)) as tmp:
        for rel, content in written.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_text(dumps_json(content))
    return written
