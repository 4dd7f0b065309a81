"""Typed, strict params: params.yaml parsed once into frozen pydantic models.

params.yaml holds the `full` settings at top level and, under `profiles.<name>`, overlays
that `profile: <name>` deep-merges on top. Every overlay is validated on every load, so a
typo in the smoke overlay is caught even while the full profile is selected.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cifarflow.errors import ConfigError
from cifarflow.models.catalog import (
    NORMALIZATION_HELP,
    STEMS,
    TTA_FAMILIES,
    WIDTHS,
    XLA_FAMILIES,
    Family,
    Normalization,
    Stem,
    Variant,
)
from cifarflow.redact import has_userinfo, redact_url, short

DEFAULT_PARAMS = Path("params.yaml")
OFFICIAL_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
OFFICIAL_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
SYNTH_PREFIX = "synth:"


class Strict(BaseModel):
    """Base of every params section: unknown keys are errors, values are immutable, and no float
    is infinite or NaN (`.inf` would pass any `gt=0` bound and poison a run)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


MAX_EXAMPLES = 200_000  # a generated split larger than this is a typo, not a dataset (60,000 is CIFAR-10)
MAX_EPOCHS = 10_000
MAX_BATCH = 65_536
NAME = re.compile(r"^[a-z0-9][a-z0-9_]{0,63}$")  # architecture and profile names: DVC stage names and paths


class SynthSpec(Strict):
    """A generated source, written in params as `synth:train=2000,test=500,seed=0`; `mislabel=15` gives 15% of
    the labels another class (see data/synth.py)."""

    train: int = Field(ge=10, le=MAX_EXAMPLES)
    test: int = Field(ge=10, le=MAX_EXAMPLES)
    seed: int = Field(0, ge=0, le=2**32 - 1)
    mislabel: int = Field(0, ge=0, le=90, description="percent of labels replaced by another class")

    @classmethod
    def parse(cls, text: str) -> SynthSpec:
        body = text[len(SYNTH_PREFIX) :]
        fields: dict[str, int] = {}
        for part in filter(None, body.split(",")):
            key, sep, value = part.partition("=")
            if not sep or not value.strip().isdigit() or len(value.strip()) > 12:
                raise ValueError(f"bad synth source part {short(part)}; expected key=integer, e.g. {SYNTH_EXAMPLE}")
            if key.strip() not in cls.model_fields:
                raise ValueError(f"unknown synth key {short(key.strip())}; valid: {', '.join(cls.model_fields)}")
            fields[key.strip()] = int(value)
        try:
            return cls(**fields)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise ValueError(
                f"synth {first['loc'][0]}={fields.get(str(first['loc'][0]))}: {first['msg']} (in {SYNTH_EXAMPLE}-style sources)"
            ) from None

    def __str__(self) -> str:
        noise = f",mislabel={self.mislabel}" if self.mislabel else ""
        return f"{SYNTH_PREFIX}train={self.train},test={self.test},seed={self.seed}{noise}"


SYNTH_EXAMPLE = "synth:train=2000,test=500,seed=0"
HEX = {"md5": re.compile(r"^[0-9a-f]{32}$"), "sha256": re.compile(r"^[0-9a-f]{64}$")}


class DataParams(Strict):
    """The `download` and `preprocess` stages."""

    source: str | Annotated[list[Annotated[str, Field(max_length=4096)]], Field(max_length=16)] = Field(
        OFFICIAL_URL,
        description="http(s):// or file:// URL, local archive path, image folder, or synth:...; "
        "a list (at most 16) is tried in order as mirrors",
    )
    md5: str | None = OFFICIAL_MD5
    sha256: str | None = None
    allow_unverified: bool = False
    retries: int = Field(5, ge=0, le=100, description="retries per mirror on transient errors")
    timeout_s: float = Field(60.0, gt=0, le=3600, description="socket timeout per request, seconds")
    deadline_s: float = Field(
        3600.0, gt=0, le=86_400, description="overall limit per mirror attempt, seconds, however the server trickles"
    )
    max_download_mb: int = Field(
        1024, ge=1, le=1 << 20, description="bytes one download may bring, or a local archive (path or file://) may have, in MiB"
    )
    max_member_mb: int = Field(1024, ge=1, le=1 << 20, description="largest archive member accepted, MiB")
    max_extract_mb: int = Field(1024, ge=1, le=1 << 20, description="decompressed bytes of an archive, MiB")
    max_members: int = Field(
        100_000, ge=1, le=10_000_000, description="archive members, or files of an image folder, read at most"
    )
    max_image_pixels: int = Field(
        4096 * 4096,
        ge=32 * 32,
        le=1 << 31,
        description="pixels of one image file (image folders, predict): larger is that file's error, the rest go on",
    )
    val_size: int = Field(5000, ge=1, le=10_000_000, description="validation examples carved from train")
    shards: int = Field(8, ge=1, le=4096, description="shards per split, per format")
    fail_on_leakage: bool = False
    format: Literal["parquet", "tfrecord"] = Field("parquet", description="the shards training reads")

    @property
    def sources(self) -> list[str]:
        return [self.source] if isinstance(self.source, str) else list(self.source)

    @field_validator("source")
    @classmethod
    def _sources_parse(cls, value: str | list[str]) -> str | list[str]:
        items = [value] if isinstance(value, str) else value
        if not items:
            raise ValueError("give at least one source")
        for item in items:
            if not item.strip():
                raise ValueError("a source is empty")
            if len(item) > 4096:
                raise ValueError(f"a source is {len(item):,} characters long; at most 4096")
            if item != item.strip():
                raise ValueError("a source starts or ends with whitespace; remove it")
            if item.startswith(SYNTH_PREFIX):
                SynthSpec.parse(item)
            scheme = URL_SCHEME.match(item)
            if scheme and not item.startswith(SYNTH_PREFIX):  # URL-shaped: never echoed, it may hold a password
                if scheme[1] not in SCHEMES or not item.startswith(f"{scheme[1]}://"):
                    raise ValueError(
                        f"a source starts with the scheme {short(scheme[1], 20)}: but is not an "
                        f"{'/'.join(SCHEMES)} URL written <scheme>://... in lowercase (the source is not "
                        "shown: it may carry credentials)"
                    )
            if source_kind(item) == "url" and has_userinfo(item):
                # The password must not be echoed: DVC copies params into dvc.lock and experiment refs.
                raise ValueError(
                    f"{redact_url(item)} carries credentials (user:password@) in params.yaml, which DVC "
                    "copies into dvc.lock and experiments; remove them and put them in ~/.netrc (read "
                    "by the HTTP client) or pass a signed URL (its query string is redacted in every "
                    "log and file)"
                )
        return value

    @field_validator("md5", "sha256")
    @classmethod
    def _hex(cls, value: str | None, info: Any) -> str | None:
        if value is not None and not HEX[info.field_name].match(value):
            raise ValueError(f"not a lowercase hex {info.field_name} digest: {short(value)}")
        return value

    @model_validator(mode="after")
    def _checksums_fit_sources(self) -> DataParams:
        # Local paths are checked at download time, once it is known whether they are
        # an archive or an image folder; URLs and generated sources are known by syntax.
        for source in self.sources:
            kind = source_kind(source)
            if kind in ("synth", "url"):
                check_checksum_keys(self, kind, source)
        return self

    @model_validator(mode="after")
    def _splits_fit_generated_sources(self) -> DataParams:
        # A generated source's size is known now; an archive's is checked by preprocess before it writes.
        for source in self.sources:
            if source_kind(source) == "synth":
                spec = SynthSpec.parse(source)
                check_split_sizes(spec.train, spec.test, self.val_size, self.shards)
        return self

    def checksum_keys_set(self) -> list[str]:
        return [f"data.{k}" for k in ("md5", "sha256") if getattr(self, k) is not None]


def check_split_sizes(train: int, test: int, val_size: int, shards: int) -> None:
    """data.val_size leaves examples to train on, and every split fills data.shards shards."""
    if not 0 < val_size < train:
        raise ValueError(
            f"data.val_size is {val_size} but the source has {train} train examples; set 0 < data.val_size < {train}"
        )
    smallest = min(train - val_size, val_size, test)
    if shards > smallest:
        raise ValueError(
            f"data.shards is {shards} but the smallest split has {smallest} examples "
            f"(train {train - val_size}, val {val_size}, test {test}); set data.shards <= {smallest}"
        )


SCHEMES = ("http", "https", "file")
URL_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")  # two letters at least: "C:" is a drive, not a scheme


def source_kind(source: str) -> Literal["synth", "url", "local"]:
    if source.startswith(SYNTH_PREFIX):
        return "synth"
    if re.match(r"^(https?|file)://", source):
        return "url"
    return "local"


def check_checksum_keys(data: DataParams, kind: str, source: str) -> None:
    """Archives need a checksum (or allow_unverified); generated or folder sources must have none."""
    set_keys = data.checksum_keys_set()
    if kind in ("synth", "image-folder") and set_keys:
        raise ValueError(
            f"checksums do not apply to {'a generated' if kind == 'synth' else 'an image-folder'} "
            f"source ({redact_url(source)}); set {' and '.join(set_keys)} to null"
        )
    if kind in ("url", "archive") and not set_keys and not data.allow_unverified:
        raise ValueError(
            f"no checksum for the archive source {redact_url(source)}: set data.md5 or data.sha256, "
            "or set data.allow_unverified: true"
        )


class OptimizerParams(Strict):
    name: Literal["adam", "adamax", "sgd"]
    learning_rate: float = Field(gt=0, le=10, description="at `lr_reference_batch` examples per step")
    lr_reference_batch: int | None = Field(
        None, ge=1, le=MAX_BATCH, description="scale the rate by batch_size / this (seed 002: 128); null: no scaling"
    )
    momentum: float = Field(0.0, ge=0, lt=1, description="sgd only")
    nesterov: bool = Field(False, description="sgd only")
    norm_bias_rate: float = Field(
        1.0, gt=0, le=1000, description="sgd only: BatchNorm offsets learn at this multiple of the rate"
    )


class ScheduleParams(Strict):
    """How the learning rate moves per epoch: constant, exponential (rate·decay^epoch),
    step (×multiplier from each boundary epoch), or plateau (×factor after `patience`
    epochs without improving the monitored validation metric); or per optimizer step:
    warmup_linear (×start rising linearly to ×1 over the first `warmup` fraction of all
    steps, then falling linearly to ×end at the last step)."""

    kind: Literal["constant", "exponential", "step", "plateau", "warmup_linear"] = "constant"
    decay: float = Field(0.9, gt=0, le=1, description="exponential")
    boundaries: list[Annotated[int, Field(ge=0, le=MAX_EPOCHS)]] = Field(
        default_factory=list, max_length=64, description="step: epochs where a multiplier starts"
    )
    multipliers: list[Annotated[float, Field(gt=0, le=1000)]] = Field(
        default_factory=list, max_length=64, description="step: one per boundary"
    )
    monitor: Literal["val_loss", "val_accuracy"] = Field("val_loss", description="plateau")
    factor: float = Field(0.1, gt=0, lt=1, description="plateau")
    patience: int = Field(10, ge=0, le=MAX_EPOCHS, description="plateau")
    min_lr: float = Field(1e-6, ge=0, le=10, description="plateau")
    warmup: float = Field(0.23, ge=0, lt=1, description="warmup_linear: fraction of all steps")
    start: float = Field(0.2, ge=0, le=1, description="warmup_linear: multiplier at the first step")
    end: float = Field(0.07, ge=0, le=1, description="warmup_linear: multiplier at the last step")

    @model_validator(mode="after")
    def _steps(self) -> ScheduleParams:
        if len(self.boundaries) != len(self.multipliers):
            raise ValueError("boundaries and multipliers need one entry each")
        if self.boundaries != sorted(set(self.boundaries)):
            raise ValueError(f"boundaries must be increasing epochs, got {self.boundaries}")
        return self


class MixupParams(Strict):
    alpha: float = Field(1.0, gt=0, le=1000, description="Beta(alpha, alpha) mixing weights")
    warmup: int = Field(1, ge=0, le=MAX_EPOCHS, description="epochs without mixup first")


class EmaParams(Strict):
    """Lookahead (sgd only): an exponential moving average of the weights, copied into the model
    every `every` steps and at the end of every epoch; its momentum per step rises from 0 to
    `momentum` over the run as momentum·(step/steps)^ramp (airbench: 0.95, every 5, ramp 3)."""

    momentum: float = Field(0.95, ge=0, lt=1, description="per step, at the last step")
    every: int = Field(5, ge=1, le=100_000, description="steps between copies into the model")
    ramp: float = Field(3.0, ge=0, le=100, description="0: the same momentum throughout")


class Recipe(Strict):
    """One architecture's training recipe; defaults come from its seed tutorial."""

    # The names come from cifarflow.models.catalog: a bad one is an error listing the valid ones.
    model: Family
    variant: Variant = Field("full", description="tiny: a small model for tests and smoke")
    stem: Stem | None = Field(None, description=f"{', '.join(STEMS)} only")
    epochs: int = Field(ge=1, le=MAX_EPOCHS)
    batch_size: int = Field(ge=1, le=MAX_BATCH, description="global batch: split across replicas")
    optimizer: OptimizerParams
    schedule: ScheduleParams = ScheduleParams()
    normalization: Normalization = Field(description=NORMALIZATION_HELP)
    width: int | None = Field(None, ge=1, le=1024, description=f"{', '.join(WIDTHS)} only: the first stage's channels")
    tta_level: Literal[1, 2] | None = Field(
        None,
        description=f"{', '.join(TTA_FAMILIES)} only: test-time views the model averages at inference "
        "(1: image and mirror, the default; 2: also both shifted by a pixel)",
    )
    augmentation: Literal["none", "crop_flip", "flip_translate"] = Field(
        "none",
        description="crop_flip: pad 4 (zeros), random 32x32 crop, random h-flip; flip_translate: pad 2 (reflect), "
        "random crop, h-flip alternating per epoch (random once, the opposite every odd epoch)",
    )
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    ema: EmaParams | None = None
    jit_compile: bool = Field(
        False, description=f"XLA for the training step, op determinism kept; {', '.join(XLA_FAMILIES)} only"
    )
    drop_remainder: bool = False
    mixup: MixupParams | None = None
    monitor: Literal["val_accuracy", "val_loss"] = Field("val_accuracy", description="which epoch is the best checkpoint")
    validate_every: int = Field(
        1,
        ge=1,
        le=MAX_EPOCHS,
        description="validate after every N-th epoch and after the last; the best checkpoint is the best validated one",
    )

    @model_validator(mode="after")
    def _stem(self) -> Recipe:
        stems = STEMS.get(self.model)
        if stems and self.stem is None:
            raise ValueError(f"{self.model} needs stem: {stems[0]} (the seed) or {' or '.join(stems[1:])}")
        if stems and self.stem not in stems:
            raise ValueError(f"{self.model} has no stem {self.stem!r}; valid: {', '.join(stems)}")
        if not stems and self.stem is not None:
            raise ValueError(f"stem applies to {', '.join(STEMS)} only; remove it from this {self.model} recipe")
        if self.optimizer.norm_bias_rate != 1 and self.optimizer.name != "sgd":
            raise ValueError(f"optimizer.norm_bias_rate applies to sgd only, not {self.optimizer.name}")
        if self.ema is not None and self.optimizer.name != "sgd":
            raise ValueError(f"ema (lookahead) applies to optimizer sgd only, not {self.optimizer.name}")
        if self.tta_level is not None and self.model not in TTA_FAMILIES:
            raise ValueError(f"tta_level applies to {', '.join(TTA_FAMILIES)} only; remove it from this {self.model} recipe")
        if self.width is not None and self.model not in WIDTHS:
            raise ValueError(f"width applies to {', '.join(WIDTHS)} only; remove it from this {self.model} recipe")
        if self.validate_every > 1 and self.schedule.kind == "plateau":
            raise ValueError("schedule plateau reads val every epoch: validate_every must be 1 with it")
        if self.jit_compile and self.model not in XLA_FAMILIES:
            raise ValueError(
                f"jit_compile: true needs a model whose training step compiles with deterministic XLA kernels "
                f"({', '.join(XLA_FAMILIES)}); {self.model} is not one (max pooling's gradient, for one, has no "
                "such kernel on CPU): set jit_compile: false"
            )
        return self


class RuntimeParams(Strict):
    """How training runs, not what it computes."""

    deterministic: bool = Field(True, description="op determinism: bit-identical weights on CPU")
    distribution: Literal["auto", "none", "mirrored", "multi_worker"] = Field(
        "auto",
        description="auto: MirroredStrategy when more than one GPU is visible; multi_worker: "
        "MultiWorkerMirroredStrategy, one process per node, each given the cluster and its task in TF_CONFIG",
    )
    precision: Literal["float32", "mixed_float16", "mixed_bfloat16"] = "float32"
    logical_cpus: int = Field(0, ge=0, le=64, description="split the CPU into N logical devices (0: leave it)")
    oom_min_micro_batch: int = Field(4, ge=1, le=MAX_BATCH, description="out of memory below this micro-batch: give up")

    @model_validator(mode="after")
    def _runs_as_written(self) -> RuntimeParams:
        # Combinations that would run otherwise than written are refused at load, so `params --check`
        # catches them before a training process starts.
        if self.distribution == "multi_worker" and self.logical_cpus:
            raise ValueError(
                "logical_cpus applies to distribution: mirrored; multi_worker uses one CPU, or all GPUs, per node: "
                "set logical_cpus: 0"
            )
        return self


class EvaluateParams(Strict):
    """The `evaluate@<arch>` stages."""

    tta: bool = Field(False, description="also report horizontal-flip test-time augmentation (separate fields)")
    batch_size: int = Field(500, ge=1, le=MAX_BATCH, description="inference batch")


CORRUPTIONS = (  # cifarflow.data.corruptions.FAMILIES, named here so that config needs no scipy (a test checks they agree)
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)  # fmt: skip


class RobustnessParams(Strict):
    """The `corrupt` stage and the corrupted evaluation: CIFAR-10-C's corruptions of a test subset."""

    images: int = Field(
        2000, ge=10, le=MAX_EXAMPLES, description="test images corrupted, stratified by class (all when >= the split)"
    )
    families: list[Literal[CORRUPTIONS]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: list(CORRUPTIONS), min_length=1, max_length=len(CORRUPTIONS)
    )
    severities: list[Annotated[int, Field(ge=1, le=5)]] = Field(
        default_factory=lambda: [1, 2, 3, 4, 5], min_length=1, max_length=5
    )

    @model_validator(mode="after")
    def _no_repeats(self) -> RobustnessParams:
        for name, values in (("families", self.families), ("severities", self.severities)):
            if len(set(values)) != len(values):
                raise ValueError(f"robustness.{name} lists a value twice: {values}")
        return self


class ExportParams(Strict):
    """The `export` stage: selection, blessing, and where the champion lives."""

    metric: Literal["val_accuracy", "val_loss"] = Field("val_accuracy", description="selects the best arch")
    min_accuracy: float = Field(0.5, ge=0, le=1, description="test accuracy a model needs to be blessed")
    tolerance: float = Field(0.01, ge=0, le=1, description="how far below the champion's test accuracy is still blessed")
    significance: float = Field(0.05, gt=0, lt=1, description="McNemar p-value that makes the winner significantly better")
    min_corruption_accuracy: float | None = Field(
        None, ge=0, le=1, description="mean corruption accuracy (mCA) a model needs to be blessed; null: no such gate"
    )
    robustness_vs_champion: bool = Field(
        False, description="blessed only if its mCA is not below the champion's (re-scored now) by more than `tolerance`"
    )
    champion_dir: str = Field(
        "champion",
        min_length=1,
        max_length=4096,
        description="the champion registry: where `cifarflow promote` keeps versions (not inside data/ or a DVC output)",
    )


class Params(Strict):
    """The whole resolved configuration, after the profile overlay."""

    profile: str = "full"
    seed: int = Field(42, ge=0, le=2**31 - 1)
    data: DataParams = DataParams()
    archs: list[str] = Field(default_factory=list, max_length=64, description="what the DAG trains and export considers")
    runtime: RuntimeParams = RuntimeParams()
    train: dict[str, Recipe] = Field(default_factory=dict, max_length=64)
    evaluate: EvaluateParams = EvaluateParams()
    robustness: RobustnessParams = RobustnessParams()
    export: ExportParams = ExportParams()

    @model_validator(mode="after")
    def _archs_have_recipes(self) -> Params:
        bad = [name for name in [*self.train, *self.archs] if not NAME.match(name)]
        if bad:  # they become DVC stage names and folder names: nothing that could leave data/
            raise ValueError(
                f"architecture name {short(bad[0])} is not lowercase letters, digits and _ "
                "(at most 64, starting with a letter or digit)"
            )
        missing = [a for a in self.archs if a not in self.train]
        if missing:
            raise ValueError(f"archs {missing} have no recipe under train:; recipes: {', '.join(self.train)}")
        if len(set(self.archs)) != len(self.archs):
            raise ValueError(f"archs lists an architecture twice: {self.archs}")
        if self.runtime.distribution == "multi_worker":
            xla = [arch for arch in self.archs if self.train[arch].jit_compile]
            if xla:  # its strategy.run steps are not compiled with XLA
                raise ValueError(f"distribution: multi_worker runs without XLA: set jit_compile: false in train.{xla[0]}")
        return self

    def recipe(self, arch: str) -> Recipe:
        """The recipe of `arch`, or a ConfigError listing the valid names (exit 2)."""
        if arch not in self.train:
            close = difflib.get_close_matches(arch, list(self.train), n=1)
            hint = f" did you mean {close[0]}?" if close else ""
            raise ConfigError(f"unknown arch {arch!r}:{hint} valid: {', '.join(self.train)} (the keys of train:)")
        return self.train[arch]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


FULL = "full"
PROFILE_KEYS = ("profile", "profiles")


def deep_merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """Return `base` with `overlay`'s leaves set on top (dicts merge, everything else replaces)."""
    merged = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _has_path(tree: Any, path: tuple[Any, ...]) -> bool:
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return False
        tree = tree[key]
    return True


def _model_at(path: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model class that holds the key at `path`, for listing valid keys."""
    model: type[BaseModel] = Params
    keys = list(path[:-1])
    while keys:
        field = model.model_fields.get(str(keys.pop(0)))
        annotation = getattr(field, "annotation", None)
        if typing.get_origin(annotation) is dict and keys:  # train.<arch>: skip the arch name
            keys.pop(0)
            annotation = typing.get_args(annotation)[1]
        members = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else ()
        annotation = next((m for m in members if isinstance(m, type) and issubclass(m, BaseModel)), annotation)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def _describe(error: dict[str, Any], source: str, overlay: dict[str, Any] | None, profile: str) -> str:
    loc = tuple(p for p in error["loc"] if not (isinstance(p, str) and p.startswith(("function-", "str", "list["))))
    where = ".".join(str(p) for p in loc) or "(top level)"
    if overlay is not None and loc and _has_path(overlay, loc):
        where = f"profiles.{profile}.{where}"
    if error["type"] == "extra_forbidden":
        model = _model_at(loc)
        valid = list(model.model_fields) if model else []
        close = difflib.get_close_matches(str(loc[-1]), valid, n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        return f"{source}: unknown key '{where}'{hint} Valid keys here: {', '.join(valid)}"
    message = error["msg"].removeprefix("Value error, ")
    secret = loc[:2] == ("data", "source")  # a source may carry credentials in any form: never echoed
    if "input" in error and error["type"] != "missing" and not isinstance(error["input"], dict) and not secret:
        message += f" (got {short(error['input'])})"  # bounded and redacted: never a whole huge value
    return f"{source}: {where}: {message}"


MAX_ERRORS = 10  # lines of a ConfigError; the rest are counted
MAX_LINE = 600  # characters of one of its lines


def short_line(line: str) -> str:
    return line if len(line) <= MAX_LINE else f"{line[:MAX_LINE]}… ({len(line):,} characters)"


def _validate(raw: dict[str, Any], source: str, overlay: dict[str, Any] | None, profile: str) -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors()
        # Each line bounded too: a key or a validator's message may quote a huge input.
        lines = [short_line(_describe(e, source, overlay, profile)) for e in errors[:MAX_ERRORS]]
        if len(errors) > MAX_ERRORS:
            lines.append(f"... and {len(errors) - MAX_ERRORS} more")
        raise ConfigError("invalid configuration\n  " + "\n  ".join(lines)) from None


def resolve(raw: dict[str, Any], source: str = str(DEFAULT_PARAMS)) -> Params:
    """Validate the base and every profile overlay; return the selected profile's params."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections at top level, got {type(raw).__name__}")
    raw = dict(raw)
    profiles = raw.pop("profiles", None) or {}
    if not isinstance(profiles, dict) or not all(isinstance(v, dict) for v in profiles.values()):
        raise ConfigError(f"{source}: profiles: expected a mapping of profile name -> overlay mapping")
    bad = [name for name in profiles if not isinstance(name, str) or not NAME.match(name)]
    if bad:  # a profile names the folder it runs in (runs/<profile>/): nothing that could leave it
        raise ConfigError(
            f"{source}: profiles: profile name {short(bad[0])} is not lowercase letters, digits and _ "
            "(at most 64, starting with a letter or digit)"
        )
    selected = raw.get("profile", FULL)
    known = [FULL, *profiles]
    if selected not in known:
        valid = short(", ".join(map(str, known)), 400)
        raise ConfigError(f"{source}: profile: unknown profile {short(selected)}; valid: {valid}")
    resolved = {FULL: _validate({**raw, "profile": FULL}, source, None, FULL)}
    for name, overlay in profiles.items():
        if any(key in overlay for key in PROFILE_KEYS):
            raise ConfigError(f"{source}: profiles.{name}: an overlay cannot set profile or profiles")
        resolved[name] = _validate(deep_merge({**raw, "profile": name}, overlay), source, overlay, name)
    return resolved[selected]


MAX_PARAMS_BYTES = 1 << 20  # params.yaml is a few KB; a MiB is not a settings file
MAX_YAML_NODES = 100_000  # scalars, sequences and mappings after every alias is expanded


MAX_YAML_DEPTH = 64  # nesting levels: params.yaml needs about 6


def expanded_size(root: yaml.Node, path: str) -> int:
    """How many nodes `root` becomes once its aliases are expanded, memoised per node (so a "billion
    laughs" document is measured in time linear in its text), iteratively (so deep nesting is an
    error, not a RecursionError); also refuses recursive aliases and duplicate keys (DVC refuses them)."""
    sizes: dict[int, int] = {}
    ancestors: set[int] = set()
    stack: list[tuple[yaml.Node, int, bool]] = [(root, 0, False)]
    while stack:
        node, depth, done = stack.pop()
        children = (
            list(node.value)
            if isinstance(node, yaml.SequenceNode)
            else ([n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else [])
        )
        if done:
            ancestors.discard(id(node))
            sizes[id(node)] = min(1 + sum(sizes[id(c)] for c in children), MAX_YAML_NODES + 1)
            continue
        if id(node) in sizes:
            continue
        if id(node) in ancestors:
            raise ConfigError(f"{path}: a YAML alias refers to a node that contains it (a recursive document)")
        if depth > MAX_YAML_DEPTH:
            raise ConfigError(f"{path}: line {node.start_mark.line + 1}: nested more than {MAX_YAML_DEPTH} levels deep")
        if isinstance(node, yaml.MappingNode):
            keys = [k.value for k, _ in node.value if isinstance(k, yaml.ScalarNode)]
            twice = next((k for k, _ in node.value if isinstance(k, yaml.ScalarNode) and keys.count(k.value) > 1), None)
            if twice is not None and len(keys) < 10_000:
                raise ConfigError(
                    f"{path}: line {twice.start_mark.line + 1}: key {short(twice.value)} appears twice in "
                    "one mapping (DVC refuses such a file); keep one"
                )
        ancestors.add(id(node))
        stack.append((node, depth, True))
        stack.extend((c, depth + 1, False) for c in children if id(c) not in sizes)
    return sizes[id(root)]


def read_yaml(path: Path) -> Any:
    """YAML, parsed safely and within bounds: at most MAX_PARAMS_BYTES of text and MAX_YAML_NODES
    nodes after alias expansion (DVC parses params.yaml too, so `params --check` runs first)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PARAMS_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found; run from the project root or pass --params") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder; --params takes a YAML file") from None
    if len(data) > MAX_PARAMS_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_PARAMS_BYTES:,} bytes; not a params file")
    try:
        node = yaml.compose(data.decode("utf-8"), Loader=yaml.SafeLoader)
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except (yaml.YAMLError, RecursionError) as exc:
        raise ConfigError(f"{path}: not valid YAML: {short(str(exc), 400)}") from None
    if node is None:
        return {}
    size = expanded_size(node, str(path))
    if size > MAX_YAML_NODES:
        raise ConfigError(
            f"{path}: expands to more than {MAX_YAML_NODES:,} YAML nodes (aliases and anchors "
            "repeating large parts?); write the values out"
        )
    try:
        return yaml.SafeLoader(data.decode("utf-8")).get_single_data()
    except (yaml.YAMLError, ValueError, TypeError) as exc:  # e.g. a timestamp out of range, an unhashable key
        raise ConfigError(f"{path}: not valid YAML: {short(str(exc), 400)}") from None


def load_params(path: Path | str = DEFAULT_PARAMS, check_paths: bool = True) -> Params:
    """Read and validate params.yaml; every problem is a ConfigError (exit 2). `check_paths`: also
    check the paths it names against the project folder (the params file's folder)."""
    path = Path(path)
    raw = read_yaml(path)
    params = resolve(raw, str(path))
    if check_paths:
        root = path.resolve().parent
        for name, overlay in ({FULL: {}} | dict((raw or {}).get("profiles") or {})).items():
            value = (overlay.get("export") or {}).get("champion_dir") if name != FULL else None
            champion = value if isinstance(value, str) else (raw.get("export") or {}).get("champion_dir", "champion")
            where = f"profiles.{name}.export.champion_dir" if isinstance(value, str) else "export.champion_dir"
            try:
                check_champion_dir(str(champion), root)
            except ValueError as exc:
                raise ConfigError(f"{path}: {where}: {exc}") from None
        missing = missing_dvc_params(root, raw)
        if missing:
            stage, key = missing[0]
            raise ConfigError(
                f"{path}: {key}: dvc.yaml's stage {stage} reads this key and params.yaml lacks it (DVC "
                f"would stop there); add it, e.g. as an empty mapping `{{}}`"
                + (f" ({len(missing) - 1} more missing)" if len(missing) > 1 else "")
            )
    return params


def dvc_stages(root: Path) -> dict[str, Any]:
    """The `stages:` mapping of `root`/dvc.yaml, where every stage's paths are written; empty when the
    file is missing or unreadable."""
    try:
        stages = (yaml.safe_load((root / "dvc.yaml").read_text()) or {}).get("stages") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        return {}
    return stages if isinstance(stages, dict) else {}


def missing_dvc_params(root: Path, raw: dict[str, Any]) -> list[tuple[str, str]]:
    """(stage, key) for every params key that dvc.yaml's stages read and the document lacks (a
    `foreach: ${archs}` stage reads its keys once per architecture)."""
    stages = dvc_stages(root)
    missing = []
    for name, stage in stages.items():
        if not isinstance(stage, dict):
            continue
        items = [None]
        if stage.get("foreach") == "${archs}":
            items = [a for a in raw.get("archs") or [] if isinstance(a, str)]
        body = stage.get("do", stage)
        for item in items:
            for key in body.get("params") or []:
                if not isinstance(key, str):
                    continue  # {file: [keys]}: another params file
                key = key.replace("${item}", item) if item else key
                if not _has_path(raw, tuple(key.split("."))):
                    missing.append((f"{name}@{item}" if item else name, key))
    return missing


def dvc_stage_outputs(root: Path) -> dict[str, list[str]]:
    """stage -> the paths dvc.yaml declares as its outs, metrics and plots, as written there (a
    `foreach` stage's paths keep their `${item}`)."""
    outputs = {}
    for name, stage in dvc_stages(root).items():
        body = stage.get("do", stage) if isinstance(stage, dict) else {}
        outputs[name] = [
            next(iter(entry)) if isinstance(entry, dict) else str(entry)
            for key in ("outs", "metrics", "plots")
            for entry in body.get(key) or []
        ]
    return outputs


def dvc_outputs(root: Path) -> list[str]:
    """The outputs dvc.yaml declares (outs, metrics, plots), as project-relative paths; a templated
    path (`data/models/${item}/...`) stands for the folder before its first `${`."""
    return [path.split("${", 1)[0].rstrip("/") or "." for paths in dvc_stage_outputs(root).values() for path in paths]


def check_champion_dir(value: str, root: Path) -> None:
    """The champion registry must be a folder of its own: not inside data/, a DVC output, .git or
    .dvc (a rerun or checkout would delete or replace it), not the project or one of its ancestors
    (promote would move the project), and not a symlink or a file. Raises ValueError naming the path."""
    if not value.strip() or "\0" in value:
        raise ValueError(f"{short(value)} is not a folder path")
    try:
        _check_champion_dir(value, root)
    except (OSError, RuntimeError) as exc:  # a name too long, a symlink loop, no permission
        raise ValueError(f"{short(value)} cannot be used: {exc.__class__.__name__}: {short(str(exc), 200)}") from None


def _check_champion_dir(value: str, root: Path) -> None:
    given = Path(os.path.expanduser(value))
    lexical = Path(os.path.normpath(given if given.is_absolute() else root / given))
    resolved = lexical.resolve()
    if lexical == Path("/") or resolved == Path("/"):
        raise ValueError(f"{short(value)} is the filesystem root /; use a folder of its own, e.g. champion")
    for candidate in {lexical, resolved}:
        if candidate == root:
            raise ValueError(f"{short(value)} is the project folder itself ({root}); use a folder of its own, e.g. champion")
        if candidate in root.parents:
            raise ValueError(
                f"{short(value)} ({candidate}) is an ancestor of the project folder {root}; use a "
                "folder of its own, e.g. champion"
            )
        forbidden = {"data": "data/ (DVC's outputs)", ".git": ".git", ".dvc": ".dvc"}
        forbidden |= {out: f"the DVC output {out}" for out in dvc_outputs(root)}
        for rel, label in forbidden.items():
            inside = root / rel
            if candidate == inside or inside in candidate.parents:
                raise ValueError(
                    f"{short(value)} ({candidate}) lies inside {label}; `dvc repro` or a checkout "
                    "would delete or replace it. Use a folder of its own, e.g. champion"
                )
    if lexical.is_symlink():
        raise ValueError(f"{lexical} is a symlink; the registry must be a real folder (remove the link)")
    if lexical.exists() and not lexical.is_dir():
        raise ValueError(f"{lexical} exists and is not a folder; move it away or choose another path")
