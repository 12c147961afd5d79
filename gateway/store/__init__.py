"""Durable state behind one protocol: `open_store(url)` picks SQLite or Redis by URL scheme."""

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
    "UsageRow", "open_store",
]


def open_store(url: str) -> Store:
    """Build the store for `url` (sqlite:///PATH, redis://HOST:PORT/DB[?prefix=P])."""
    raise NotImplementedError("written by the store work")
