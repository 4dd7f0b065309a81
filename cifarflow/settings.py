"""Typed, strict params: params.yaml parsed once into frozen pydantic models.

params.yaml holds the `full` settings at top level and, under `profiles.<name>`, overlays
that `profile: <name>` deep-merges on top. Every overlay is validated on every load, so a
typo in the smoke overlay is caught even while the full profile is selected. Reading the file
within bounds is cifarflow.bounded_yaml's job, the source rules cifarflow.sources', the champion
folder's rules cifarflow.champion's and dvc.yaml's keys cifarflow.dvcfile's.
"""

from __future__ import annotations

import copy
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from cifarflow.bounded_yaml import read_yaml
from cifarflow.champion import DEFAULT_CHAMPION_DIR, check_champion_dir
from cifarflow.dvcfile import has_path, missing_dvc_params
from cifarflow.errors import ConfigError
from cifarflow.models.catalog import STEMS, TTA_FAMILIES, WIDTHS, XLA_FAMILIES, Family, Stem, Variant
from cifarflow.pixels import NORMALIZATION_HELP, Normalization
from cifarflow.redact import has_userinfo, redact_url, short
from cifarflow.sources import (
    MAX_EXAMPLES,
    OFFICIAL_MD5,
    OFFICIAL_URL,
    SCHEMES,
    SYNTH_PREFIX,
    URL_SCHEME,
    SynthSpec,
    check_checksum_keys,
    source_kind,
)
from cifarflow.strict import Strict

DEFAULT_PARAMS = Path("params.yaml")
MAX_EPOCHS = 10_000
MAX_BATCH = 65_536
NAME = re.compile(r"^[a-z0-9][a-z0-9_]{0,63}$")  # architecture and profile names: DVC stage names and paths


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
    max_image_chunks: int = Field(
        100_000,
        ge=3,
        le=10_000_000,
        description="chunks of one PNG file, counted before decoding: a PNG of millions of empty chunks takes a "
        "decoder minutes; a real one has a handful, plus one per 8-64 KiB of pixel data",
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
            if any(not c.isprintable() for c in item):  # NUL, newlines, escapes: no path or URL holds them
                raise ValueError("a source holds a control or non-printable character (not shown); remove it")
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
    gpus: int = Field(
        1,
        ge=0,
        le=64,
        description="GPUs the training asks for where it is placed (cluster: the work pool's request); the strategy "
        "uses every GPU it is given",
    )
    validate_every: int = Field(
        1,
        ge=1,
        le=MAX_EPOCHS,
        description="validate after every N-th epoch and after the last; the best checkpoint is the best validated one",
    )

    # One validator per rule, each named for what it keeps true.

    @model_validator(mode="after")
    def _stem_fits_the_family(self) -> Recipe:
        stems = STEMS.get(self.model)
        if stems and self.stem is None:
            raise ValueError(f"{self.model} needs stem: {stems[0]} (the seed) or {' or '.join(stems[1:])}")
        if stems and self.stem not in stems:
            raise ValueError(f"{self.model} has no stem {self.stem!r}; valid: {', '.join(stems)}")
        if not stems and self.stem is not None:
            raise ValueError(f"stem applies to {', '.join(STEMS)} only; remove it from this {self.model} recipe")
        return self

    @model_validator(mode="after")
    def _norm_bias_rate_is_sgds(self) -> Recipe:
        if self.optimizer.norm_bias_rate != 1 and self.optimizer.name != "sgd":
            raise ValueError(f"optimizer.norm_bias_rate applies to sgd only, not {self.optimizer.name}")
        return self

    @model_validator(mode="after")
    def _ema_is_sgds(self) -> Recipe:
        if self.ema is not None and self.optimizer.name != "sgd":
            raise ValueError(f"ema (lookahead) applies to optimizer sgd only, not {self.optimizer.name}")
        return self

    @model_validator(mode="after")
    def _tta_level_fits_the_family(self) -> Recipe:
        if self.tta_level is not None and self.model not in TTA_FAMILIES:
            raise ValueError(f"tta_level applies to {', '.join(TTA_FAMILIES)} only; remove it from this {self.model} recipe")
        return self

    @model_validator(mode="after")
    def _width_fits_the_family(self) -> Recipe:
        if self.width is not None and self.model not in WIDTHS:
            raise ValueError(f"width applies to {', '.join(WIDTHS)} only; remove it from this {self.model} recipe")
        return self

    @model_validator(mode="after")
    def _plateau_validates_every_epoch(self) -> Recipe:
        if self.validate_every > 1 and self.schedule.kind == "plateau":
            raise ValueError("schedule plateau reads val every epoch: validate_every must be 1 with it")
        return self

    @model_validator(mode="after")
    def _xla_only_where_deterministic(self) -> Recipe:
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
    portable: bool = Field(
        False,
        description="the same weights on any x86-64 host with AVX2 and FMA (cifarflow.portable pins what varies "
        "with the host; it costs speed); false: native, the same weights on the same kind of host",
    )
    threads: int = Field(
        0, ge=0, le=256, description="TensorFlow's intra-op threads (0: one per usable CPU); the sums' split follows it"
    )
    checkpoint_store: str | None = Field(
        None,
        min_length=1,
        max_length=4096,
        description="an absolute path every node mounts (NFS, SMB...): each training's epoch checkpoints and "
        "resume state live there, keyed by what decides its weights, so a run cut short resumes on any node; "
        "null: data/checkpoints/<arch> in the workspace",
    )

    @field_validator("checkpoint_store")
    @classmethod
    def _store_is_a_shared_path(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if URL_SCHEME.match(value):
            raise ValueError(
                f"checkpoint_store {short(redact_url(value))} is a URL; give the absolute path where every node mounts "
                "the shared storage (checkpoints are renamed into place, which object stores cannot do atomically)"
            )
        if not Path(value).is_absolute() or "\0" in value:
            raise ValueError(f"checkpoint_store {short(value)} must be an absolute path that every node mounts")
        return value

    @model_validator(mode="after")
    def _runs_as_written(self) -> RuntimeParams:
        # Combinations that would run otherwise than written are refused at load, so `params --check`
        # catches them before a training process starts.
        if self.distribution == "multi_worker" and self.logical_cpus:
            raise ValueError(
                "logical_cpus applies to distribution: mirrored; multi_worker uses one CPU, or all GPUs, per node: "
                "set logical_cpus: 0"
            )
        if self.portable and not self.threads:
            raise ValueError(
                "portable: true needs threads: N (the same N on every host, e.g. 2): the thread count changes the "
                "weights, and by default it is the host's CPU count"
            )
        return self


class EvaluateParams(Strict):
    """The `evaluate@<arch>` stages."""

    tta: bool = Field(False, description="also report horizontal-flip test-time augmentation (separate fields)")
    batch_size: int = Field(500, ge=1, le=MAX_BATCH, description="inference batch")


CORRUPTIONS = (  # CIFAR-10-C's, in its order; cifarflow.data.corruptions implements one function per name
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
        DEFAULT_CHAMPION_DIR,
        min_length=1,
        max_length=4096,
        description="the champion registry: where `cifarflow promote` keeps versions (not inside data/ or a DVC output)",
    )


class ClusterParams(Strict):
    """The flow's fan-out: each architecture's training as a child flow run on a GPU work pool."""

    deployment: str = Field(
        "train-architecture/gpu",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}/[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$",
        description="the child deployment, flow/deployment (prefect.yaml's train-architecture, deployed on the pool)",
    )
    pickup_timeout_s: float = Field(
        900, gt=0, le=7 * 86_400, description="a child no worker has picked up by then fails the run, naming pool and arch"
    )
    lost_after_s: float = Field(
        60, ge=10, le=86_400, description="a running child whose worker sent no heartbeat for this long is lost: retried"
    )
    attempts: int = Field(3, ge=1, le=100, description="runs of one child at most, the first included")
    poll_s: float = Field(1.0, ge=0.1, le=60, description="how often the parent reads its children's states")


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
    cluster: ClusterParams | None = Field(
        None, description="fan each architecture's training out to a GPU work pool (null: train in this workspace)"
    )

    @model_validator(mode="after")
    def _cluster_has_a_checkpoint_store(self) -> Params:
        if self.cluster is not None and self.runtime.checkpoint_store is None:
            raise ValueError(
                "cluster: the fan-out needs runtime.checkpoint_store, a path every node mounts, so that a training "
                "whose node is lost resumes on another from its last epoch"
            )
        return self

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
        if self.runtime.distribution in ("mirrored", "multi_worker"):
            ema = [arch for arch in self.archs if self.train[arch].ema is not None]
            if ema:  # Keras 3.15 fails overwriting the weights with their average under either strategy
                raise ValueError(
                    f"distribution: {self.runtime.distribution} cannot run lookahead (Keras 3.15's EMA fails under "
                    f"MirroredStrategy and MultiWorkerMirroredStrategy): remove ema from train.{ema[0]}, or use "
                    "distribution: none"
                )
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
MAX_PROFILES = 16  # overlays in one file: each is validated on every load
# Keys an overlay may not set: the selection itself, and `archs`, which DVC's `foreach: ${archs}`
# reads from the top level of params.yaml whatever profile is selected.
NOT_IN_OVERLAYS = {
    "profile": "an overlay cannot select a profile",
    "profiles": "overlays do not nest",
    "archs": "DVC's foreach reads the top-level archs whatever the profile, so an overlay's archs would "
    "never run; set archs at the top level",
}


def deep_merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """Return `base` with `overlay`'s leaves set on top (dicts merge, everything else replaces)."""
    merged = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


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
    if overlay is not None and loc and has_path(overlay, loc):
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
    if len(profiles) > MAX_PROFILES:
        raise ConfigError(f"{source}: profiles: {len(profiles):,} overlays; at most {MAX_PROFILES}")
    selected = raw.get("profile", FULL)
    known = [FULL, *profiles]
    if selected not in known:
        valid = short(", ".join(map(str, known)), 400)
        raise ConfigError(f"{source}: profile: unknown profile {short(selected)}; valid: {valid}")
    resolved = {FULL: _validate({**raw, "profile": FULL}, source, None, FULL)}
    for name, overlay in profiles.items():
        for key, why in NOT_IN_OVERLAYS.items():
            if key in overlay:
                raise ConfigError(f"{source}: profiles.{name}.{key}: {why}")
        resolved[name] = _validate(deep_merge({**raw, "profile": name}, overlay), source, overlay, name)
    return resolved[selected]


def load_params(path: Path | str = DEFAULT_PARAMS, check_paths: bool = True) -> Params:
    """Read and validate params.yaml; every problem is a ConfigError (exit 2) naming `path`. `check_paths`:
    also check what it names on disk against the project folder (the params file's folder): the
    champion folder of every profile, an image-folder source's checksums, dvc.yaml's params keys."""
    path = Path(path)
    raw = read_yaml(path)
    params = resolve(raw, str(path))
    if check_paths:
        root = path.resolve().parent
        for name, overlay in ({FULL: {}} | dict((raw or {}).get("profiles") or {})).items():
            value = (overlay.get("export") or {}).get("champion_dir") if name != FULL else None
            champion = value if isinstance(value, str) else (raw.get("export") or {}).get("champion_dir", DEFAULT_CHAMPION_DIR)
            where = f"profiles.{name}.export.champion_dir" if isinstance(value, str) else "export.champion_dir"
            try:
                check_champion_dir(str(champion), root)
            except ValueError as exc:
                raise ConfigError(f"{path}: {where}: {exc}") from None
        check_folder_sources(params.data, root, path)
        missing = missing_dvc_params(root, raw)
        if missing:
            stage, key = missing[0]
            raise ConfigError(
                f"{path}: {key}: dvc.yaml's stage {stage} reads this key and {path.name} lacks it (DVC "
                f"would stop there); add it, e.g. as an empty mapping `{{}}`"
                + (f" ({len(missing) - 1} more missing)" if len(missing) > 1 else "")
            )
    return params


def check_folder_sources(data: DataParams, root: Path, path: Path) -> None:
    """A local source that is a folder (an image folder) takes no checksum: found now, not at download."""
    for source in data.sources:
        if source_kind(source) != "local":
            continue
        folder = Path(source) if Path(source).is_absolute() else root / source
        try:
            if not folder.is_dir():
                continue
            check_checksum_keys(data, "image-folder", source)
        except OSError:
            continue  # unreadable now: the download stage says why, naming it
        except ValueError as exc:
            raise ConfigError(f"{path}: data.source: {exc}") from None
