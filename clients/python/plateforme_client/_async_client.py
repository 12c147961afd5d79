"""`AsyncClient`: the asyncio shell over `BaseClient` (httpx.AsyncClient, asyncio.sleep).

A line-for-line mirror of `Client` in `_client.py` with ``await`` added; every decision is
`BaseClient`'s, and a test holds the two classes' public methods equal.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import httpx

from ._base import (
    DEFAULT_MAX_RETRIES,
    DEFAULT_TIMEOUT,
    BaseClient,
    Clock,
    R,
    RequestSpec,
    translate_transport_errors,
)
from ._exceptions import PlateformeError
from ._models import ChatCompletion, ChatCompletionChunk, ChatMessage, ModelList, ModerationResponse
from ._sse import SSEDecoder
from ._streaming import AsyncOpened, AsyncStream

__all__ = ["AsyncClient"]

T = TypeVar("T")
_Self = TypeVar("_Self", bound="AsyncClient")
Messages = Sequence["ChatMessage | Mapping[str, Any]"]


class AsyncClient(BaseClient):
    """The asyncio Plateforme client: `Client`'s methods, awaited (and `aclose`).

    `api_key` and `base_url` default to ``PLATEFORME_API_KEY`` and ``PLATEFORME_URL`` (then
    ``http://127.0.0.1:8000``). `timeout` is a float (every phase) or an `httpx.Timeout`.
    `max_retries` retries connection errors, timeouts, 429, 502, 503 and 504. `pace=True` waits
    before a request the last rate-limit headers say would be refused. `transport` is any
    httpx transport (tests use `httpx.MockTransport`); `clock` and `sleep` replace
    `time.monotonic` and `asyncio.sleep` (tests).
    """

    def __init__(
        self,
        api_key: str | None = None,
        base_url: str | None = None,
        *,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        pace: bool = False,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Clock | None = None,
        sleep: Callable[[float], Awaitable[None]] | None = None,
    ) -> None:
        super().__init__(api_key, base_url, timeout=timeout, max_retries=max_retries,
                         pace=pace, clock=clock)
        self._sleep = sleep or asyncio.sleep
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=self._default_headers(),
                                  timeout=self.timeout, transport=transport)

    # -- public API -------------------------------------------------------------------------

    async def chat(self, model: str, messages: Messages, *, temperature: float | None = None,
             top_p: float | None = None, max_tokens: int | None = None,
             stop: str | list[str] | None = None, random_seed: int | None = None,
             seed: int | None = None, safe_prompt: bool | None = None,
             response_format: dict[str, Any] | None = None,
             tools: list[dict[str, Any]] | None = None,
             tool_choice: str | dict[str, Any] | None = None, **extra: Any) -> ChatCompletion:
        """A chat completion. `extra` keys are sent as-is (fields this client doesn't know)."""
        spec = self._chat_spec(model, messages, stream=False, extra=extra, params={
            "temperature": temperature, "top_p": top_p, "max_tokens": max_tokens, "stop": stop,
            "random_seed": random_seed, "seed": seed, "safe_prompt": safe_prompt,
            "response_format": response_format, "tools": tools, "tool_choice": tool_choice})
        return await self._retrying(lambda: self._parse_sent(spec, ChatCompletion))

    def chat_stream(self, model: str, messages: Messages, *, temperature: float | None = None,
                    top_p: float | None = None, max_tokens: int | None = None,
                    stop: str | list[str] | None = None, random_seed: int | None = None,
                    seed: int | None = None, safe_prompt: bool | None = None,
                    response_format: dict[str, Any] | None = None,
                    tools: list[dict[str, Any]] | None = None,
                    tool_choice: str | dict[str, Any] | None = None, **extra: Any) -> AsyncStream:
        """A streamed chat completion: ``async for`` over the returned `AsyncStream` (no await)."""
        spec = self._chat_spec(model, messages, stream=True, extra=extra, params={
            "temperature": temperature, "top_p": top_p, "max_tokens": max_tokens, "stop": stop,
            "random_seed": random_seed, "seed": seed, "safe_prompt": safe_prompt,
            "response_format": response_format, "tools": tools, "tool_choice": tool_choice})
        return AsyncStream(lambda: self._open_stream(spec))

    async def list_models(self) -> ModelList:
        """The models this key may use (canonical ids; aliases in `Model.aliases`)."""
        spec = self._models_spec()
        return await self._retrying(lambda: self._parse_sent(spec, ModelList))

    async def moderate(self, input: str | list[str],
                       model: str | None = None) -> ModerationResponse:
        """Classify text with the gateway's moderation endpoint (OpenAI's shape)."""
        spec = self._moderation_spec(input, model)
        return await self._retrying(lambda: self._parse_sent(spec, ModerationResponse))

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def __aenter__(self: _Self) -> _Self:  # noqa: PYI019
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                  tb: TracebackType | None) -> None:
        await self.aclose()

    # -- I/O --------------------------------------------------------------------------------

    async def _retrying(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """The one retry loop: the same attempt again after the base's delay, or raise."""
        retries = 0
        while True:
            try:
                return await attempt()
            except PlateformeError as error:
                delay = self._retry_delay(error, retries)
                if delay is None:
                    raise
            await self._sleep(delay)
            retries += 1

    async def _send(self, spec: RequestSpec, *, stream: bool = False) -> httpx.Response:
        """One attempt: pace, send, raise on an error status. A stream's body is left unread."""
        while (delay := self._pace_delay(spec)) > 0:
            await self._sleep(delay)
        headers: httpx.Headers | None = None
        try:
            request = self._http.build_request(spec.method, spec.path, json=spec.json)
            with translate_transport_errors():
                response = await self._http.send(request, stream=stream)
            headers = response.headers
        finally:
            self._pace_done(spec, headers)
        if response.is_success:
            return response
        try:
            with translate_transport_errors():
                await response.aread()
        finally:
            await response.aclose()
        raise self._status_error(response)

    async def _parse_sent(self, spec: RequestSpec, cls: type[R]) -> R:
        return self._parse(await self._send(spec), cls)

    async def _open_stream(self, spec: RequestSpec) -> AsyncOpened:
        async def attempt() -> AsyncOpened:
            response = await self._send(spec, stream=True)
            chunks = self._iter_chunks(response)
            try:
                first = await anext(chunks, None)
            except BaseException:
                await chunks.aclose()
                await response.aclose()
                raise
            return response, chunks, first

        return await self._retrying(attempt)

    async def _iter_chunks(
            self, response: httpx.Response) -> AsyncGenerator[ChatCompletionChunk, None]:
        decoder = SSEDecoder()
        try:
            with translate_transport_errors():
                async for line in response.aiter_lines():
                    data = decoder.feed(line)
                    if data is None:
                        continue
                    chunk = self._parse_event(data, response)
                    if chunk is None:
                        return
                    yield chunk
            self._end_of_stream(decoder)
        finally:
            await response.aclose()
