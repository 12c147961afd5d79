"""Fakes for the client tests: a scripted `httpx.MockTransport`, SSE bodies, a controlled clock.

No tests here. The scripted server answers each request with the next scripted item (a
response, or an exception to raise as a transport failure) and records every request it saw,
so tests assert on what went over the wire, never on the client's private state.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx

KEY = "sk-test-123"
BASE = "http://gateway.test"

Script = httpx.Response | Exception | Callable[[httpx.Request], httpx.Response]


def completion(text: str = "Hello!", **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": "cmpl-1", "object": "chat.completion", "created": 1, "model": "mistral-small",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
    }
    body.update(extra)
    return body


def chunk(content: str | None = None, *, finish: str | None = None, usage: bool = False,
          **extra: Any) -> dict[str, Any]:
    if usage:
        return {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
                "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3,
                                         "total_tokens": 8}, **extra}
    return {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": finish}],
            **extra}


def sse(*events: dict[str, Any] | str, done: bool = True) -> bytes:
    parts = [f"{e}\n\n" if isinstance(e, str) and e.startswith(":")  # an SSE comment
             else f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events]
    if done:
        parts.append("data: [DONE]\n\n")
    return "".join(parts).encode()


def stream_chunks() -> list[dict[str, Any]]:
    return [chunk("Hel"), chunk("lo"), chunk(None, finish="stop"), chunk(usage=True)]


def sse_response(body: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(200, content=body,
                          headers={"content-type": "text/event-stream", **(headers or {})})


def error(status: int, message: str, *, type_: str = "invalid_request_error",
          code: str | None = "some_code", headers: dict[str, str] | None = None,
          ) -> httpx.Response:
    return httpx.Response(status, json={"error": {"message": message, "type": type_,
                                                  "code": code, "param": None}},
                          headers={"x-request-id": f"req-{status}", **(headers or {})})


class _BrokenSyncStream(httpx.SyncByteStream):
    """Yields some bytes, then fails like a connection reset."""

    def __init__(self, head: bytes) -> None:
        self.head = head

    def __iter__(self) -> Iterator[bytes]:
        yield self.head
        raise httpx.ReadError("connection reset mid-stream")


class _BrokenAsyncStream(httpx.AsyncByteStream):
    def __init__(self, head: bytes) -> None:
        self.head = head

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.head
        raise httpx.ReadError("connection reset mid-stream")


def broken_stream(head: bytes, *, asynchronous: bool) -> httpx.Response:
    stream: httpx.SyncByteStream | httpx.AsyncByteStream = (
        _BrokenAsyncStream(head) if asynchronous else _BrokenSyncStream(head))
    return httpx.Response(200, stream=stream, headers={"content-type": "text/event-stream"})


class ScriptedServer:
    """Answers requests from a script; the last item repeats. Records requests and bodies."""

    def __init__(self, *script: Script) -> None:
        self.script = list(script)
        self.requests: list[httpx.Request] = []

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        item = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if isinstance(item, Exception):
            raise item
        if callable(item) and not isinstance(item, httpx.Response):
            return item(request)
        return item

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def bodies(self) -> list[Any]:
        return [json.loads(r.content) if r.content else None for r in self.requests]


class FakeTime:
    """A controlled clock; `sleep` records the wait and advances the clock."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    async def async_sleep(self, seconds: float) -> None:
        self.sleep(seconds)


class WindowLimiter:
    """A fake gateway limiter on the fake clock: `limit` requests per fixed `window` seconds.

    Answers like the real one: x-ratelimit-* headers on every response, 429 with Retry-After
    past the limit. Counts what it refused, which the pacing test requires to be zero.
    """

    def __init__(self, fake_time: FakeTime, limit: int, window: float) -> None:
        self.time = fake_time
        self.limit = limit
        self.window = window
        self.window_start: float | None = None
        self.used = 0
        self.refused = 0
        self.sent_at: list[float] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        now = self.time.now
        if self.window_start is None or now >= self.window_start + self.window:
            self.window_start, self.used = now, 0
        reset = self.window_start + self.window - now
        if self.used >= self.limit:
            self.refused += 1
            return error(429, "rate limited", type_="rate_limit_error",
                         headers={"retry-after": str(reset), **self._headers(0, reset)})
        self.used += 1
        self.sent_at.append(now)
        return httpx.Response(200, json=completion(),
                              headers=self._headers(self.limit - self.used, reset))

    def _headers(self, remaining: int, reset: float) -> dict[str, str]:
        return {"x-ratelimit-limit-requests": str(self.limit),
                "x-ratelimit-remaining-requests": str(remaining),
                "x-ratelimit-reset-requests": f"{reset}s"}
