"""Unit tests of cifarflow.data.fetch: the HTTP client's status handling, resume, caps and messages,
against a scripted server on 127.0.0.1 in this process."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import requests

from cifarflow.data import fetch
from cifarflow.data.fetch import DeadlineError, LimitError, Limits, PermanentError, TransientError

Reply = tuple[int, dict[str, str], bytes]


class Scripted(http.server.ThreadingHTTPServer):
    """Replies to each path from a list, one reply per request (the last one repeats)."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), ScriptedHandler)
        self.replies: dict[str, list[Reply]] = {}
        self.requests: list[dict[str, Any]] = []

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


class ScriptedHandler(http.server.BaseHTTPRequestHandler):
    server: Scripted

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.server.requests.append(
            {"path": self.path, "range": self.headers.get("Range"), "encoding": self.headers.get("Accept-Encoding")}
        )
        script = self.server.replies.get(self.path.split("?")[0]) or [(404, {}, b"")]
        status, headers, body = script.pop(0) if len(script) > 1 else script[0]
        self.send_response(status)
        headers = {"Content-Length": str(len(body)), **headers}
        for key, value in headers.items():
            if value is not None:
                self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def server() -> Iterator[Scripted]:
    srv = Scripted()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def get(server: Scripted, path: str, part: Path, **kw: Any) -> None:
    options = {"retries": 0, "timeout_s": 5.0, "deadline_s": 20.0, "max_bytes": 1 << 20, "backoff_s": 0.0, **kw}
    fetch.download(server.url(path), part, **options)


def test_limits_messages_name_the_params() -> None:
    limits = Limits(timeout_s=3.0, deadline_s=2.5, deadline=0.0, max_bytes=3 << 20)
    assert str(limits.deadline_error()) == (
        "not complete within data.deadline_s=2.5, with data.timeout_s=3 per read; "
        "raise data.deadline_s if the server is genuinely this slow"
    )
    assert str(limits.deadline_error(1234, "boom")).startswith(
        "not complete within data.deadline_s=2.5 (1,234 bytes so far), with"
    )
    assert str(limits.deadline_error(0)).endswith("genuinely this slow") and "(0 bytes so far)" in str(limits.deadline_error(0))
    assert str(limits.deadline_error(5, "boom")).endswith("genuinely this slow; last error: boom")
    assert isinstance(limits.deadline_error(), DeadlineError) and isinstance(limits.deadline_error(), PermanentError)
    assert (
        str(limits.limit_error(5_000_000, announced=True))
        == "the server announces 5,000,000 bytes, over data.max_download_mb=3; raise it if the file is genuine"
    )
    assert (
        str(limits.limit_error(5))
        == "the server sent more than 3,145,728 bytes, over data.max_download_mb=3; raise it if the file is genuine"
    )
    assert isinstance(limits.limit_error(5), LimitError)


def test_scrub_and_describe_drop_credentials_and_queries() -> None:
    assert fetch.scrub("GET /a.tgz?sig=secret HTTP/1.1") == "GET /a.tgz?REDACTED HTTP/1.1"
    assert fetch.scrub("ask ? here") == "ask ? here"
    assert "secret" not in fetch.scrub("https://u:secret@h/a?x=1")
    assert fetch.describe(TransientError("x /a?k=v")) == "x /a?REDACTED"
    assert fetch.describe(PermanentError("p")) == "p"
    assert fetch.describe(ValueError("bad /b?t=1")) == "ValueError: bad /b?REDACTED"
    assert len(fetch.describe(ValueError("v" * 2000))) == 500
    assert len(fetch.describe(TransientError("v" * 2000))) == 2000


def test_shown_name_is_the_file_name_only() -> None:
    assert fetch.shown_name("https://u:p@host/dir/a.tgz?sig=1") == "a.tgz"
    assert fetch.shown_name("https://host/") == "download"
    assert fetch.shown_name("http://[::1") == "download"


def test_content_range_parsing() -> None:
    assert fetch._start_from_content_range("bytes 100-199/200") == 100
    assert fetch._start_from_content_range("bytes 5-9/*") == 5
    assert fetch._start_from_content_range("bytes */200") is None
    assert fetch._total_from_content_range("bytes 100-199/200") == 200
    assert fetch._total_from_content_range("bytes 100-199/*") is None
    assert fetch._total_from_content_range("") is None


def test_a_200_download_writes_the_body_and_asks_for_identity(server: Scripted, tmp_path: Path) -> None:
    server.replies["/a"] = [(200, {}, b"hello")]
    part = tmp_path / "sub" / "a.part"
    get(server, "/a", part)
    assert part.read_bytes() == b"hello"
    assert server.requests == [{"path": "/a", "range": None, "encoding": "identity"}]


def test_a_partial_file_resumes_with_range(server: Scripted, tmp_path: Path) -> None:
    part = tmp_path / "a.part"
    part.write_bytes(b"hel")
    server.replies["/a"] = [(206, {"Content-Range": "bytes 3-4/5"}, b"lo")]
    get(server, "/a", part)
    assert part.read_bytes() == b"hello" and server.requests[0]["range"] == "bytes=3-"


def test_a_server_ignoring_range_restarts_from_zero(server: Scripted, tmp_path: Path) -> None:
    part = tmp_path / "a.part"
    part.write_bytes(b"old")
    server.replies["/a"] = [(200, {}, b"hello")]
    get(server, "/a", part)
    assert part.read_bytes() == b"hello"


def test_a_complete_part_answered_416_is_kept(server: Scripted, tmp_path: Path) -> None:
    part = tmp_path / "a.part"
    part.write_bytes(b"hello")
    server.replies["/a"] = [(416, {"Content-Range": "bytes */5"}, b"")]
    get(server, "/a", part)
    assert part.read_bytes() == b"hello"


def test_a_stale_part_answered_416_is_removed_and_retried(server: Scripted, tmp_path: Path) -> None:
    part = tmp_path / "a.part"
    part.write_bytes(b"hello!")
    server.replies["/a"] = [(416, {"Content-Range": "bytes */5"}, b""), (200, {}, b"hello")]
    with pytest.raises(
        TransientError, match=r"^server refused the resume range; restarting from zero \(gave up after 1 attempts\)$"
    ):
        get(server, "/a", part)
    assert not part.exists()
    get(server, "/a", part, retries=1)
    assert part.read_bytes() == b"hello" and server.requests[-1]["range"] is None


def test_a_resume_at_the_wrong_byte_starts_over(server: Scripted, tmp_path: Path) -> None:
    part = tmp_path / "a.part"
    part.write_bytes(b"hel")
    server.replies["/a"] = [(206, {"Content-Range": "bytes 0-4/5"}, b"hello"), (200, {}, b"hello")]
    get(server, "/a", part, retries=1)
    assert part.read_bytes() == b"hello"
    assert [r["range"] for r in server.requests] == ["bytes=3-", None]


def test_206_without_range_is_a_broken_server(server: Scripted, tmp_path: Path) -> None:
    server.replies["/a"] = [(206, {"Content-Range": "bytes 0-4/5"}, b"hello")]
    with pytest.raises(PermanentError, match=r"^HTTP 206 Partial Content to a request without Range: the server is broken$"):
        get(server, "/a", tmp_path / "a.part", retries=3)
    assert len(server.requests) == 1


@pytest.mark.parametrize("status", [400, 401, 403, 404, 405, 410, 451])
def test_permanent_statuses_are_not_retried(server: Scripted, tmp_path: Path, status: int) -> None:
    server.replies["/a"] = [(status, {}, b"")]
    with pytest.raises(PermanentError, match=rf"^HTTP {status} "):
        get(server, "/a", tmp_path / "a.part", retries=3)
    assert len(server.requests) == 1


@pytest.mark.parametrize("status", [408, 429, 500, 503])
def test_other_errors_are_retried_then_given_up(server: Scripted, tmp_path: Path, status: int) -> None:
    server.replies["/a"] = [(status, {}, b"")]
    with pytest.raises(TransientError, match=rf"^HTTP {status} \w.* \(gave up after 3 attempts\)$"):
        get(server, "/a", tmp_path / "a.part", retries=2)
    assert len(server.requests) == 3
    server.replies["/b"] = [(503, {}, b""), (200, {}, b"ok")]
    get(server, "/b", tmp_path / "b.part", retries=1)
    assert (tmp_path / "b.part").read_bytes() == b"ok"


def test_unexpected_success_statuses_are_permanent(server: Scripted, tmp_path: Path) -> None:
    server.replies["/a"] = [(204, {"Content-Length": None}, b"")]
    with pytest.raises(PermanentError, match=r"^HTTP 204 No Content: expected 200, or 206 to a Range request$"):
        get(server, "/a", tmp_path / "a.part", retries=2)


def test_the_byte_cap_counts_announced_and_sent_bytes(server: Scripted, tmp_path: Path) -> None:
    part = tmp_path / "a.part"
    server.replies["/exact"] = [(200, {}, b"x" * 1024)]
    get(server, "/exact", part, max_bytes=1024)
    assert part.stat().st_size == 1024
    server.replies["/big"] = [(200, {}, b"x" * 1025)]
    with pytest.raises(LimitError, match=r"^the server announces 1,025 bytes, over data.max_download_mb=0"):
        get(server, "/big", part, max_bytes=1024, retries=2)
    assert not part.exists() and len(server.requests) == 2
    server.replies["/sneaky"] = [(200, {"Content-Length": None, "Connection": "close"}, b"x" * 1025)]
    with pytest.raises(LimitError, match=r"^the server sent more than 1,024 bytes"):
        get(server, "/sneaky", part, max_bytes=1024)
    assert not part.exists()
    server.replies["/resume"] = [(206, {"Content-Range": "bytes 1000-1099/1100"}, b"y" * 100)]
    part.write_bytes(b"x" * 1000)
    with pytest.raises(LimitError, match=r"announces 1,100 bytes"):
        get(server, "/resume", part, max_bytes=1024)


def test_a_part_over_the_cap_is_started_over(server: Scripted, tmp_path: Path) -> None:
    part = tmp_path / "a.part"
    part.write_bytes(b"z" * 2000)
    server.replies["/a"] = [(200, {}, b"fresh")]
    get(server, "/a", part, max_bytes=1024)
    assert part.read_bytes() == b"fresh" and server.requests[0]["range"] is None
    part.write_bytes(b"z" * 1024)
    server.replies["/b"] = [(206, {"Content-Range": "bytes 1024-1024/1025"}, b"q")]
    with pytest.raises(LimitError):
        get(server, "/b", part, max_bytes=1024)
    assert server.requests[-1]["range"] == "bytes=1024-"


def test_a_short_body_is_transient(server: Scripted, tmp_path: Path) -> None:
    server.replies["/a"] = [(200, {"Content-Length": "10", "Connection": "close"}, b"12345")]
    with pytest.raises(TransientError, match=r"gave up after 1 attempts"):
        get(server, "/a", tmp_path / "a.part")
    assert (tmp_path / "a.part").read_bytes() == b"12345"  # kept for the resume


def test_redirects_are_followed_by_hand_within_bounds(server: Scripted, tmp_path: Path) -> None:
    server.replies["/r"] = [(302, {"Location": "/a"}, b"")]
    server.replies["/a"] = [(200, {}, b"target")]
    get(server, "/r", tmp_path / "a.part")
    assert (tmp_path / "a.part").read_bytes() == b"target"
    for i in range(fetch.MAX_REDIRECTS):
        server.replies[f"/h{i}"] = [(301, {"Location": f"/h{i + 1}"}, b"")]
    server.replies[f"/h{fetch.MAX_REDIRECTS}"] = [(200, {}, b"five")]
    get(server, "/h0", tmp_path / "b.part")
    assert (tmp_path / "b.part").read_bytes() == b"five"
    server.replies[f"/h{fetch.MAX_REDIRECTS}"] = [(307, {"Location": "/end"}, b"")]
    with pytest.raises(PermanentError, match=r"^more than 5 redirects \(http://127.0.0.1:\d+/h0 -> (.*/h\d -> ){5}.*/end\)$"):
        get(server, "/h0", tmp_path / "c.part")
    server.replies["/rel"] = [(303, {"Location": "mailto:x"}, b"")]
    with pytest.raises(
        PermanentError, match=r"^redirected to a mailto: URL \(.*/rel -> mailto:x\); only http\(s\) redirects are followed$"
    ):
        get(server, "/rel", tmp_path / "d.part")


def test_a_redirect_without_location_is_the_response(server: Scripted, tmp_path: Path) -> None:
    server.replies["/a"] = [(302, {}, b"")]
    with pytest.raises(PermanentError, match=r"^HTTP 302 Found: expected 200"):
        get(server, "/a", tmp_path / "a.part")


def test_connection_errors_are_retried_with_a_backoff(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    waits: list[float] = []
    monkeypatch.setattr(fetch.time, "sleep", waits.append)
    monkeypatch.setattr(fetch.random, "uniform", lambda low, high: (low + high) / 2)  # the jitter's middle: 1.0
    with pytest.raises(TransientError, match=r"^ConnectionError: .* \(gave up after 4 attempts\)$"):
        fetch.download(
            "http://127.0.0.1:9/a", tmp_path / "a.part", retries=3, timeout_s=2, deadline_s=1000, max_bytes=10, backoff_s=10.0
        )
    assert waits == [10.0, 20.0, 30.0]  # 10·2^n, at most MAX_BACKOFF_S, times the jitter factor


def test_a_retry_that_could_not_finish_in_time_is_a_deadline_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fetch.time, "sleep", lambda s: pytest.fail("slept past the deadline"))
    with pytest.raises(DeadlineError, match=r"deadline_s=5,.*; last error: ConnectionError"):
        fetch.download(
            "http://127.0.0.1:9/a", tmp_path / "a.part", retries=3, timeout_s=2, deadline_s=5, max_bytes=10, backoff_s=10.0
        )


def test_bad_urls_are_permanent(tmp_path: Path) -> None:
    with pytest.raises(PermanentError, match=r"^InvalidURL: "):
        fetch.download("http://:80/x", tmp_path / "a.part", retries=3, timeout_s=2, deadline_s=10, max_bytes=10)


def test_a_trickle_stops_at_the_deadline(server: Scripted, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server.replies["/a"] = [(200, {}, b"x" * 100)]
    real = time.monotonic
    calls = {"n": 0}

    def clock() -> float:
        calls["n"] += 1
        return real() + (1000.0 if calls["n"] > 1 else 0.0)  # the first call sets the deadline

    monkeypatch.setattr(fetch.time, "monotonic", clock)
    with pytest.raises(DeadlineError, match=r"^not complete within data.deadline_s=20"):
        get(server, "/a", tmp_path / "a.part")


def test_scrub_filter_redacts_urllib3_records() -> None:
    import logging

    record = logging.LogRecord("urllib3.connectionpool", logging.DEBUG, "f", 1, "GET %s", ("/a?sig=1",), None)
    assert fetch._ScrubRecords().filter(record) is True
    assert record.msg == "GET /a?REDACTED" and record.args is None
    broken = logging.LogRecord("x", logging.DEBUG, "f", 1, "%d", ("nan?",), None)
    assert fetch._ScrubRecords().filter(broken) and broken.msg == "%d"


def test_requests_session_is_mounted_with_the_watchdog_adapter() -> None:
    adapter = fetch._Adapter()
    assert adapter.poolmanager.pool_classes_by_scheme == {"http": fetch._HTTPPool, "https": fetch._HTTPSPool}
    assert requests is not None


def test_the_watchdog_shuts_down_watched_sockets_at_the_deadline() -> None:
    import socket

    left, right = socket.socketpair()
    try:
        with fetch._Watchdog(time.monotonic() + 0.1) as watchdog:
            fetch._Watchdog.watch(left)
            left.settimeout(5)
            started = time.monotonic()
            assert left.recv(10) == b""  # shut down: the blocked read returns at once, not after 5 s
            assert watchdog.fired and time.monotonic() - started < 4
            late, peer = socket.socketpair()
            fetch._Watchdog.watch(late)  # a socket opened after the deadline is shut down at once
            late.settimeout(5)
            assert late.recv(10) == b""
            late.close()
            peer.close()
        free, other = socket.socketpair()
        fetch._Watchdog.watch(free)  # outside a download: not watched
        free.settimeout(0.05)
        with pytest.raises(TimeoutError):
            free.recv(10)
        free.close()
        other.close()
    finally:
        left.close()
        right.close()
    fetch._shutdown(left)  # closed already: no error


class RecordingBar:
    """Stands in for tqdm (disabled in tests, so its arguments would go unchecked): records them."""

    made: ClassVar[list[RecordingBar]] = []

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs, self.updates = kwargs, []
        RecordingBar.made.append(self)

    def __enter__(self) -> RecordingBar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def update(self, n: int) -> None:
        self.updates.append(n)


def test_the_progress_bar_shows_bytes_from_the_resume_offset(
    server: Scripted, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    RecordingBar.made = []
    monkeypatch.setattr(fetch, "tqdm", RecordingBar)
    part = tmp_path / "a.part"
    part.write_bytes(b"hel")
    server.replies["/dir/a.tgz"] = [(206, {"Content-Range": "bytes 3-4/5"}, b"lo")]
    fetch.download(
        server.url("/dir/a.tgz?sig=secret"), part, retries=0, timeout_s=5, deadline_s=20, max_bytes=1 << 20, backoff_s=0
    )
    [bar] = RecordingBar.made
    assert bar.kwargs == {
        "total": 5,
        "initial": 3,
        "unit": "B",
        "unit_scale": True,
        "desc": "a.tgz",
        "disable": None,
        "mininterval": 1.0,
    }
    assert sum(bar.updates) == 2


def test_resume_and_encoding_are_logged_with_the_url_redacted(
    server: Scripted, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    part = tmp_path / "a.part"
    part.write_bytes(b"hel")
    encoding = "x-" + "z" * 60
    server.replies["/a"] = [(206, {"Content-Range": "bytes 3-4/5", "Content-Encoding": encoding.upper()}, b"lo")]
    url = server.url("/a").replace("http://", "http://user:pw@")
    with caplog.at_level("INFO", logger="cifarflow.data.fetch"):
        fetch.download(url, part, retries=0, timeout_s=5, deadline_s=20, max_bytes=1 << 20, backoff_s=0)
    shown = fetch.redact_url(url)
    assert "pw" not in shown
    assert [r.getMessage() for r in caplog.records if r.name == "cifarflow.data.fetch"] == [
        f"{shown}: Content-Encoding {encoding[:40]} although identity was asked; keeping the bytes as sent "
        "(the checksum decides)",
        f"{shown}: resuming at byte 3",
    ]
    assert part.read_bytes() == b"hello"
    caplog.clear()
    server.replies["/b"] = [(200, {"Content-Encoding": " Identity "}, b"plain")]
    with caplog.at_level("INFO", logger="cifarflow.data.fetch"):
        get(server, "/b", tmp_path / "b.part")
    assert [r for r in caplog.records if r.name == "cifarflow.data.fetch"] == []  # identity, fresh start: nothing to say


def test_a_retry_is_logged_with_its_reason_and_count(
    server: Scripted, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(fetch.random, "uniform", lambda low, high: (low + high) / 2)  # the jitter's middle: 1.0
    server.replies["/a"] = [(503, {}, b""), (200, {}, b"ok")]
    with caplog.at_level("WARNING", logger="cifarflow.data.fetch"):
        get(server, "/a", tmp_path / "a.part", retries=2, backoff_s=0.001)
    [record] = [r for r in caplog.records if r.name == "cifarflow.data.fetch"]
    assert record.levelname == "WARNING"
    assert record.getMessage() == f"{server.url('/a')}: HTTP 503 Service Unavailable; retry 1/2 in 0.0s"
    assert len(server.requests) == 2  # one retry, then success: no third request


def test_resume_failures_say_what_went_wrong(server: Scripted, tmp_path: Path) -> None:
    part = tmp_path / "a.part"
    part.write_bytes(b"hel")
    server.replies["/a"] = [(206, {"Content-Range": "bytes 0-4/5"}, b"hello")]
    with pytest.raises(TransientError, match=r"^server resumed at byte 0, expected 3; restarting \(gave up after 1 attempts\)$"):
        get(server, "/a", part)
    assert not part.exists()
    part.write_bytes(b"hel")  # a body complete by its Content-Length, short of the Content-Range's total
    server.replies["/short"] = [(206, {"Content-Range": "bytes 3-9/10"}, b"lo")]
    with pytest.raises(TransientError, match=r"^connection closed at byte 5 of 10 \(gave up after 1 attempts\)$"):
        get(server, "/short", part)
    assert part.read_bytes() == b"hello"  # kept for the next resume


def test_a_body_without_length_is_read_to_the_end(server: Scripted, tmp_path: Path) -> None:
    server.replies["/a"] = [(200, {"Content-Length": None, "Connection": "close"}, b"no length given")]
    get(server, "/a", tmp_path / "a.part")
    assert (tmp_path / "a.part").read_bytes() == b"no length given" and len(server.requests) == 1


def test_a_deadline_during_the_body_reports_the_bytes_so_far(
    server: Scripted, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    part = tmp_path / "a.part"
    part.write_bytes(b"x" * 7)
    server.replies["/a"] = [(206, {"Content-Range": "bytes 7-9/10"}, b"abc")]
    real, calls = time.monotonic, {"n": 0}

    def clock() -> float:  # on time until the body is read, then past the deadline
        calls["n"] += 1
        return real() + (1000.0 if calls["n"] > 1 else 0.0)

    monkeypatch.setattr(fetch.time, "monotonic", clock)
    with pytest.raises(DeadlineError, match=r"^not complete within data.deadline_s=20 \(7 bytes so far\)"):
        get(server, "/a", part)
