"""Coalescing of concurrent script calls into Redis pipelines (auto-pipelining).

A limit decision must be one round trip, and a busy gateway makes hundreds at once. Sent one
by one, each EVALSHA pays a full client round trip (~0.5 ms of Python and socket work here);
sent together, everything that queued while the previous batch was on the wire goes out in
one write and comes back in one read, which is what lets one process make tens of thousands
of decisions per second. Each call is still its own EVALSHA, so each stays atomic.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.errors import StoreUnavailable

MAX_BATCH = 512  # calls per pipeline: bounds one write's size and one batch's latency
MAX_IN_FLIGHT = 4  # pipelines on the wire at once (each holds one pooled connection)

_Call = tuple[AsyncScript, Sequence[Any], Sequence[Any], "asyncio.Future[Any]"]


def _arg(value: Any) -> bytes:
    data = value if isinstance(value, bytes) else str(value).encode()
    return b"$%d\r\n%b\r\n" % (len(data), data)


def _pack(sha: str, keys: Sequence[Any], args: Sequence[Any]) -> bytes:
    """EVALSHA sha numkeys keys... args... in RESP (str() of ints and floats, as redis-py).
    Inlined rather than `_arg` per item: a busy gateway packs ~16 items per request."""
    parts = [b"*%d\r\n$7\r\nEVALSHA\r\n" % (3 + len(keys) + len(args)), _arg(sha),
             _arg(len(keys))]
    for item in (*keys, *args):
        data = item if isinstance(item, bytes) else str(item).encode()
        parts.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(parts)


class ScriptBatcher:
    """`await batcher.call(script, keys, args)` is `await script(keys, args)`, batched."""

    def __init__(self, client: aioredis.Redis, *, max_batch: int = MAX_BATCH,
                 max_in_flight: int = MAX_IN_FLIGHT) -> None:
        self._client = client
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._pending: list[_Call] = []
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()  # strong refs: tasks must not be GC'd
        # Connections kept between batches (at most max_in_flight): taking one from the
        # blocking pool costs a condition, a timeout and observability hooks every time.
        self._idle: list[Any] = []

    async def call(self, script: AsyncScript, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((script, keys, args, future))
        if self._in_flight < self._max_in_flight:
            # The sender runs on the next loop turn, after every task that is ready now has
            # queued its call too: that is where the batching comes from.
            self._in_flight += 1
            task = asyncio.get_running_loop().create_task(self._drain())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await future

    async def _drain(self) -> None:
        try:
            while self._pending:
                batch = self._pending[:self._max_batch]
                del self._pending[:self._max_batch]
                await self._send(batch, reload=True)
        finally:
            self._in_flight -= 1

    async def _send(self, batch: list[_Call], *, reload: bool) -> None:
        try:
            results = await self._round_trip(batch)
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            error = StoreUnavailable(f"Redis store unavailable: {exc}")
            error.__cause__ = exc
            self._fail(batch, error)
            return
        except BaseException as exc:  # cancellation or a bug: no caller may hang
            self._fail(batch, exc)
            raise
        missing = [call for call, result in zip(batch, results)
                   if isinstance(result, NoScriptError)]
        if missing and reload:  # the server restarted or was flushed: load, send once more
            try:
                for script in {call[0] for call in missing}:
                    script.sha = await self._client.script_load(script.script)
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                error = StoreUnavailable(f"Redis store unavailable: {exc}")
                error.__cause__ = exc
                self._fail(missing, error)
            else:
                await self._send(missing, reload=False)
        for (_, _, _, future), result in zip(batch, results):
            if future.done() or (reload and isinstance(result, NoScriptError)):
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def _round_trip(self, batch: list[_Call]) -> list[Any]:
        """One write of every EVALSHA, then one reply each, on one pooled connection.

        redis-py's generic command packer costs more than the script itself here, so the
        commands are packed directly; replies go through redis-py's parser. A connection the
        server closed (a restart) fails on send, before anything ran: it is retried once.
        A kept connection gets the pool's own check first (connected, nothing unread).
        """
        blob = b"".join(_pack(script.sha, keys, args) for script, keys, args, _ in batch)
        pool = self._client.connection_pool
        for attempt in (1, 2):
            conn = await self._connection()
            kept = False
            try:
                try:
                    await conn.send_packed_command(blob)
                except (RedisConnectionError, OSError):
                    await conn.disconnect()
                    if attempt == 2:
                        raise
                    continue
                results: list[Any] = []
                for _ in batch:
                    try:
                        results.append(await conn.read_response())
                    except ResponseError as exc:  # the reply was read: the stream stays in step
                        results.append(exc)
                if len(self._idle) < self._max_in_flight:
                    self._idle.append(conn)
                    kept = True
                return results
            except BaseException:
                await conn.disconnect()  # replies may be left unread: never reuse it
                raise
            finally:
                if not kept:
                    await pool.release(conn)
        raise AssertionError("unreachable")

    async def _connection(self) -> Any:
        pool = self._client.connection_pool
        while self._idle:
            conn = self._idle.pop()
            try:
                if conn.is_connected and not await conn.can_read():
                    return conn
            except (RedisConnectionError, RedisTimeoutError, OSError):
                pass
            await conn.disconnect()
            await pool.release(conn)
        return await pool.get_connection()  # type: ignore[no-untyped-call]

    @staticmethod
    def _fail(batch: list[_Call], error: BaseException) -> None:
        for _, _, _, future in batch:
            if future.done():
                continue
            if isinstance(error, asyncio.CancelledError):
                future.cancel()
            else:
                future.set_exception(error)
