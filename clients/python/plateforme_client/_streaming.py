"""`Stream` and `AsyncStream`: what `chat_stream` returns.

Both are lazy: the request is sent on the first iteration (or on entering the context
manager), so `AsyncClient.chat_stream(...)` is a plain call returning an async iterator. The
client's opener sends the request inside its retry loop *and reads the first chunk there*:
a failure before the first chunk is retried like any request, one after it is raised — a
half-delivered answer is never silently restarted.

Chunks that carry only the final usage (the client asks for it with
``stream_options.include_usage``) are not yielded; their usage is kept on `.usage`, so every
chunk a caller sees has at least one choice.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from types import TracebackType
from typing import Generic, TypeVar

import httpx

from ._models import ChatCompletionChunk, Usage
from ._ratelimit import RateLimit

__all__ = ["AsyncStream", "Stream"]

_Chunks = TypeVar("_Chunks")
_S = TypeVar("_S", bound="Stream")
_AS = TypeVar("_AS", bound="AsyncStream")
SyncOpened = tuple[httpx.Response, Iterator[ChatCompletionChunk], "ChatCompletionChunk | None"]
AsyncOpened = tuple[httpx.Response, AsyncIterator[ChatCompletionChunk],
                    "ChatCompletionChunk | None"]


class _StreamState(Generic[_Chunks]):
    """What both streams share: state, final usage, headers."""

    def __init__(self) -> None:
        self.usage: Usage | None = None
        self._response: httpx.Response | None = None
        self._chunks: _Chunks | None = None
        self._first: ChatCompletionChunk | None = None
        self._opened = False
        self._closed = False

    def _accept(self, chunk: ChatCompletionChunk) -> bool:
        """Record usage; True if the chunk is for the caller (has choices)."""
        if chunk.usage is not None:
            self.usage = chunk.usage
        return bool(chunk.choices) or chunk.usage is None

    def _take_first(self) -> ChatCompletionChunk | None:
        first, self._first = self._first, None
        return first

    @property
    def response_headers(self) -> httpx.Headers:
        """The response's headers (empty until the stream is opened)."""
        return self._response.headers if self._response is not None else httpx.Headers()

    @property
    def request_id(self) -> str | None:
        request_id: str | None = self.response_headers.get("x-request-id")
        return request_id

    @property
    def rate_limit(self) -> RateLimit | None:
        return RateLimit.from_headers(self.response_headers)


class Stream(_StreamState[Iterator[ChatCompletionChunk]]):
    """An iterator of `ChatCompletionChunk`; close it (or use ``with``) to stop early."""

    def __init__(self, opener: Callable[[], SyncOpened]) -> None:
        super().__init__()
        self._opener = opener

    def _open(self) -> None:
        if self._opened:
            return
        self._opened = True
        try:
            self._response, self._chunks, self._first = self._opener()
        except BaseException:
            self._closed = True
            raise

    def __enter__(self: _S) -> _S:  # noqa: PYI019
        self._open()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> ChatCompletionChunk:
        self._open()
        while not self._closed:
            chunk = self._take_first()
            if chunk is None:
                assert self._chunks is not None
                try:
                    chunk = next(self._chunks)
                except BaseException:
                    self.close()
                    raise
            if self._accept(chunk):
                return chunk
        raise StopIteration

    def close(self) -> None:
        """Stop reading and release the connection; safe to call twice."""
        self._closed = True
        self._opened = True
        if self._chunks is not None and hasattr(self._chunks, "close"):
            self._chunks.close()
        if self._response is not None:
            self._response.close()


class AsyncStream(_StreamState[AsyncIterator[ChatCompletionChunk]]):
    """An async iterator of `ChatCompletionChunk` (``async for``); ``async with`` or `aclose`."""

    def __init__(self, opener: Callable[[], Awaitable[AsyncOpened]]) -> None:
        super().__init__()
        self._opener = opener

    async def _open(self) -> None:
        if self._opened:
            return
        self._opened = True
        try:
            self._response, self._chunks, self._first = await self._opener()
        except BaseException:
            self._closed = True
            raise

    async def __aenter__(self: _AS) -> _AS:  # noqa: PYI019
        await self._open()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    def __aiter__(self) -> AsyncStream:
        return self

    async def __anext__(self) -> ChatCompletionChunk:
        await self._open()
        while not self._closed:
            chunk = self._take_first()
            if chunk is None:
                assert self._chunks is not None
                try:
                    chunk = await self._chunks.__anext__()
                except StopAsyncIteration:
                    await self.aclose()
                    raise
                except BaseException:
                    await self.aclose()
                    raise
            if self._accept(chunk):
                return chunk
        raise StopAsyncIteration

    async def aclose(self) -> None:
        """Stop reading and release the connection; safe to call twice."""
        self._closed = True
        self._opened = True
        if self._chunks is not None and hasattr(self._chunks, "aclose"):
            await self._chunks.aclose()
        if self._response is not None:
            await self._response.aclose()
