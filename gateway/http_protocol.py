"""uvicorn's httptools protocol with a deadline on the request head (slow-loris on headers).

uvicorn arms no timer while a request head is arriving: a client that sends
`GET / HTTP/1.1\\r\\n` and then one byte a minute holds a connection (and its buffers) forever,
and no ASGI middleware can help because the app only sees a request once its head is
complete. This subclass gives every head `head_timeout` seconds from its first byte (or from
the connection's opening) and closes the connection when it expires; the body is then bounded
by `gateway.middleware` (size and `body_timeout_seconds`).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

HEAD_TIMEOUT_SECONDS = 10.0


class BoundedHeadProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, head_timeout: float = HEAD_TIMEOUT_SECONDS,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timeout = head_timeout
        self._head_timer: asyncio.TimerHandle | None = None

    def _arm(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self._head_timeout, self._head_expired)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_expired(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self.transport.close()  # no request was dispatched: nothing to answer or settle

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()  # the next head on a kept-alive connection gets its own deadline

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)
