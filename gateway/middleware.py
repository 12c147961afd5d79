"""Pure ASGI middleware around every request: request id, body bounds, metric and access log.

The body bounds stop abuse before the handler buffers anything: a declared
`content-length` over the limit is refused at once (413), a chunked body is counted as it
arrives, and the whole body must arrive within `body_timeout` (slow-loris). Handlers put what
they learn (model, replica, tokens) into `scope["state"]["log"]` for the one log line.

`direct` maps (method, path) to an ASGI app called straight from here, past the framework's
router and dependency machinery: the chat hot path (measured by bench/gateway_bench.py). Metric
children are cached per label set: `.labels()` costs a lock and a dict lookup each call.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import (
    BadRequest,
    GatewayError,
    HeadersTooLarge,
    PayloadTooLarge,
    RequestTimeout,
)
from gateway.metrics import Metrics, status_class

access_log = logging.getLogger("plateforme.access")

# uvicorn's httptools parser has no bound of its own on a request head; this one refuses
# oversized heads before any handler runs (a front proxy should bound their arrival time).
MAX_HEADER_BYTES = 64 * 1024
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_ROUTES = {"/v1/chat/completions": "chat", "/v1/models": "models", "/v1/moderations":
           "moderations", "/health": "health", "/ready": "ready", "/metrics": "metrics"}


def _route(path: str) -> str:
    route = _ROUTES.get(path)
    if route is not None:
        return route
    return "admin" if path.startswith("/admin/") else "other"


class RequestContext:
    def __init__(self, app: ASGIApp, *, metrics: Metrics, max_body_bytes: int,
                 body_timeout: float,
                 direct: dict[tuple[str, str], ASGIApp] | None = None) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout
        self.direct = direct or {}
        self._requests: dict[tuple[str, str, str], Any] = {}
        self._durations: dict[tuple[str, bool], Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = None
        length = None
        header_bytes = 0
        for name, value in scope["headers"]:
            header_bytes += len(name) + len(value)
            if name == b"x-request-id":
                candidate = value.decode("latin-1")
                request_id = candidate if _REQUEST_ID.match(candidate) else None
            elif name == b"content-length":
                length = value
        request_id = request_id or os.urandom(12).hex()
        info: dict[str, Any] = {"request_id": request_id, "started": started}
        scope.setdefault("state", {})["log"] = info
        rid_header = (b"x-request-id", request_id.encode())
        status_holder = [0]

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder[0] = message["status"]
                message["headers"] = [*message.get("headers", ()), rid_header]
            await send(message)

        if header_bytes > MAX_HEADER_BYTES:
            await _send_error(send_with_id, HeadersTooLarge(
                f"Request headers over the limit of {MAX_HEADER_BYTES} bytes."))
            self._finish(scope, info, status_holder[0], started)
            return
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                declared = -1
            if declared > self.max_body_bytes or declared < 0:
                error: GatewayError = PayloadTooLarge(
                    f"Request body over the limit of {self.max_body_bytes} bytes.")
                if declared < 0:
                    error = BadRequest("Invalid Content-Length header.",
                                       code="invalid_content_length")
                await _send_error(send_with_id, error)
                self._finish(scope, info, status_holder[0], started)
                return

        received = 0
        body_done = False
        deadline = started + self.body_timeout

        async def bounded_receive() -> Message:
            nonlocal received, body_done
            if body_done:  # later receives wait for a disconnect: no deadline there
                return await receive()
            remaining = deadline - time.perf_counter()
            try:
                message = await asyncio.wait_for(receive(), timeout=max(remaining, 0.001))
            except asyncio.TimeoutError:
                raise RequestTimeout(
                    f"The request body did not arrive within {self.body_timeout:g} s.") from None
            if message["type"] == "http.request":
                body_done = not message.get("more_body", False)
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise PayloadTooLarge(
                        f"Request body over the limit of {self.max_body_bytes} bytes.")
            return message

        app = self.direct.get((scope["method"], scope["path"]), self.app)
        try:
            # Every method that may carry a body (DELETE can: replica deregistration).
            await app(scope, receive if scope["method"] in ("GET", "HEAD", "OPTIONS")
                      else bounded_receive, send_with_id)
        finally:
            self._finish(scope, info, status_holder[0], started)

    def _finish(self, scope: Scope, info: dict[str, Any], status: int, started: float) -> None:
        elapsed = time.perf_counter() - started
        route = _route(scope["path"])
        model = info.get("model", "")
        labels = (route, model, status_class(status or 500))
        counter = self._requests.get(labels)
        if counter is None:
            counter = self._requests[labels] = self.metrics.requests.labels(*labels)
        counter.inc()
        if route == "chat" and model:
            stream = bool(info.get("stream"))
            histogram = self._durations.get((model, stream))
            if histogram is None:
                histogram = self._durations[(model, stream)] = \
                    self.metrics.request_duration.labels(model, str(stream).lower())
            histogram.observe(elapsed)
        if route in ("health", "metrics", "ready"):
            return
        info.pop("started", None)
        access_log.info("request", extra={
            **info, "method": scope["method"], "route": route, "status": status,
            "latency_ms": round(elapsed * 1000, 2)})


async def _send_error(send: Send, error: GatewayError) -> None:
    body = orjson.dumps(error.body())
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode()),
               *((k.encode(), v.encode()) for k, v in error.headers.items())]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
