"""The `download` stage: obtain data.source (the first mirror that works), verify, read safely,
validate the batches, and write the official batches folder plus a manifest.

Outputs are byte-identical whenever the content read is unchanged, whatever mirror served it,
so the stage can run on every `dvc repro` (always_changed) and later stages are still skipped.
Sources are untrusted: the checksum is checked on the archive's bytes before anything is
decompressed, every read is bounded by a data.max_* cap (a local archive's size too, before a
byte is hashed), and a URL's secrets never reach a message, a log line or the run info
(cifarflow.redact): messages show a source only as `shown(source)`.
An archive holding cifar_binary.SYNTH_MARKER (written by `cifarflow synth-archive`) is "synth"
data, whatever served it.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import stat
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from cifarflow.contract import MANIFEST
from cifarflow.data import cifar_binary as cb
from cifarflow.data import fetch
from cifarflow.data.extract import Archive, read_archive, read_batches
from cifarflow.data.image_folder import is_image_folder, read_image_folder
from cifarflow.errors import ConfigError, InputError, SourceUnavailableError
from cifarflow.fileio import CHUNK, atomic_dir, dumps_json, write_json_atomic
from cifarflow.openfile import file_kind, open_regular
from cifarflow.redact import REDACTED, redact_text, redact_url
from cifarflow.settings import DataParams, Params
from cifarflow.sources import SynthSpec, check_checksum_keys, source_kind

log = logging.getLogger(__name__)
SOURCE_HINT = (
    "set data.source in params.yaml to a reachable http(s):// or file:// URL, a local "
    "archive, an image folder, or synth:train=N,test=M,seed=S (see README, 'Real data from a local copy'); "
    "no internet? `make pipeline PROFILE=smoke` runs the whole pipeline offline on generated data"
)


class MirrorFailed(Exception):
    """This source could not give a verified archive; the next mirror may."""

    def __init__(self, reason: str, *, bad_input: bool = False) -> None:
        super().__init__(reason)
        self.bad_input = bad_input  # a checksum mismatch, a cap, a missing path: exit 2, not a retry


@dataclass
class Obtained:
    kind: str  # "archive" | "image-folder" | "synth"
    files: dict[str, bytes]  # the batches folder, by file name
    content: dict[str, str]  # digests of what was read (the archive, or every image file)
    origin: str  # which source served it, redacted: run info only, never in the outputs
    notes: list[str] = field(default_factory=list)


def digests(
    path: Path, algorithms: tuple[str, ...] = ("md5", "sha256"), data: DataParams | None = None, label: str | None = None
) -> dict[str, str]:
    """Digests of a regular file in one pass (a FIFO or device is an InputError, never read); with
    `data`, a file over data.max_download_mb is refused unread (MirrorFailed)."""
    with open_regular(path) as f:
        return _digests(f, algorithms, data, label or str(path))


def _digests(f: IO[bytes], algorithms: tuple[str, ...], data: DataParams | None = None, label: str = "") -> dict[str, str]:
    """Digests of what `f` holds from here on. With `data`, its fstat size is checked against
    data.max_download_mb first, and the reading stops at the cap even if the file grows meanwhile
    (or is one whose size says nothing, like those of /proc)."""
    limit = -1
    if data is not None:
        limit, size = data.max_download_mb << 20, os.fstat(f.fileno()).st_size
        if size > limit:
            raise MirrorFailed(
                f"{label}: {size:,} bytes, over data.max_download_mb={data.max_download_mb} (the most a "
                "download may bring or a local archive may have); refused unread, raise it if this "
                "archive is genuine",
                bad_input=True,
            )
    hashes = {name: hashlib.new(name) for name in algorithms}
    done = 0
    while block := f.read(CHUNK):
        done += len(block)
        if done > limit >= 0:
            raise MirrorFailed(
                f"{label}: more than {limit:,} bytes read, over data.max_download_mb={limit >> 20} "
                "(the file grew while being read); raise it if this archive is genuine",
                bad_input=True,
            )
        for digest in hashes.values():
            digest.update(block)
    return {name: digest.hexdigest() for name, digest in hashes.items()}


def caps(data: DataParams) -> dict[str, int]:
    """read_batches' bounds from params: members and decompressed bytes of one archive."""
    return {"max_extract_bytes": data.max_extract_mb << 20, "max_members": data.max_members}


def shown(source: str) -> str:
    """A source as messages, logs and run info may show it: a URL without userinfo or query. Anything
    else holding "@" or "?" is redacted too (a URL config did not recognise, e.g. `HTTP://u:pw@h/x`):
    all before the last "@" and all from the first "?" are dropped."""
    if source_kind(source) == "url":
        return redact_url(source)
    if "@" not in source and "?" not in source:
        return source
    text, query, _ = source.partition("?")
    if "@" in text:
        text = f"{REDACTED}@{text.rpartition('@')[2]}"
    return f"{text}?{REDACTED}" if query else text


def _scrubbed(text: str, source: str) -> str:
    """`text` with every spelling of a local `source` that may hold a secret (as given, as a Path
    prints it, its realpath) replaced by shown(source), then any URL in it redacted."""
    label = shown(source)
    if label != source and source_kind(source) == "local":  # a URL's own messages are built redacted
        spellings = {source, str(Path(source)), os.path.realpath(source), os.path.abspath(source)}
        for raw in sorted(spellings, key=len, reverse=True):
            text = text.replace(raw, label)
        if "@" in text:  # whatever other spelling is left: user:password@host never survives
            text = re.sub(r"[^\s'\"]*@", f"{REDACTED}@", text)
    return redact_text(text)


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
    actual = digests(path, content_algorithms(data), data, label)
    check_digests(actual, data, label)
    return actual


def read_verified(path: Path, data: DataParams, label: str) -> tuple[Archive, dict[str, str]]:
    """Hash the archive's bytes as they are on disk and check the checksum first; only then are they
    decompressed and parsed (within the caps), from the same open file. Hashing first costs a second
    read (~0.3 s for 170 MB) but means a wrong file is never decompressed: a bomb with a bad checksum
    costs nothing. A file over data.max_download_mb (by its size, before a byte is read) is refused."""
    try:
        f = open_regular(path)
    except OSError as exc:  # as run() treats an OSError (maybe transient), but naming the label only
        raise MirrorFailed(f"{label}: cannot read ({exc.__class__.__name__}: {exc.strerror})") from None
    except InputError:  # NotRegularFile: a FIFO or device swapped in after obtain's stat
        raise MirrorFailed(f"{label}: not a regular file (changed while being opened); refused unread", bad_input=True) from None
    with f:
        actual = _digests(f, content_algorithms(data), data, label)
        check_digests(actual, data, label)
        f.seek(0)
        archive = read_archive(f, data.max_member_mb << 20, label, **caps(data))
    return archive, actual


def _obtained(archive: Archive, content: dict[str, str], label: str, notes: list[str] | None = None) -> Obtained:
    """An archive's result: "synth" when it holds the marker of `cifarflow synth-archive`."""
    notes = list(notes or [])
    if archive.marker is None:
        return Obtained("archive", archive.files, content, label, notes)
    notes.append(f"generated archive ({cb.FOLDER}/{cb.SYNTH_MARKER}: {archive.marker!r}): kind synth")
    return Obtained("synth", archive.files, content, label, notes)


def _checked(data: DataParams, kind: str, source: str) -> None:
    try:
        check_checksum_keys(data, kind, source)
    except ValueError as exc:
        raise ConfigError(f"data: {exc}") from None


def fetch_http(url: str, data: DataParams, cache: Path, backoff_s: float) -> tuple[Path, dict[str, str]]:
    """A verified copy of `url` in the download cache (keyed by its checksum), fetched only if needed."""
    key = data.sha256 or data.md5
    final, part = cache / f"{key}.tar.gz", cache / f"{key}.part"
    if final.exists():
        try:
            return final, verify(final, data, str(final))
        except MirrorFailed:
            final.unlink()  # a damaged cache entry: fetch again
    _fetch(url, part, data, backoff_s)
    try:
        content = verify(part, data, redact_url(url))
    except MirrorFailed:
        part.unlink()  # a wrong file is never kept, not even to resume
        raise
    part.replace(final)
    return final, content


def _fetch(url: str, part: Path, data: DataParams, backoff_s: float) -> None:
    """fetch.download within the data.* caps; any failure of it is this mirror's MirrorFailed."""
    try:
        fetch.download(
            url,
            part,
            retries=data.retries,
            timeout_s=data.timeout_s,
            deadline_s=data.deadline_s,
            max_bytes=data.max_download_mb << 20,
            backoff_s=backoff_s,
        )
    except (fetch.PermanentError, fetch.TransientError) as exc:  # fetch turns every client error into these
        raise MirrorFailed(f"{redact_url(url)}: {fetch.scrub(str(exc))}", bad_input=isinstance(exc, fetch.LimitError)) from None


def obtain(source: str, data: DataParams, cache: Path, backoff_s: float = 1.0) -> Obtained:
    kind = source_kind(source)
    label = shown(source)
    max_member = data.max_member_mb << 20
    if kind == "synth":
        from cifarflow.data.synth import synth_archive_bytes

        spec = SynthSpec.parse(source)
        blob = synth_archive_bytes(spec.train, spec.test, spec.seed, spec.mislabel)
        files = read_batches(io.BytesIO(blob), max_member, label, **caps(data))
        return Obtained("synth", files, {"sha256": hashlib.sha256(blob).hexdigest()}, source)
    if kind == "url" and source.startswith(("http://", "https://")):
        if not (data.sha256 or data.md5):  # unverified: read the bytes once, keep no cache entry; the caps still bound it
            part = cache / ("unverified-" + hashlib.sha256(source.encode()).hexdigest()[:16] + ".part")
            part.unlink(missing_ok=True)
            try:
                _fetch(source, part, data, backoff_s)
                content = digests(part, ("sha256",), data, label)
                return _obtained(
                    read_archive(part, max_member, label, **caps(data)),
                    content,
                    label,
                    ["unverified download (data.allow_unverified)"],
                )
            finally:
                part.unlink(missing_ok=True)
        path, content = fetch_http(source, data, cache, backoff_s)
        return _obtained(read_archive(path, max_member, label, **caps(data)), content, label)
    path = Path(urllib.request.url2pathname(urllib.parse.urlparse(source).path)) if kind == "url" else Path(source)
    try:
        mode = os.stat(path).st_mode  # never open() first: a FIFO would block, /dev/zero never end
    except FileNotFoundError:  # the label only: the source or its realpath may hold a password
        where = "" if path.is_absolute() else " (a relative path is read from the working directory)"
        raise MirrorFailed(f"{label}: no such file or folder{where}", bad_input=True) from None
    except OSError as exc:
        raise MirrorFailed(f"{label}: cannot read ({exc.strerror})", bad_input=True) from None
    if stat.S_ISDIR(mode):
        if not is_image_folder(path):
            raise InputError(f"{label}: a folder source must hold train/<class>/*.png|jpg and test/<class>/*.png|jpg")
        _checked(data, "image-folder", source)
        files, sha = read_image_folder(
            path, max_files=data.max_members, max_pixels=data.max_image_pixels, max_chunks=data.max_image_chunks
        )
        return Obtained("image-folder", files, {"sha256": sha}, label)
    if not stat.S_ISREG(mode):
        raise MirrorFailed(
            f"{label}: is a {file_kind(mode)}, not an archive file or an image folder (refused "
            "unread: it could block or never end)",
            bad_input=True,
        )
    _checked(data, "archive", source)
    archive, content = read_verified(path, data, label)
    return _obtained(archive, content, label)


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


def _prefixed(source: str, reason: object) -> str:
    label = shown(source)
    text = _scrubbed(str(reason), source)
    return text if text.startswith(label) else f"{label}: {text}"


def run(params: Params, out: Path, cache: Path, runinfo: Path | None = None, backoff_s: float = 1.0) -> dict[str, Any]:
    """Obtain, verify and validate the dataset; write `out/cifar-10-batches-bin/*` and `out/manifest.json`."""
    started = time.perf_counter()
    failures: list[MirrorFailed] = []
    for source in params.data.sources:
        try:
            obtained = obtain(source, params.data, cache, backoff_s)
            summary = validate_batches(obtained.files)  # content that does not validate is this mirror's failure too
            break
        except MirrorFailed as exc:
            failure = MirrorFailed(_scrubbed(str(exc), source), bad_input=exc.bad_input)
        except InputError as exc:  # unsafe, over a cap, unreadable or invalid: bad input of this mirror only
            failure = MirrorFailed(_prefixed(source, exc), bad_input=True)
        except OSError as exc:  # a local source that cannot be read (permissions, I/O error)
            failure = MirrorFailed(_prefixed(source, f"{exc.__class__.__name__}: {exc}"))
        failures.append(failure)
        if len(failures) < len(params.data.sources):  # the last one's failure is in the error, said once
            log.warning("source failed: %s; trying the next mirror", failure)
    else:
        reasons = "\n  ".join(str(f) for f in failures)
        error = InputError if any(f.bad_input for f in failures) else SourceUnavailableError
        raise error(f"could not obtain CIFAR-10 from data.source:\n  {reasons}\n{SOURCE_HINT}")
    manifest = {"kind": obtained.kind, "content": obtained.content, **summary}
    with atomic_dir(out) as tmp:
        (tmp / cb.FOLDER).mkdir()
        for name, blob in obtained.files.items():
            (tmp / cb.FOLDER / name).write_bytes(blob)
        (tmp / MANIFEST).write_text(dumps_json(manifest))
    if runinfo is not None:
        write_json_atomic(
            runinfo,
            {
                "origin": obtained.origin,
                "failed_mirrors": [str(f) for f in failures],
                "notes": obtained.notes,
                "seconds": round(time.perf_counter() - started, 3),
            },
        )
    log.info(
        "download: %s train / %s test images from %s", summary["counts"]["train"], summary["counts"]["test"], obtained.origin
    )
    return manifest
