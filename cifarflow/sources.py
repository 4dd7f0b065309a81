"""What a `data.source` is, by its text alone: a generated `synth:` source (and its rules), a URL, or
a local path. Read by the settings (to validate params), by the download stage (to obtain it) and
by `cifarflow synth-archive` (the same bounds for the same generator)."""

from __future__ import annotations

import re
from typing import Literal, Protocol

from pydantic import Field, ValidationError

from cifarflow.redact import redact_url, short
from cifarflow.strict import Strict

OFFICIAL_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
OFFICIAL_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"  # published beside the archive
SYNTH_PREFIX = "synth:"
SYNTH_EXAMPLE = "synth:train=2000,test=500,seed=0"
MAX_EXAMPLES = 200_000  # a generated split larger than this is a typo, not a dataset (60,000 is CIFAR-10)
SCHEMES = ("http", "https", "file")
URL_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")  # two letters at least: "C:" is a drive, not a scheme
Kind = Literal["synth", "url", "local"]
SYNTH = "synth"  # generated data: a source's kind, and the kind of data a download records (manifest, card)
# How each kind of data a model was trained on (the download's record) is named in the model card and
# the leaderboard.
DATA_DESCRIBED = {
    SYNTH: "**synthetic** (generated) data",
    "archive": "a CIFAR-10 binary archive",
    "image-folder": "an image folder",
}


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
        return cls.checked(**fields)

    @classmethod
    def checked(cls, **fields: int) -> SynthSpec:
        """The spec, or a ValueError naming the first field out of its bounds."""
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


def source_kind(source: str) -> Kind:
    if source.startswith(SYNTH_PREFIX):
        return SYNTH
    if re.match(r"^(https?|file)://", source):
        return "url"
    return "local"


class Checksums(Protocol):
    """The checksum settings of `data` (settings.DataParams)."""

    md5: str | None
    sha256: str | None
    allow_unverified: bool


def checksum_keys_set(data: Checksums) -> list[str]:
    return [f"data.{k}" for k in ("md5", "sha256") if getattr(data, k) is not None]


def check_checksum_keys(data: Checksums, kind: str, source: str) -> None:
    """Archives need a checksum (or allow_unverified); generated or folder sources must have none."""
    set_keys = checksum_keys_set(data)
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
