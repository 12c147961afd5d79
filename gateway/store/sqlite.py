"""SQLiteStore: the embedded default, one file shared by every worker process on a host.

Durability and safety come from SQLite itself: WAL journal (readers never block the writer),
`synchronous=NORMAL` (a power cut may lose the last commits, never corrupt the file), a busy
timeout, and `BEGIN IMMEDIATE` around every read-modify-write so two processes deciding for
the same key serialize on the file lock instead of both admitting. Calls take well under a
millisecond, so they run one at a time on a dedicated thread with its own connection: a
lock held by another process blocks that thread, never the event loop.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from gateway.errors import StoreUnavailable
from gateway.store.base import (
    WINDOW_SECONDS,
    Admission,
    Decision,
    KeyRecord,
    Replica,
    Settlement,
    UsageRow,
    check_mutable,
    revoked_record,
    updated_record,
)
from gateway.store.memory import decide, utc_day, utc_month

T = TypeVar("T")
BUSY_TIMEOUT_SECONDS = 10.0
# OperationalError messages that mean "the file cannot be used", not "the SQL is wrong"
_UNAVAILABLE_MESSAGES = ("unable to open", "disk i/o", "database is locked", "readonly",
                         "disk is full", "out of memory")
_USAGE_COLUMNS = ("requests", "prompt_tokens", "completion_tokens", "guardrail_tokens", "errors")

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS keys (id TEXT PRIMARY KEY, created_at REAL NOT NULL,"
    " data TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS replicas (model TEXT NOT NULL, url TEXT NOT NULL,"
    " registered_at REAL NOT NULL, PRIMARY KEY (model, url))",
    "CREATE TABLE IF NOT EXISTS win (key_id TEXT NOT NULL, lease_id TEXT NOT NULL,"
    " at REAL NOT NULL, tokens INTEGER NOT NULL, PRIMARY KEY (key_id, lease_id))"
    " WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS win_at ON win (key_id, at)",
    "CREATE TABLE IF NOT EXISTS leases (key_id TEXT NOT NULL, lease_id TEXT NOT NULL,"
    " expires_at REAL NOT NULL, PRIMARY KEY (key_id, lease_id)) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS leases_exp ON leases (key_id, expires_at)",
    "CREATE TABLE IF NOT EXISTS monthly (key_id TEXT NOT NULL, month TEXT NOT NULL,"
    " tokens INTEGER NOT NULL, PRIMARY KEY (key_id, month)) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS usage (day TEXT NOT NULL, key_id TEXT NOT NULL,"
    " model TEXT NOT NULL, requests INTEGER NOT NULL, prompt_tokens INTEGER NOT NULL,"
    " completion_tokens INTEGER NOT NULL, guardrail_tokens INTEGER NOT NULL,"
    " errors INTEGER NOT NULL, PRIMARY KEY (day, key_id, model)) WITHOUT ROWID",
    "INSERT OR IGNORE INTO meta (name, value) VALUES ('keys_version', 0)",
)


@contextmanager
def _immediate(conn: sqlite3.Connection) -> Iterator[None]:
    """A write transaction that takes the file's write lock up front (no upgrade deadlock)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


class _SqlView:
    """`LimitView` over one key's rows, inside the admission's transaction."""

    def __init__(self, conn: sqlite3.Connection, key_id: str, now: float) -> None:
        self._conn, self._key, self._now = conn, key_id, now

    def _one(self, sql: str, *args: Any) -> Any:
        return self._conn.execute(sql, (self._key, *args)).fetchone()

    def window_totals(self) -> tuple[int, int]:
        count, tokens = self._one(
            "SELECT COUNT(*), COALESCE(SUM(tokens), 0) FROM win WHERE key_id = ?")
        return int(count), int(tokens)

    def request_time(self, index: int) -> float:
        return float(self._one(
            "SELECT at FROM win WHERE key_id = ? ORDER BY at LIMIT 1 OFFSET ?", index)[0])

    def time_tokens_freed(self, need: int) -> float | None:
        freed = 0
        rows = self._conn.execute(
            "SELECT at, tokens FROM win WHERE key_id = ? ORDER BY at", (self._key,))
        for at, tokens in rows:
            freed += tokens
            if freed >= need:
                return float(at)
        return None

    def newest_time(self) -> float | None:
        row = self._one("SELECT MAX(at) FROM win WHERE key_id = ?")
        return None if row[0] is None else float(row[0])

    def leases_held(self) -> int:
        return int(self._one("SELECT COUNT(*) FROM leases WHERE key_id = ?")[0])

    def earliest_lease_expiry(self) -> float | None:
        row = self._one("SELECT MIN(expires_at) FROM leases WHERE key_id = ?")
        return None if row[0] is None else float(row[0])

    def month_used(self) -> int:
        row = self._one("SELECT tokens FROM monthly WHERE key_id = ? AND month = ?",
                        utc_month(self._now))
        return 0 if row is None else int(row[0])


class SQLiteStore:
    """The `Store` on one SQLite file (created with its parent directories on first use)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).expanduser()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="plateforme-sqlite")
        self._conn: sqlite3.Connection | None = None  # touched only on the executor's thread

    # plumbing -------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreUnavailable(f"cannot create the store directory: {exc}") from exc
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_SECONDS * 1000)}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            with _immediate(conn):
                for statement in _SCHEMA:
                    conn.execute(statement)
        except BaseException:
            conn.close()
            raise
        return conn

    def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        try:
            if self._conn is None:
                self._conn = self._connect()
            return fn(self._conn)
        except sqlite3.OperationalError as exc:
            text = str(exc).lower()
            if any(m in text for m in _UNAVAILABLE_MESSAGES):
                raise StoreUnavailable(f"SQLite store {self.path} unavailable: {exc}") from exc
            raise

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._call, fn)

    async def ping(self) -> None:
        await self._run(lambda c: c.execute("SELECT 1").fetchone())

    async def close(self) -> None:
        def _close(conn: sqlite3.Connection) -> None:
            conn.close()
            self._conn = None
        if self._conn is not None:
            await self._run(_close)
        self._executor.shutdown(wait=True)

    # keys -----------------------------------------------------------------------------
    @staticmethod
    def _bump(conn: sqlite3.Connection) -> None:
        conn.execute("UPDATE meta SET value = value + 1 WHERE name = 'keys_version'")

    async def create_key(self, record: KeyRecord) -> None:
        def op(conn: sqlite3.Connection) -> None:
            with _immediate(conn):
                try:
                    conn.execute("INSERT INTO keys (id, created_at, data) VALUES (?, ?, ?)",
                                 (record.id, record.created_at, json.dumps(record.to_dict())))
                except sqlite3.IntegrityError as exc:
                    raise ValueError(f"key {record.id!r} already exists") from exc
                self._bump(conn)
        await self._run(op)

    @staticmethod
    def _get(conn: sqlite3.Connection, key_id: str) -> KeyRecord | None:
        row = conn.execute("SELECT data FROM keys WHERE id = ?", (key_id,)).fetchone()
        return None if row is None else KeyRecord.from_dict(json.loads(row[0]))

    async def get_key(self, key_id: str) -> KeyRecord | None:
        return await self._run(lambda c: self._get(c, key_id))

    async def list_keys(self) -> list[KeyRecord]:
        rows = await self._run(
            lambda c: c.execute("SELECT data FROM keys ORDER BY created_at, id").fetchall())
        return [KeyRecord.from_dict(json.loads(data)) for (data,) in rows]

    async def _rewrite(self, key_id: str,
                       change: Callable[[KeyRecord], KeyRecord | None]) -> KeyRecord | None:
        """Read, change and write one key in one transaction; bump the version if changed."""
        def op(conn: sqlite3.Connection) -> KeyRecord | None:
            with _immediate(conn):
                old = self._get(conn, key_id)
                if old is None:
                    return None
                new = change(old)
                if new is None:
                    return old
                conn.execute("UPDATE keys SET data = ? WHERE id = ?",
                             (json.dumps(new.to_dict()), key_id))
                self._bump(conn)
                return new
        return await self._run(op)

    async def update_key(self, key_id: str, changes: dict[str, Any]) -> KeyRecord | None:
        check_mutable(changes)
        return await self._rewrite(key_id, lambda old: updated_record(old, changes))

    async def revoke_key(self, key_id: str) -> KeyRecord | None:
        now = time.time()
        return await self._rewrite(key_id, lambda old: revoked_record(old, now))

    async def keys_version(self) -> int:
        row = await self._run(lambda c: c.execute(
            "SELECT value FROM meta WHERE name = 'keys_version'").fetchone())
        return int(row[0])

    # replicas -------------------------------------------------------------------------
    async def add_replica(self, model: str, url: str) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "INSERT OR IGNORE INTO replicas (model, url, registered_at) VALUES (?, ?, ?)",
                (model, url, time.time()))
            return cur.rowcount == 1
        return await self._run(op)

    async def remove_replica(self, model: str, url: str) -> bool:
        return await self._run(lambda c: c.execute(
            "DELETE FROM replicas WHERE model = ? AND url = ?", (model, url)).rowcount == 1)

    async def list_replicas(self) -> list[Replica]:
        rows = await self._run(lambda c: c.execute(
            "SELECT model, url, registered_at FROM replicas"
            " ORDER BY model, registered_at, url").fetchall())
        return [Replica(model=m, url=u, registered_at=float(r)) for m, u, r in rows]

    # limits and usage -----------------------------------------------------------------
    async def admit(self, admission: Admission) -> Decision:
        return await self._run(lambda c: self._admit(c, admission))

    @staticmethod
    def _admit(conn: sqlite3.Connection, adm: Admission) -> Decision:
        key = adm.key_id
        with _immediate(conn):
            now = time.time()  # read under the lock: decisions are ordered by their clock
            conn.execute("DELETE FROM leases WHERE key_id = ? AND expires_at <= ?", (key, now))
            conn.execute("DELETE FROM win WHERE key_id = ? AND at <= ?",
                         (key, now - WINDOW_SECONDS))
            decision = decide(adm, now, _SqlView(conn, key, now))
            if decision.allowed:
                if adm.limits.rpm is not None or adm.limits.tpm is not None:
                    conn.execute("INSERT OR REPLACE INTO win VALUES (?, ?, ?, ?)",
                                 (key, adm.lease_id, now, adm.tokens))
                conn.execute("INSERT OR REPLACE INTO leases VALUES (?, ?, ?)",
                             (key, adm.lease_id, now + adm.lease_seconds))
                conn.execute(
                    "INSERT INTO monthly VALUES (?, ?, ?) ON CONFLICT (key_id, month)"
                    " DO UPDATE SET tokens = tokens + excluded.tokens",
                    (key, utc_month(now), adm.tokens))
        return decision

    async def settle(self, settlement: Settlement) -> None:
        await self._run(lambda c: self._settle(c, settlement))

    @staticmethod
    def _settle(conn: sqlite3.Connection, s: Settlement) -> None:
        used = s.prompt_tokens + s.completion_tokens + s.guardrail_tokens
        with _immediate(conn):
            held = conn.execute("DELETE FROM leases WHERE key_id = ? AND lease_id = ?",
                                (s.key_id, s.lease_id)).rowcount == 1
            if held:  # refund once: a second settle finds no lease
                conn.execute("UPDATE win SET tokens = ? WHERE key_id = ? AND lease_id = ?",
                             (used, s.key_id, s.lease_id))
                conn.execute(
                    "UPDATE monthly SET tokens = MAX(0, tokens + ?) WHERE key_id = ? AND month = ?",
                    (used - s.reserved_tokens, s.key_id, utc_month(s.admitted_at)))
            elif s.local and used > 0:  # admitted during an outage: nothing was reserved
                conn.execute(
                    "INSERT INTO monthly VALUES (?, ?, ?) ON CONFLICT (key_id, month)"
                    " DO UPDATE SET tokens = tokens + excluded.tokens",
                    (s.key_id, utc_month(s.admitted_at), used))
            conn.execute(
                "INSERT INTO usage VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (day, key_id, model)"
                " DO UPDATE SET " + ", ".join(f"{c} = {c} + excluded.{c}" for c in _USAGE_COLUMNS),
                (utc_day(s.admitted_at), s.key_id, s.model, s.requests, s.prompt_tokens,
                 s.completion_tokens, s.guardrail_tokens, s.errors))

    async def usage(self, key_id: str | None = None, since: str | None = None) -> list[UsageRow]:
        sql = ("SELECT key_id, model, day, " + ", ".join(_USAGE_COLUMNS)
               + " FROM usage WHERE (? IS NULL OR key_id = ?) AND (? IS NULL OR day >= ?)"
               " ORDER BY day, key_id, model")
        rows = await self._run(lambda c: c.execute(sql, (key_id, key_id, since, since)).fetchall())
        return [UsageRow(*row) for row in rows]

    async def monthly_tokens_used(self, key_id: str) -> int:
        row = await self._run(lambda c: c.execute(
            "SELECT tokens FROM monthly WHERE key_id = ? AND month = ?",
            (key_id, utc_month(time.time()))).fetchone())
        return 0 if row is None else int(row[0])
