"""URLs with their secrets taken out, for anything a person or a file will see.

Credentials never belong in a URL that reaches a log, a run-info file, an exception message or a
model card: userinfo (`user:pass@`) is replaced, and the whole query string (time-limited signed
URLs carry their signature there) and fragment are dropped. Slack-style webhooks carry their token
in the path, so a webhook is only ever shown as scheme and host (`origin`).
"""

from __future__ import annotations

import re
import reprlib
import urllib.parse

REDACTED = "REDACTED"
# A URL inside free text: scheme, then anything up to whitespace or a quote/bracket that ends it.
URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>()\[\]{}]+")
SHORT = 80  # characters of a bad value shown in an error message


def redact_url(url: str) -> str:
    """`url` without userinfo, query or fragment: `https://REDACTED@host/path?REDACTED`."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:  # unparseable (e.g. a bad IPv6 literal): show nothing of it
        return f"<unparseable URL {REDACTED}>"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{REDACTED}@{netloc.rpartition('@')[2]}"
    query = REDACTED if parts.query else ""
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def redact_text(text: str) -> str:
    """Every URL inside `text` redacted (for exception messages that quote a URL)."""
    return URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)


def origin(url: str) -> str:
    """Scheme and host only (`https://hooks.example.com`): how a webhook URL may be shown."""
    try:
        parts = urllib.parse.urlsplit(url)
        if not parts.scheme or not parts.netloc:
            return f"<not a URL: {REDACTED}>"
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return f"<unparseable URL {REDACTED}>"
    return f"{parts.scheme}://{host}{port}"


def has_userinfo(url: str) -> bool:
    try:
        return "@" in urllib.parse.urlsplit(url).netloc
    except ValueError:
        return False


_REPR = reprlib.Repr()  # Python 3.11's Repr takes no keyword arguments
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple, _REPR.maxset = 3, 4, 6, 6, 6
_REPR.maxstring = _REPR.maxother = SHORT


def short(value: object, limit: int = SHORT) -> str:
    """A bounded, redacted repr of a bad value for an error message: never the whole of a huge input
    (reprlib stops at a few levels and items, so even a vast nested value costs little)."""
    text = redact_text(_REPR.repr(value))
    return text if len(text) <= limit else f"{text[:limit]}…"
