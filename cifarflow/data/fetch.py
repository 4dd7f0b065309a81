"""HTTP(S) download: stream to a .part file, retry transient errors with backoff, resume with Range."""

from __future__ import annotations

import logging
import random
import re
import time
from pathlib import Path

import requests
from tqdm import tqdm

log = logging.getLogger(__name__)

CHUNK = 1 << 16  # small reads: a dropped connection loses at most this much
PERMANENT_STATUS = {400, 401, 403, 404, 405, 410, 451}
MAX_BACKOFF_S = 30.0


class TransientError(Exception):
    """A failure that a retry of the same URL may fix (connection reset, 5xx, short body)."""


class PermanentError(Exception):
    """A failure that retrying the same URL will not fix (404, 403, ...)."""


def download(url: str, part: Path, *, retries: int, timeout_s: float, backoff_s: float = 1.0) -> None:
    """Download `url` into `part`, resuming what `part` already holds. Raises PermanentError or
    TransientError (after `retries` retries)."""
    part.parent.mkdir(parents=True, exist_ok=True)
    with requests.Session() as session:
        for attempt in range(retries + 1):
            try:
                _attempt(session, url, part, timeout_s)
                return
            except (TransientError, requests.ConnectionError, requests.Timeout,
                    requests.exceptions.ChunkedEncodingError) as exc:
                if attempt == retries:
                    raise TransientError(f"{exc} (gave up after {retries + 1} attempts)") from exc
                delay = min(MAX_BACKOFF_S, backoff_s * 2**attempt) * (0.5 + random.random())  # jitter
                log.warning("%s: %s; retry %d/%d in %.1fs", url, exc, attempt + 1, retries, delay)
                time.sleep(delay)


def _attempt(session: requests.Session, url: str, part: Path, timeout_s: float) -> None:
    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    with session.get(url, stream=True, timeout=timeout_s, headers=headers) as response:
        status = response.status_code
        if status in PERMANENT_STATUS:
            raise PermanentError(f"HTTP {status} {response.reason}")
        if status == 416 and have:  # nothing left to send: the part is complete, or stale
            total = _total_from_content_range(response.headers.get("Content-Range", ""))
            if total == have:
                return
            part.unlink()
            raise TransientError("server refused the resume range; restarting from zero")
        if status >= 400:
            raise TransientError(f"HTTP {status} {response.reason}")
        if status == 206:
            start = _start_from_content_range(response.headers.get("Content-Range", ""))
            if start != have:
                part.unlink()
                raise TransientError(f"server resumed at byte {start}, expected {have}; restarting")
            mode, total = "ab", _total_from_content_range(response.headers["Content-Range"])
        else:  # 200: the server ignored Range (or none was sent): start over
            have, mode = 0, "wb"
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        if have:
            log.info("%s: resuming at byte %d", url, have)
        with open(part, mode) as out, tqdm(total=total, initial=have, unit="B", unit_scale=True,
                                           desc=Path(url).name, disable=None, mininterval=1.0) as bar:
            for block in response.iter_content(CHUNK):
                out.write(block)
                bar.update(len(block))
    size = part.stat().st_size
    if total is not None and size != total:
        raise TransientError(f"connection closed at byte {size} of {total}")


def _start_from_content_range(value: str) -> int | None:
    match = re.match(r"bytes (\d+)-\d+/(\d+|\*)", value)
    return int(match.group(1)) if match else None


def _total_from_content_range(value: str) -> int | None:
    match = re.search(r"/(\d+)$", value)
    return int(match.group(1)) if match else None
