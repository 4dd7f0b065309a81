"""HTTP(S) download: raw bytes to a .part file within a byte cap and a deadline, retried with backoff, resumed with Range."""

from __future__ import annotations

import http.client
import logging
import random
import re
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import Any

import requests
import urllib3
from requests.adapters import HTTPAdapter
from tqdm import tqdm

from cifarflow.redact import REDACTED, redact_text, redact_url

log = logging.getLogger(__name__)

CHUNK = 1 << 16  # small reads: a dropped connection loses at most this much
PERMANENT_STATUS = {400, 401, 403, 404, 405, 410, 451}
REDIRECT_STATUS = {301, 302, 303, 307, 308}
MAX_REDIRECTS = 5  # a handful: mirrors and signed-URL services need one or two
MAX_BACKOFF_S = 30.0  # the longest wait between two attempts: retries go on, at most this far apart
BACKOFF_GROWTH = 2  # each wait twice the one before (from data's backoff_s), up to MAX_BACKOFF_S
JITTER = (0.5, 1.5)  # each wait is scaled by a random factor in this range: retries of many clients spread out
# requests quotes the path and query of a URL without its scheme ("...with url: /a.tgz?X-Amz-Signature=...").
QUERY_IN_TEXT = re.compile(r"(?<=[^\s?])\?[^\s'\"()<>\[\]{}]+")


class _ScrubRecords(logging.Filter):
    """urllib3 logs each request line and redirect with the URL's path and query (a signed URL's
    signature) at DEBUG, which `cifarflow -v` shows: its records are scrubbed like our own messages."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record must not break the request that logged it
            message = str(record.msg)
        record.msg, record.args = scrub(message), None
        return True


for _name in ("urllib3.connectionpool", "urllib3.poolmanager"):
    logging.getLogger(_name).addFilter(_ScrubRecords())


class TransientError(Exception):
    """A failure that a retry of the same URL may fix (connection reset, 5xx, short body)."""


class PermanentError(Exception):
    """A failure that retrying the same URL will not fix (404, 403, a redirect loop, a bad URL, ...)."""


class LimitError(PermanentError):
    """The server sent, or announced, more than data.max_download_mb: bad input, not worth a retry."""


class DeadlineError(PermanentError):
    """data.deadline_s passed before the download completed (a server trickling bytes, say)."""


# Failures of the connection rather than of the URL: a retry (resuming with Range) may get further.
TRANSIENT = (
    TransientError,
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
    urllib3.exceptions.ProtocolError,
    urllib3.exceptions.TimeoutError,
    http.client.HTTPException,
    ConnectionError,
    TimeoutError,
)


@dataclass(frozen=True)
class Limits:
    timeout_s: float  # one socket operation
    deadline_s: float  # the whole download of one mirror, retries and backoff included
    deadline: float  # time.monotonic() when deadline_s runs out
    max_bytes: int  # bytes the .part may hold, a resumed part included

    def deadline_error(self, written: int | None = None, last: str = "") -> DeadlineError:
        got = f" ({written:,} bytes so far)" if written is not None else ""
        previous = f"; last error: {last}" if last else ""
        return DeadlineError(
            f"not complete within data.deadline_s={self.deadline_s:g}{got}, with data.timeout_s="
            f"{self.timeout_s:g} per read; raise data.deadline_s if the server is genuinely this slow"
            f"{previous}"
        )

    def limit_error(self, size: int, announced: bool = False) -> LimitError:
        what = f"announces {size:,} bytes" if announced else f"sent more than {self.max_bytes:,} bytes"
        return LimitError(f"the server {what}, over data.max_download_mb={self.max_bytes >> 20}; raise it if the file is genuine")


def scrub(text: str) -> str:
    """`text` with every URL redacted and every query string dropped, for logs and error messages."""
    return QUERY_IN_TEXT.sub(f"?{REDACTED}", redact_text(text))


def describe(exc: BaseException) -> str:
    """An exception as one redacted line; the HTTP client's own exceptions are named by class."""
    if isinstance(exc, (TransientError, PermanentError)):
        return scrub(str(exc))
    return scrub(f"{exc.__class__.__name__}: {exc}")[:500]


def unresolvable(exc: BaseException) -> bool:
    """Whether a client error comes from a host name that does not resolve (socket.gaierror somewhere in
    its chain: requests wraps urllib3's NameResolutionError, which wraps it)."""
    seen: set[int] = set()
    pending: list[object] = [exc]
    while pending:
        item = pending.pop()
        if not isinstance(item, BaseException) or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, socket.gaierror) or type(item).__name__ == "NameResolutionError":
            return True
        pending += [item.__cause__, item.__context__, getattr(item, "reason", None), *item.args]
    return False


def shown_name(url: str) -> str:
    """The file name of a URL's path, for a progress bar: never its query, userinfo or host."""
    try:
        return PurePosixPath(urllib.parse.urlsplit(url).path).name or "download"
    except ValueError:
        return "download"


def download(
    url: str, part: Path, *, retries: int, timeout_s: float, deadline_s: float, max_bytes: int, backoff_s: float = 1.0
) -> None:
    """Download `url` into `part`, resuming what `part` already holds. Raises PermanentError (its
    subclasses LimitError and DeadlineError included) or TransientError (after `retries` retries); every
    other exception of the HTTP client is turned into one of these, its message redacted."""
    part.parent.mkdir(parents=True, exist_ok=True)
    limits = Limits(timeout_s, deadline_s, time.monotonic() + deadline_s, max_bytes)
    shown = redact_url(url)
    with _Watchdog(limits.deadline) as watchdog, requests.Session() as session:
        for prefix in ("http://", "https://"):
            session.mount(prefix, _Adapter())
        for attempt in range(retries + 1):
            try:
                _attempt(session, url, part, limits)
                return
            except LimitError:
                part.unlink(missing_ok=True)  # over the cap: nothing of it is worth resuming
                raise
            except PermanentError:
                raise
            except Exception as exc:  # the HTTP client raises many types; each ends this mirror or is retried
                if watchdog.fired or time.monotonic() >= limits.deadline:
                    raise limits.deadline_error(_size(part)) from None
                if unresolvable(exc):  # offline, or a typo in the host: no retry helps, one short line says so
                    host = urllib.parse.urlsplit(url).hostname or "?"
                    raise PermanentError(f"cannot resolve the host {host} (no network, or no DNS name for it)") from None
                reason = describe(exc)
                if not isinstance(exc, TRANSIENT):
                    raise PermanentError(reason) from None
                if attempt == retries:
                    raise TransientError(f"{reason} (gave up after {retries + 1} attempts)") from None
                delay = min(MAX_BACKOFF_S, backoff_s * BACKOFF_GROWTH**attempt) * random.uniform(*JITTER)
                if time.monotonic() + delay >= limits.deadline:  # the next attempt could not finish in time
                    raise limits.deadline_error(_size(part), reason) from None
                log.warning("%s: %s; retry %d/%d in %.1fs", shown, reason, attempt + 1, retries, delay)
                time.sleep(delay)


def _size(part: Path) -> int | None:
    try:
        return part.stat().st_size
    except OSError:
        return None


def _get(session: requests.Session, url: str, headers: dict[str, str], limits: Limits) -> requests.Response:
    """GET `url`, following at most MAX_REDIRECTS redirects by hand: only to http(s), never in a loop."""
    chain = [url]
    for _ in range(MAX_REDIRECTS + 1):
        response = session.get(
            chain[-1], stream=True, timeout=(limits.timeout_s, limits.timeout_s), headers=headers, allow_redirects=False
        )
        location = response.headers.get("Location")
        if response.status_code not in REDIRECT_STATUS or not location:
            return response
        response.close()  # a redirect's body is never read
        target = urllib.parse.urljoin(chain[-1], location)
        hops = " -> ".join(redact_url(u) for u in [*chain, target])
        scheme = urllib.parse.urlsplit(target).scheme.lower()
        if scheme not in ("http", "https"):
            raise PermanentError(f"redirected to a {scheme or 'relative'}: URL ({hops}); only http(s) redirects are followed")
        if target in chain:
            raise PermanentError(f"redirect loop ({hops})")
        chain.append(target)
    raise PermanentError(f"more than {MAX_REDIRECTS} redirects ({' -> '.join(redact_url(u) for u in chain)})")


def _attempt(session: requests.Session, url: str, part: Path, limits: Limits) -> None:
    have = part.stat().st_size if part.exists() else 0
    if have > limits.max_bytes:  # left by a run with a larger cap: start over rather than exceed this one
        part.unlink()
        have = 0
    # identity: the bytes on disk are the bytes the checksum is for, and nothing inflates on the way in.
    headers = {"Accept-Encoding": "identity", **({"Range": f"bytes={have}-"} if have else {})}
    with _get(session, url, headers, limits) as response:
        status = response.status_code
        if status in PERMANENT_STATUS:
            raise PermanentError(f"HTTP {status} {response.reason}")
        if status == 416 and have:  # nothing left to send: the part is complete, or stale
            total = _total_from_content_range(response.headers.get("Content-Range", ""))
            if total == have:
                return
            part.unlink(missing_ok=True)
            raise TransientError("server refused the resume range; restarting from zero")
        if status >= 400:
            raise TransientError(f"HTTP {status} {response.reason}")
        if status == 206:
            if not have:
                raise PermanentError("HTTP 206 Partial Content to a request without Range: the server is broken")
            content_range = response.headers.get("Content-Range", "")
            start, total = _start_from_content_range(content_range), _total_from_content_range(content_range)
            if start != have:
                part.unlink(missing_ok=True)
                raise TransientError(f"server resumed at byte {start}, expected {have}; restarting")
            mode = "ab"
        elif status == 200:  # the server ignored Range (or none was sent): start over
            have, mode = 0, "wb"
            length = response.headers.get("Content-Length", "")
            total = int(length) if length.isdigit() else None
        else:
            raise PermanentError(f"HTTP {status} {response.reason}: expected 200, or 206 to a Range request")
        if total is not None and total > limits.max_bytes:
            raise limits.limit_error(total, announced=True)
        encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            log.info(
                "%s: Content-Encoding %s although identity was asked; keeping the bytes as sent (the checksum decides)",
                redact_url(url),
                encoding[:40],
            )
        if have:
            log.info("%s: resuming at byte %d", redact_url(url), have)
        written = have
        with (
            open(part, mode) as out,
            tqdm(
                total=total, initial=have, unit="B", unit_scale=True, desc=shown_name(url), disable=None, mininterval=1.0
            ) as bar,
        ):
            while True:
                if time.monotonic() >= limits.deadline:
                    raise limits.deadline_error(written)
                # read1: whatever one socket read brings (a trickle cannot hold a read open), undecoded.
                block = response.raw.read1(CHUNK, decode_content=False)
                if not block:
                    break
                written += len(block)
                if written > limits.max_bytes:
                    raise limits.limit_error(written)
                out.write(block)
                bar.update(len(block))
    if total is not None and written != total:
        raise TransientError(f"connection closed at byte {written} of {total}")


def _start_from_content_range(value: str) -> int | None:
    match = re.match(r"bytes (\d+)-\d+/(\d+|\*)", value)
    return int(match.group(1)) if match else None


def _total_from_content_range(value: str) -> int | None:
    match = re.search(r"/(\d+)$", value)
    return int(match.group(1)) if match else None


class _Watchdog:
    """Shuts down every socket of one download when its deadline passes. A socket timeout bounds one
    read, not a server trickling a byte at a time (into the headers, too): this bounds the whole."""

    _local = threading.local()  # the watchdog of the download running in this thread

    def __init__(self, deadline: float) -> None:
        self.fired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(max(0.0, deadline - time.monotonic()), self._fire)
        self._timer.daemon = True

    def __enter__(self) -> _Watchdog:
        self._local.current = self
        self._timer.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._timer.cancel()
        self._local.current = None
        with self._lock:
            for sock in self._sockets:
                sock.close()
            self._sockets.clear()

    @classmethod
    def watch(cls, sock: socket.socket) -> None:
        current: _Watchdog | None = getattr(cls._local, "current", None)
        if current is None:
            return
        # A duplicate descriptor: it survives TLS wrapping (which detaches the original) and cannot be
        # reused by an unrelated file, and shutting it down ends the connection for every descriptor.
        copy = sock.dup()
        with current._lock:
            current._sockets.append(copy)
            fired = current.fired
        if fired:
            _shutdown(copy)

    def _fire(self) -> None:
        with self._lock:
            self.fired = True
            for sock in self._sockets:
                _shutdown(sock)


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)  # a read blocked on this connection returns at once
    except OSError:
        pass  # already closed


class _WatchedHTTPConnection(urllib3.connection.HTTPConnection):
    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        _Watchdog.watch(sock)
        return sock


class _WatchedHTTPSConnection(urllib3.connection.HTTPSConnection):
    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        _Watchdog.watch(sock)
        return sock


class _HTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _HTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


class _Adapter(HTTPAdapter):
    """requests' adapter whose connections report their sockets to the running download's watchdog."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}
