"""Durable state behind one protocol: `open_store(url)` picks SQLite or Redis by URL scheme."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from gateway.store.base import (
    Admission,
    Decision,
    KeyRecord,
    Limits,
    Replica,
    Settlement,
    Store,
    UsageRow,
)

__all__ = [
    "Admission", "Decision", "KeyRecord", "Limits", "Replica", "Settlement", "Store",
    "UsageRow", "open_store", "sqlite_path",
]

REDIS_SCHEMES = ("redis", "rediss", "unix")


def sqlite_path(url: str) -> Path:
    """The file of `sqlite:///relative/path` or `sqlite:////absolute/path` (`~` expanded)."""
    if not url.startswith("sqlite:///") or len(url) == len("sqlite:///"):
        raise ValueError(f"a SQLite store URL reads sqlite:///PATH, got {url!r}")
    return Path(url[len("sqlite:///"):]).expanduser()


def open_store(url: str) -> Store:
    """Build the store for `url` (sqlite:///PATH, redis://HOST:PORT/DB[?prefix=P]).

    No I/O happens here: connections are made on first use, so a store that is down shows
    up as `StoreUnavailable` from its methods (and `/ready`), not as a crash at start.
    """
    scheme = urlsplit(url).scheme
    if scheme == "sqlite":
        from gateway.store.sqlite import SQLiteStore

        return SQLiteStore(sqlite_path(url))
    if scheme in REDIS_SCHEMES:
        from gateway.store.redis import DEFAULT_PREFIX, RedisStore

        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
        prefix = next((v for k, v in query if k == "prefix"), DEFAULT_PREFIX)
        rest = urlencode([(k, v) for k, v in query if k != "prefix"])
        return RedisStore(urlunsplit(parts._replace(query=rest)), prefix=prefix)
    raise ValueError(f"unknown store URL scheme {scheme!r} in {url!r}: use sqlite:/// or redis://")
