"""`BaseClient`: everything both clients share that does no I/O.

Configuration (arguments, then ``PLATEFORME_API_KEY`` / ``PLATEFORME_URL``), request bodies,
parsing responses and stream events into models, classifying errors, the retry decision and
the pacing decision all live here, once. `Client` and `AsyncClient` are thin shells that only
send, sleep and loop — so they cannot drift apart (httpx's own layout).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from ._exceptions import (
    APIConnectionError,
    APIError,
    APITimeoutError,
    PlateformeError,
    error_class_for,
)
from ._models import ChatCompletionChunk, ChatMessage, _Response
from ._ratelimit import Pacer, RateLimit
from ._retry import RetryPolicy, parse_retry_after
from ._sse import DONE, SSEDecoder
from ._version import __version__

__all__ = ["DEFAULT_MAX_RETRIES", "DEFAULT_TIMEOUT", "BaseClient", "RequestSpec"]

ENV_API_KEY = "PLATEFORME_API_KEY"
ENV_BASE_URL = "PLATEFORME_URL"
DEFAULT_BASE_URL = "http://127.0.0.1:8000"
# Connect short; read is an inter-chunk bound (a stream may last longer, a silent one may not).
DEFAULT_TIMEOUT = httpx.Timeout(connect=5.0, read=120.0, write=30.0, pool=10.0)
DEFAULT_MAX_RETRIES = 2
USER_AGENT = f"plateforme-client/{__version__}"
_ERROR_TEXT_LIMIT = 500  # characters of a non-JSON error body kept as the message

Clock = Callable[[], float]
R = TypeVar("R", bound=_Response)


@dataclass(frozen=True)
class RequestSpec:
    """One logical call; every retry sends exactly this (no argument can get lost)."""

    method: str
    path: str
    json: Any = None
    tokens: int = 1  # lower bound of tokens the gateway will reserve, for pacing


def normalize_base_url(url: str) -> str:
    """The server root: strip whitespace, trailing slashes and a trailing ``/v1``."""
    text = url.strip().rstrip("/")
    if text.endswith("/v1"):
        text = text[: -len("/v1")].rstrip("/")
    parsed = httpx.URL(text)
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise PlateformeError(f"base_url must be an http(s) URL, got {url!r}")
    return text


def _to_timeout(timeout: float | httpx.Timeout | None) -> httpx.Timeout:
    if timeout is None:
        return DEFAULT_TIMEOUT  # never infinite
    if isinstance(timeout, httpx.Timeout):
        return timeout
    return httpx.Timeout(float(timeout))


@contextmanager
def translate_transport_errors() -> Iterator[None]:
    """httpx transport failures → `APITimeoutError` / `APIConnectionError`."""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise APITimeoutError(f"timed out: {type(exc).__name__}: {exc}") from exc
    except httpx.TransportError as exc:
        raise APIConnectionError(f"connection failed: {type(exc).__name__}: {exc}") from exc


class BaseClient:
    """Configuration and all I/O-free logic of `Client` and `AsyncClient`."""

    def __init__(
        self,
        api_key: str | None,
        base_url: str | None,
        *,
        timeout: float | httpx.Timeout | None,
        max_retries: int,
        pace: bool,
        clock: Clock | None,
    ) -> None:
        api_key = api_key if api_key is not None else os.environ.get(ENV_API_KEY)
        if not api_key:
            raise PlateformeError(f"no API key: pass api_key= or set {ENV_API_KEY}")
        if max_retries < 0:
            raise PlateformeError(f"max_retries must be >= 0, got {max_retries}")
        self._api_key = api_key
        self.base_url = normalize_base_url(base_url or os.environ.get(ENV_BASE_URL)
                                           or DEFAULT_BASE_URL)
        self.timeout = _to_timeout(timeout)
        self.max_retries = max_retries
        self._retry = RetryPolicy(max_retries=max_retries)
        self._pacer: Pacer | None = Pacer() if pace else None
        self._clock: Clock = clock or time.monotonic

    def __repr__(self) -> str:  # never the key
        return f"{type(self).__name__}(base_url={self.base_url!r})"

    def _default_headers(self) -> dict[str, str]:
        return {
            "Authorization": f"Bearer {self._api_key}",
            "User-Agent": USER_AGENT,
            "Accept": "application/json",
        }

    # -- requests ---------------------------------------------------------------------------

    def _chat_spec(self, model: str, messages: Sequence[ChatMessage | Mapping[str, Any]], *,
                   stream: bool, params: Mapping[str, Any],
                   extra: Mapping[str, Any]) -> RequestSpec:
        if "stream" in extra:
            raise TypeError("pass no `stream`: use chat() or chat_stream()")
        body: dict[str, Any] = {"model": model, "messages": [_message(m) for m in messages]}
        body.update({k: v for k, v in params.items() if v is not None})
        body.update(extra)
        if stream:
            body["stream"] = True
            options = dict(body.get("stream_options") or {})
            options["include_usage"] = True
            body["stream_options"] = options
        max_tokens = body.get("max_tokens")
        tokens = max_tokens if isinstance(max_tokens, int) and max_tokens > 0 else 1
        return RequestSpec("POST", "/v1/chat/completions", body, tokens)

    def _models_spec(self) -> RequestSpec:
        return RequestSpec("GET", "/v1/models")

    def _moderation_spec(self, input: str | list[str], model: str | None) -> RequestSpec:
        body: dict[str, Any] = {"input": input}
        if model is not None:
            body["model"] = model
        return RequestSpec("POST", "/v1/moderations", body)

    # -- responses --------------------------------------------------------------------------

    def _parse(self, response: httpx.Response, cls: type[R]) -> R:
        """A read, successful response → `cls`, headers attached; bad JSON is an `APIError`."""
        try:
            payload = response.json()
            if isinstance(payload, list):  # a bare list of models: tolerate
                payload = {"data": payload}
            result = cls.model_validate(payload)
        except (ValueError, ValidationError) as exc:
            raise self._unexpected(response, f"unexpected response body: {exc}") from exc
        result._set_headers(response.headers)
        return result

    def _status_error(self, response: httpx.Response) -> APIError:
        """An error response (body read) → the matching `APIError` subclass."""
        body: Any
        try:
            body = response.json()
        except ValueError:
            body = response.text
        message, code, type_, param = _envelope(body)
        if not message:
            text = body if isinstance(body, str) else ""
            message = text.strip()[:_ERROR_TEXT_LIMIT] or response.reason_phrase or "error"
        return error_class_for(response.status_code)(
            message, status=response.status_code, request_id=response.headers.get("x-request-id"),
            code=code, type=type_, param=param, body=body,
            rate_limit=RateLimit.from_headers(response.headers),
            retry_after=parse_retry_after(response.headers.get("retry-after")),
        )

    def _unexpected(self, response: httpx.Response, message: str) -> APIError:
        return APIError(message, status=response.status_code,
                        request_id=response.headers.get("x-request-id"))

    def _parse_event(self, data: str, response: httpx.Response) -> ChatCompletionChunk | None:
        """One SSE data payload → a chunk; None at ``[DONE]``; an error event raises."""
        if data.strip() == DONE:
            return None
        try:
            payload = json.loads(data)
        except ValueError as exc:
            raise self._unexpected(response, f"bad stream event: {data[:200]!r}") from exc
        if isinstance(payload, dict) and "error" in payload:
            message, code, type_, param = _envelope(payload)
            raise APIError(message or "error in stream", status=response.status_code,
                           request_id=response.headers.get("x-request-id"), code=code,
                           type=type_, param=param, body=payload)
        try:
            return ChatCompletionChunk.model_validate(payload)
        except ValidationError as exc:
            raise self._unexpected(response, f"bad stream event: {exc}") from exc

    def _end_of_stream(self, decoder: SSEDecoder) -> None:
        """The body ended without a ``[DONE]`` event: the answer is cut off, say so."""
        tail = decoder.flush()
        if tail is None or tail.strip() != DONE:
            raise APIConnectionError("the stream ended before [DONE]: the answer is incomplete")

    # -- decisions --------------------------------------------------------------------------

    def _retry_delay(self, error: PlateformeError, attempt: int) -> float | None:
        return self._retry.delay(error, attempt)

    def _pace_delay(self, spec: RequestSpec) -> float:
        """Seconds to sleep before asking again; 0.0 means a slot is reserved: send now."""
        if self._pacer is None:
            return 0.0
        return self._pacer.reserve(self._clock(), spec.tokens)

    def _pace_done(self, spec: RequestSpec, headers: httpx.Headers | None) -> None:
        if self._pacer is not None:
            rate_limit = RateLimit.from_headers(headers) if headers is not None else None
            self._pacer.complete(rate_limit, self._clock(), spec.tokens)


def _message(message: ChatMessage | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(message, BaseModel):
        return message.model_dump(exclude_none=True)
    return dict(message)


def _envelope(body: Any) -> tuple[str | None, str | None, str | None, str | None]:
    """(message, code, type, param) from OpenAI's envelope, or FastAPI's ``{"detail": ...}``."""
    if not isinstance(body, dict):
        return None, None, None, None
    error = body.get("error", body)
    if isinstance(error, str):
        return error, None, None, None
    if not isinstance(error, dict):
        return None, None, None, None
    message = error.get("message", error.get("detail"))
    if message is not None and not isinstance(message, str):
        message = json.dumps(message)
    code = error.get("code")
    return (message, None if code is None else str(code),
            _str_or_none(error.get("type")), _str_or_none(error.get("param")))


def _str_or_none(value: Any) -> str | None:
    return None if value is None else str(value)
