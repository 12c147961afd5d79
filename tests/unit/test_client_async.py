"""`AsyncClient` over `httpx.MockTransport`: the same behaviours as the sync client, awaited."""

from __future__ import annotations

import json

import httpx
import pytest
from plateforme_client import (
    APIConnectionError,
    APIError,
    AsyncClient,
    AsyncStream,
    AuthenticationError,
    ChatCompletion,
    ChatMessage,
    RateLimitError,
    ServerError,
    __version__,
)

from tests.unit.test_client_fakes import (
    BASE,
    KEY,
    FakeTime,
    ScriptedServer,
    broken_stream,
    chunk,
    completion,
    error,
    sse,
    sse_response,
    stream_chunks,
)

USER = [{"role": "user", "content": "Hi"}]


def make_client(server: ScriptedServer, fake: FakeTime | None = None,
                **kwargs: object) -> AsyncClient:
    fake = fake or FakeTime()
    return AsyncClient(KEY, BASE, transport=server.transport(), clock=fake.clock,
                       sleep=fake.async_sleep, **kwargs)  # type: ignore[arg-type]


async def test_chat_parses_completion_with_headers() -> None:
    server = ScriptedServer(httpx.Response(200, json=completion("Salut", extra_field=1),
                                           headers={"x-request-id": "req-a"}))
    async with make_client(server) as client:
        result = await client.chat("small", [ChatMessage(role="user", content="Hi")],
                                   seed=3, tools=[{"type": "function"}], tool_choice="auto")
    assert isinstance(result, ChatCompletion)
    assert result.text == "Salut" and result.request_id == "req-a"
    assert result.model_extra == {"extra_field": 1}
    assert json.loads(server.requests[0].content) == {
        "model": "small", "messages": USER, "seed": 3, "tools": [{"type": "function"}],
        "tool_choice": "auto"}
    assert server.requests[0].headers["user-agent"] == f"plateforme-client/{__version__}"


async def test_list_models_and_moderate() -> None:
    server = ScriptedServer(
        httpx.Response(200, json={"data": [{"id": "mistral-small", "aliases": ["small"]}]}),
        httpx.Response(200, json={"results": [{"flagged": False}]}))
    async with make_client(server) as client:
        models = await client.list_models()
        moderation = await client.moderate("hello")
    assert models.ids == ["mistral-small"] and models[0].aliases == ["small"]
    assert moderation.results[0].flagged is False
    assert server.bodies()[1] == {"input": "hello"}


async def test_typed_errors_with_request_id() -> None:
    server = ScriptedServer(error(401, "bad key", type_="authentication_error"))
    async with make_client(server) as client:
        with pytest.raises(AuthenticationError) as caught:
            await client.chat("small", USER)
    assert caught.value.request_id == "req-401" and caught.value.type == "authentication_error"


async def test_retries_twice_then_succeeds_honouring_retry_after() -> None:
    server = ScriptedServer(httpx.ConnectError("refused"),
                            error(429, "wait", headers={"retry-after": "2"}),
                            httpx.Response(200, json=completion()))
    fake = FakeTime()
    async with make_client(server, fake) as client:
        await client.chat("small", USER, max_tokens=3)
    assert len(server.requests) == 3 and len(fake.sleeps) == 2
    assert 0 <= fake.sleeps[0] <= 0.5 and fake.sleeps[1] == 2.0
    assert server.bodies()[0] == server.bodies()[2]


async def test_gives_up_with_server_error_after_retries() -> None:
    server = ScriptedServer(error(504, "upstream timeout"))
    async with make_client(server) as client:
        with pytest.raises(ServerError) as caught:
            await client.list_models()
    assert caught.value.status == 504 and len(server.requests) == 3


async def test_chat_stream_is_an_async_iterator_not_a_coroutine() -> None:
    server = ScriptedServer(sse_response(sse(*stream_chunks()), {"x-request-id": "req-s"}))
    async with make_client(server) as client:
        stream = client.chat_stream("small", USER)
        assert isinstance(stream, AsyncStream)
        texts = [c.choices[0].delta.content async for c in stream]
    assert texts == ["Hel", "lo", None]
    assert stream.usage is not None and stream.usage.total_tokens == 8
    assert stream.request_id == "req-s"
    assert server.bodies()[0]["stream_options"] == {"include_usage": True}


async def test_stream_retries_before_first_chunk_only() -> None:
    server = ScriptedServer(error(503, "no replica"), sse_response(sse(*stream_chunks())))
    fake = FakeTime()
    async with make_client(server, fake) as client, client.chat_stream("small", USER) as stream:
        chunks = [c async for c in stream]
    assert len(chunks) == 3 and len(server.requests) == 2 and len(fake.sleeps) == 1


async def test_no_retry_after_first_chunk() -> None:
    server = ScriptedServer(broken_stream(sse(chunk("Hel"), done=False), asynchronous=True),
                            sse_response(sse(*stream_chunks())))
    fake = FakeTime()
    seen = []
    async with make_client(server, fake) as client:
        with pytest.raises(APIConnectionError):
            async for c in client.chat_stream("small", USER):
                seen.append(c.choices[0].delta.content)
    assert seen == ["Hel"] and len(server.requests) == 1 and fake.sleeps == []


async def test_stream_error_status_and_error_event() -> None:
    event = {"error": {"message": "boom", "type": "upstream_error"}}
    server = ScriptedServer(error(429, "limited", headers={"retry-after": "999"}),
                            sse_response(sse(chunk("a"), event)))
    async with make_client(server) as client:
        with pytest.raises(RateLimitError):
            async for _ in client.chat_stream("small", USER):
                pass
        with pytest.raises(APIError, match="boom"):
            async for _ in client.chat_stream("small", USER):
                pass


async def test_stream_closed_early() -> None:
    server = ScriptedServer(sse_response(sse(*stream_chunks())))
    async with make_client(server) as client:
        stream = client.chat_stream("small", USER)
        first = await stream.__anext__()
        await stream.aclose()
        assert [c async for c in stream] == []
    assert first.choices[0].delta.content == "Hel"
