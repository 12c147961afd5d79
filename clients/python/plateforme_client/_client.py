"""`Client`: the synchronous shell over `BaseClient` (httpx.Client, time.sleep).

It only sends, sleeps and loops; every decision is `BaseClient`'s. `AsyncClient` in
`_async_client.py` mirrors it line for line, and a test holds their public methods equal.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Mapping, Sequence
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
from ._streaming import Stream, SyncOpened

__all__ = ["Client"]

T = TypeVar("T")
_Self = TypeVar("_Self", bound="Client")
Messages = Sequence["ChatMessage | Mapping[str, Any]"]


class Client(BaseClient):
    """A Plateforme client. One per process or thread pool: it keeps connections alive.

    `api_key` and `base_url` default to ``PLATEFORME_API_KEY`` and ``PLATEFORME_URL`` (then
    ``http://127.0.0.1:8000``). `timeout` is a float (every phase) or an `httpx.Timeout`.
    `max_retries` retries connection errors, timeouts, 429, 502, 503 and 504. `pace=True` waits
    before a request the last rate-limit headers say would be refused. `transport` is any
    httpx transport (tests use `httpx.MockTransport`); `clock` and `sleep` replace
    `time.monotonic` and `time.sleep` (tests).
    """

    def __init__(
        self,
        api_key: str | None = None,
        base_url: str | None = None,
        *,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        pace: bool = False,
        transport: httpx.BaseTransport | None = None,
        clock: Clock | None = None,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        super().__init__(api_key, base_url, timeout=timeout, max_retries=max_retries,
                         pace=pace, clock=clock)
        self._sleep = sleep or time.sleep
        self._http = httpx.Client(base_url=self.base_url, headers=self._default_headers(),
                                  timeout=self.timeout, transport=transport)

    # -- public API -------------------------------------------------------------------------

    def chat(self, model: str, messages: Messages, *, temperature: float | None = None,
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
        return self._retrying(lambda: self._parse_sent(spec, ChatCompletion))

    def chat_stream(self, model: str, messages: Messages, *, temperature: float | None = None,
                    top_p: float | None = None, max_tokens: int | None = None,
                    stop: str | list[str] | None = None, random_seed: int | None = None,
                    seed: int | None = None, safe_prompt: bool | None = None,
                    response_format: dict[str, Any] | None = None,
                    tools: list[dict[str, Any]] | None = None,
                    tool_choice: str | dict[str, Any] | None = None, **extra: Any) -> Stream:
        """A streamed chat completion: iterate the returned `Stream` for chunks."""
        spec = self._chat_spec(model, messages, stream=True, extra=extra, params={
            "temperature": temperature, "top_p": top_p, "max_tokens": max_tokens, "stop": stop,
            "random_seed": random_seed, "seed": seed, "safe_prompt": safe_prompt,
            "response_format": response_format, "tools": tools, "tool_choice": tool_choice})
        return Stream(lambda: self._open_stream(spec))

    def list_models(self) -> ModelList:
        """The models this key may use (canonical ids; aliases in `Model.aliases`)."""
        spec = self._models_spec()
        return self._retrying(lambda: self._parse_sent(spec, ModelList))

    def moderate(self, input: str | list[str],
                 model: str | None = None) -> ModerationResponse:
        """Classify text with the gateway's moderation endpoint (OpenAI's shape)."""
        spec = self._moderation_spec(input, model)
        return self._retrying(lambda: self._parse_sent(spec, ModerationResponse))

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self: _Self) -> _Self:  # noqa: PYI019
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- I/O --------------------------------------------------------------------------------

    def _retrying(self, attempt: Callable[[], T]) -> T:
        """The one retry loop: the same attempt again after the base's delay, or raise."""
        retries = 0
        while True:
            try:
                return attempt()
            except PlateformeError as error:
                delay = self._retry_delay(error, retries)
                if delay is None:
                    raise
            self._sleep(delay)
            retries += 1

    def _send(self, spec: RequestSpec, *, stream: bool = False) -> httpx.Response:
        """One attempt: pace, send, raise on an error status. A stream's body is left unread."""
        while (delay := self._pace_delay(spec)) > 0:
            self._sleep(delay)
        headers: httpx.Headers | None = None
        try:
            request = self._http.build_request(spec.method, spec.path, json=spec.json)
            with translate_transport_errors():
                response = self._http.send(request, stream=stream)
            headers = response.headers
        finally:
            self._pace_done(spec, headers)
        if response.is_success:
            return response
        try:
            with translate_transport_errors():
                response.read()
        finally:
            response.close()
        raise self._status_error(response)

    def _parse_sent(self, spec: RequestSpec, cls: type[R]) -> R:
        return self._parse(self._send(spec), cls)

    def _open_stream(self, spec: RequestSpec) -> SyncOpened:
        def attempt() -> SyncOpened:
            response = self._send(spec, stream=True)
            chunks = self._iter_chunks(response)
            try:
                first = next(chunks, None)
            except BaseException:
                chunks.close()
                response.close()
                raise
            return response, chunks, first

        return self._retrying(attempt)

    def _iter_chunks(
            self, response: httpx.Response) -> Generator[ChatCompletionChunk, None, None]:
        decoder = SSEDecoder()
        try:
            with translate_transport_errors():
                for line in response.iter_lines():
                    data = decoder.feed(line)
                    if data is None:
                        continue
                    chunk = self._parse_event(data, response)
                    if chunk is None:
                        return
                    yield chunk
            self._end_of_stream(decoder)
        finally:
            response.close()
