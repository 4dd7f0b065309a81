"""The `download` stage: obtain data.source (the first mirror that works), verify, read safely,
validate the batches, and write the official batches folder plus a manifest.

Outputs are byte-identical whenever the content read is unchanged, whatever mirror served it,
so the stage can run on every `dvc repro` (always_changed) and later stages are still skipped.
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cifarflow.config import DataParams, Params, SynthSpec, check_checksum_keys, source_kind
from cifarflow.data import cifar_binary as cb
from cifarflow.data import fetch
from cifarflow.data.extract import read_batches
from cifarflow.data.image_folder import is_image_folder, read_image_folder
from cifarflow.errors import ConfigError, InputError, SourceUnavailableError
from cifarflow.fileio import CHUNK, atomic_dir, dumps_json, write_json_atomic

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
SOURCE_HINT = ("set data.source in params.yaml to a reachable http(s):// or file:// URL, a local "
               "archive, an image folder, or synth:train=N,test=M,seed=S (see README, 'Real data')")


class MirrorFailed(Exception):
    """This source could not give a verified archive; the next mirror may."""

    def __init__(self, reason: str, *, bad_input: bool = False) -> None:
        super().__init__(reason)
        self.bad_input = bad_input  # a checksum mismatch or a missing path: exit 2, not a retry


@dataclass
class Obtained:
    kind: str  # "archive" | "image-folder" | "synth"
    files: dict[str, bytes]  # the batches folder, by file name
    content: dict[str, str]  # digests of what was read (the archive, or every image file)
    origin: str  # which source served it: run info only, never in the outputs
    notes: list[str] = field(default_factory=list)


def digests(path: Path, algorithms: tuple[str, ...] = ("md5", "sha256")) -> dict[str, str]:
    """Digests of a file in one pass (hashlib releases the GIL, so this can run beside other work)."""
    hashes = {name: hashlib.new(name) for name in algorithms}
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            for digest in hashes.values():
                digest.update(block)
    return {name: digest.hexdigest() for name, digest in hashes.items()}


def content_algorithms(data: DataParams) -> tuple[str, ...]:
    """sha256 always names the content; md5 only when it is the configured checksum."""
    return ("md5", "sha256") if data.md5 is not None else ("sha256",)


def check_digests(actual: dict[str, str], data: DataParams, label: str) -> None:
    for algorithm in ("md5", "sha256"):
        expected = getattr(data, algorithm)
        if expected is not None and actual[algorithm] != expected:
            raise MirrorFailed(
                f"{label}: {algorithm} mismatch: expected {expected} (data.{algorithm}), actual {actual[algorithm]}",
                bad_input=True,
            )


def verify(path: Path, data: DataParams, label: str) -> dict[str, str]:
    actual = digests(path, content_algorithms(data))
    check_digests(actual, data, label)
    return actual


def read_verified(path: Path, data: DataParams, label: str) -> tuple[dict[str, bytes], dict[str, str]]:
    """Read the archive's batches while a second thread hashes the file: one pass of wall time.
    Nothing read is used unless the checksum matches, and a mismatch is reported before any
    problem found in the (then untrusted) content."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        hashing = pool.submit(digests, path, content_algorithms(data))
        try:
            files = read_batches(path, data.max_member_mb << 20, label)
        except InputError:
            check_digests(hashing.result(), data, label)
            raise
        actual = hashing.result()
    check_digests(actual, data, label)
    return files, actual


def _checked(data: DataParams, kind: str, source: str) -> None:
    try:
        check_checksum_keys(data, kind, source)
    except ValueError as exc:
        raise ConfigError(f"params.yaml: data: {exc}") from None


def fetch_http(url: str, data: DataParams, cache: Path, backoff_s: float) -> tuple[Path, dict[str, str]]:
    """A verified copy of `url` in the download cache (keyed by its checksum), fetched only if needed."""
    key = data.sha256 or data.md5
    final, part = cache / f"{key}.tar.gz", cache / f"{key}.part"
    if final.exists():
        try:
            return final, verify(final, data, str(final))
        except MirrorFailed:
            final.unlink()  # a damaged cache entry: fetch again
    try:
        fetch.download(url, part, retries=data.retries, timeout_s=data.timeout_s, backoff_s=backoff_s)
    except (fetch.PermanentError, fetch.TransientError) as exc:
        raise MirrorFailed(f"{url}: {exc}") from None
    try:
        content = verify(part, data, url)
    except MirrorFailed:
        part.unlink()  # a wrong file is never kept, not even to resume
        raise
    part.replace(final)
    return final, content


def obtain(source: str, data: DataParams, cache: Path, backoff_s: float = 1.0) -> Obtained:
    kind = source_kind(source)
    max_member = data.max_member_mb << 20
    if kind == "synth":
        from cifarflow.data.synth import synth_archive_bytes

        spec = SynthSpec.parse(source)
        blob = synth_archive_bytes(spec.train, spec.test, spec.seed)
        files = read_batches(io.BytesIO(blob), max_member, label=source)
        return Obtained("synth", files, {"sha256": hashlib.sha256(blob).hexdigest()}, source)
    if kind == "url" and source.startswith(("http://", "https://")):
        if not (data.sha256 or data.md5):  # unverified: read the bytes once, keep no cache entry
            part = cache / ("unverified-" + hashlib.sha256(source.encode()).hexdigest()[:16] + ".part")
            part.unlink(missing_ok=True)
            try:
                fetch.download(source, part, retries=data.retries, timeout_s=data.timeout_s, backoff_s=backoff_s)
                content = digests(part, ("sha256",))
                return Obtained("archive", read_batches(part, max_member, source), content, source,
                                ["unverified download (data.allow_unverified)"])
            except (fetch.PermanentError, fetch.TransientError) as exc:
                raise MirrorFailed(f"{source}: {exc}") from None
            finally:
                part.unlink(missing_ok=True)
        path, content = fetch_http(source, data, cache, backoff_s)
        return Obtained("archive", read_batches(path, max_member, source), content, source)
    path = Path(urllib.request.url2pathname(urllib.parse.urlparse(source).path)) if kind == "url" else Path(source)
    if not path.exists():
        raise MirrorFailed(f"{source}: no such file or folder ({path.resolve()})", bad_input=True)
    if path.is_dir():
        if not is_image_folder(path):
            raise InputError(f"{source}: a folder source must hold train/<class>/*.png|jpg and test/<class>/*.png|jpg")
        _checked(data, "image-folder", source)
        files, sha = read_image_folder(path)
        return Obtained("image-folder", files, {"sha256": sha}, source)
    _checked(data, "archive", source)
    files, content = read_verified(path, data, source)
    return Obtained("archive", files, content, source)


def validate_batches(files: dict[str, bytes]) -> dict[str, Any]:
    """Parse every batch (whole records, labels in range, classes from the meta); return counts."""
    classes = cb.parse_meta(files[cb.META_FILE])
    records: dict[str, int] = {}
    for name in (*cb.TRAIN_FILES, cb.TEST_FILE):
        labels = cb.check_records(files[name], name)
        if int(labels.max()) >= len(classes):
            raise InputError(f"{name}: label {int(labels.max())} but {cb.META_FILE} names only {len(classes)} classes")
        records[name] = len(labels)
    counts = {"train": sum(records[f] for f in cb.TRAIN_FILES), "test": records[cb.TEST_FILE]}
    return {"classes": classes, "records": records, "counts": counts}


def run(params: Params, out: Path, cache: Path, runinfo: Path | None = None, backoff_s: float = 1.0) -> dict[str, Any]:
    """Obtain, verify and validate the dataset; write `out/cifar-10-batches-bin/*` and `out/manifest.json`."""
    started = time.perf_counter()
    failures: list[MirrorFailed] = []
    for source in params.data.sources:
        try:
            obtained = obtain(source, params.data, cache, backoff_s)
            break
        except MirrorFailed as exc:
            log.warning("source failed: %s", exc)
            failures.append(exc)
    else:
        reasons = "\n  ".join(str(f) for f in failures)
        error = InputError if any(f.bad_input for f in failures) else SourceUnavailableError
        raise error(f"could not obtain CIFAR-10 from data.source:\n  {reasons}\n{SOURCE_HINT}")
    summary = validate_batches(obtained.files)
    manifest = {"kind": obtained.kind, "content": obtained.content, **summary}
    with atomic_dir(out) as tmp:
        (tmp / cb.FOLDER).mkdir()
        for name, blob in obtained.files.items():
            (tmp / cb.FOLDER / name).write_bytes(blob)
        (tmp / MANIFEST).write_text(dumps_json(manifest))
    if runinfo is not None:
        write_json_atomic(runinfo, {
            "origin": obtained.origin, "failed_mirrors": [str(f) for f in failures],
            "notes": obtained.notes, "seconds": round(time.perf_counter() - started, 3),
        })
    log.info("download: %s train / %s test images from %s", summary["counts"]["train"], summary["counts"]["test"],
             obtained.origin)
    return manifest
