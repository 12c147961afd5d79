"""The synchronous `Client` over `httpx.MockTransport`: requests, parsing, errors, retries."""

from __future__ import annotations

import email.utils
import inspect
import json
import time

import httpx
import pytest
from plateforme_client import (
    APIConnectionError,
    APIError,
    APITimeoutError,
    AsyncClient,
    AuthenticationError,
    BadRequestError,
    ChatCompletion,
    ChatMessage,
    Client,
    NotFoundError,
    PermissionDeniedError,
    PlateformeError,
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


def make_client(server: ScriptedServer, fake: FakeTime | None = None, **kwargs: object) -> Client:
    fake = fake or FakeTime()
    return Client(KEY, BASE, transport=server.transport(), clock=fake.clock, sleep=fake.sleep,
                  **kwargs)  # type: ignore[arg-type]


# -- requests and parsing ----------------------------------------------------------------------


def test_chat_sends_the_openai_request_and_parses_the_completion() -> None:
    server = ScriptedServer(httpx.Response(200, json=completion("Bonjour"), headers={
        "x-request-id": "req-42", "x-ratelimit-remaining-requests": "59",
        "x-ratelimit-limit-requests": "60", "x-ratelimit-reset-requests": "1s"}))
    with make_client(server) as client:
        result = client.chat("small", [ChatMessage(role="user", content="Hi"),
                                       {"role": "assistant", "content": "Yo"}],
                             temperature=0.2, max_tokens=10, safe_prompt=True, random_seed=7,
                             stop=["\n"], response_format={"type": "text"}, top_k=5)
    request = server.requests[0]
    assert request.method == "POST"
    assert request.url == f"{BASE}/v1/chat/completions"
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.headers["user-agent"] == f"plateforme-client/{__version__}"
    assert json.loads(request.content) == {
        "model": "small",
        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}],
        "temperature": 0.2, "max_tokens": 10, "safe_prompt": True, "random_seed": 7,
        "stop": ["\n"], "response_format": {"type": "text"}, "top_k": 5,
    }
    assert isinstance(result, ChatCompletion)
    assert result.text == "Bonjour"
    assert result.choices[0].finish_reason == "stop"
    assert result.usage is not None and result.usage.total_tokens == 7
    assert result.request_id == "req-42"
    assert result.rate_limit is not None
    assert (result.rate_limit.remaining_requests, result.rate_limit.limit_requests,
            result.rate_limit.reset_requests) == (59, 60, 1.0)


def test_unknown_fields_from_a_newer_gateway_are_kept_not_rejected() -> None:
    body = completion(system_fingerprint="fp", brand_new={"x": 1})
    body["choices"][0]["logprobs"] = {"content": []}
    body["choices"][0]["message"]["reasoning"] = "because"
    server = ScriptedServer(httpx.Response(200, json=body))
    with make_client(server) as client:
        result = client.chat("small", USER)
    assert result.model_extra == {"system_fingerprint": "fp", "brand_new": {"x": 1}}
    assert result.choices[0].message.model_extra == {"reasoning": "because"}


def test_chat_refuses_stream_argument() -> None:
    server = ScriptedServer(httpx.Response(200, json=completion()))
    with make_client(server) as client, pytest.raises(TypeError, match="chat_stream"):
        client.chat("small", USER, stream=True)
    assert server.requests == []


def test_list_models_and_moderate() -> None:
    models = {"object": "list", "data": [
        {"id": "mistral-small", "object": "model", "owned_by": "plateforme",
         "aliases": ["small"], "context_window": 32768},
        {"id": "mistral-tiny"}]}
    moderation = {"id": "modr-1", "model": "m", "results": [
        {"flagged": True, "categories": {"violence": True}, "category_scores": {"violence": 0.9}}]}
    server = ScriptedServer(httpx.Response(200, json=models, headers={"x-request-id": "r1"}),
                            httpx.Response(200, json=moderation))
    with make_client(server) as client:
        listed = client.list_models()
        moderated = client.moderate(["a", "b"], model="guard")
    assert listed.ids == ["mistral-small", "mistral-tiny"]
    assert [m.id for m in listed] == listed.ids and len(listed) == 2
    assert listed[0].aliases == ["small"] and listed[1].aliases == []
    assert listed.request_id == "r1"
    assert server.requests[0].method == "GET"
    assert server.requests[0].url == f"{BASE}/v1/models"
    assert server.requests[1].url == f"{BASE}/v1/moderations"
    assert server.bodies()[1] == {"input": ["a", "b"], "model": "guard"}
    assert moderated.results[0].flagged and moderated.results[0].categories["violence"]


# -- configuration ----------------------------------------------------------------------------


def test_env_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLATEFORME_API_KEY", "sk-env")
    monkeypatch.setenv("PLATEFORME_URL", "https://api.example.test/v1/")
    server = ScriptedServer(httpx.Response(200, json={"data": []}))
    with Client(transport=server.transport()) as client:
        assert client.base_url == "https://api.example.test"
        client.list_models()
    assert server.requests[0].headers["authorization"] == "Bearer sk-env"
    assert server.requests[0].url == "https://api.example.test/v1/models"


def test_default_url_and_missing_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PLATEFORME_URL", raising=False)
    monkeypatch.delenv("PLATEFORME_API_KEY", raising=False)
    with pytest.raises(PlateformeError, match="PLATEFORME_API_KEY"):
        Client()
    with Client("k") as client:
        assert client.base_url == "http://127.0.0.1:8000"
        assert client.timeout == httpx.Timeout(connect=5.0, read=120.0, write=30.0, pool=10.0)


@pytest.mark.parametrize("given, expected", [
    ("http://h:8000", "http://h:8000"),
    ("http://h:8000/", "http://h:8000"),
    ("http://h:8000/v1", "http://h:8000"),
    ("http://h:8000/v1/", "http://h:8000"),
    (" https://h/prefix/v1 ", "https://h/prefix"),
])
def test_base_url_normalisation(given: str, expected: str) -> None:
    server = ScriptedServer(httpx.Response(200, json={"data": []}))
    with Client(KEY, given, transport=server.transport()) as client:
        assert client.base_url == expected
        client.list_models()
    assert server.requests[0].url == f"{expected}/v1/models"


@pytest.mark.parametrize("bad", ["localhost:8000", "ftp://h", "http://"])
def test_bad_base_url_is_a_clear_error(bad: str) -> None:
    with pytest.raises(PlateformeError, match="base_url"):
        Client(KEY, bad)


def test_timeout_accepts_float_or_httpx_timeout() -> None:
    with Client(KEY, BASE, timeout=3.0) as client:
        assert client.timeout == httpx.Timeout(3.0)
    custom = httpx.Timeout(10.0, connect=1.0)
    with Client(KEY, BASE, timeout=custom) as client:
        assert client.timeout is custom


# -- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("status, cls", [
    (400, BadRequestError), (401, AuthenticationError), (403, PermissionDeniedError),
    (404, NotFoundError), (413, BadRequestError), (422, BadRequestError),
    (429, RateLimitError), (500, ServerError), (502, ServerError), (503, ServerError),
    (504, ServerError), (409, APIError),
])
def test_each_error_class_from_the_envelope(status: int, cls: type[APIError]) -> None:
    server = ScriptedServer(error(status, f"nope {status}", code="the_code",
                                  headers={"retry-after": "120"}))
    with make_client(server, max_retries=0) as client, pytest.raises(cls) as caught:
        client.chat("small", USER)
    exc = caught.value
    assert type(exc) is cls
    assert (exc.status, exc.message, exc.code, exc.request_id) == (
        status, f"nope {status}", "the_code", f"req-{status}")
    assert exc.type == "invalid_request_error"
    assert exc.body["error"]["message"] == f"nope {status}"
    assert f"req-{status}" in str(exc)


def test_rate_limit_error_carries_limits_and_retry_after() -> None:
    server = ScriptedServer(error(429, "slow down", headers={
        "retry-after": "3600", "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "6m0s",
        "x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "0.5s"}))
    fake = FakeTime()
    with make_client(server, fake) as client, pytest.raises(RateLimitError) as caught:
        client.chat("small", USER)
    exc = caught.value
    assert exc.retry_after == 3600.0
    assert exc.rate_limit is not None
    assert exc.rate_limit.limit_requests == 60 and exc.rate_limit.remaining_requests == 0
    assert exc.rate_limit.reset_requests == 360.0 and exc.rate_limit.reset_tokens == 0.5
    # Longer than a call should block (a spent quota): raised at once, not retried.
    assert len(server.requests) == 1 and fake.sleeps == []


@pytest.mark.parametrize("body, expected", [
    (b"<html>Bad Gateway</html>", "<html>Bad Gateway</html>"),
    (b"", "Bad Gateway"),
    (b'{"detail": "Not here"}', "Not here"),
    (b'{"error": "plain string"}', "plain string"),
])
def test_non_envelope_error_bodies_are_tolerated(body: bytes, expected: str) -> None:
    server = ScriptedServer(httpx.Response(502, content=body))
    with make_client(server, max_retries=0) as client, pytest.raises(ServerError) as caught:
        client.list_models()
    assert caught.value.message == expected and caught.value.status == 502


def test_garbage_success_body_is_an_api_error() -> None:
    server = ScriptedServer(httpx.Response(200, content=b"not json"))
    with make_client(server) as client, pytest.raises(APIError, match="unexpected"):
        client.chat("small", USER)


# -- retries ----------------------------------------------------------------------------------


def test_retries_connection_errors_then_succeeds_with_the_same_request() -> None:
    server = ScriptedServer(httpx.ConnectError("refused"), error(503, "no replica"),
                            httpx.Response(200, json=completion("finally")))
    fake = FakeTime()
    with make_client(server, fake) as client:
        result = client.chat("small", USER, temperature=0.5, random_seed=1, safe_prompt=True)
    assert result.text == "finally"
    assert len(server.requests) == 3
    bodies = server.bodies()
    assert bodies[0] == bodies[1] == bodies[2]
    assert bodies[0]["random_seed"] == 1 and bodies[0]["safe_prompt"] is True
    # Full jitter: attempt n waits within [0, min(8, 0.5 * 2**n)].
    assert len(fake.sleeps) == 2
    assert 0 <= fake.sleeps[0] <= 0.5 and 0 <= fake.sleeps[1] <= 1.0


def test_gives_up_after_max_retries() -> None:
    server = ScriptedServer(httpx.ConnectError("refused"))
    fake = FakeTime()
    with make_client(server, fake, max_retries=2) as client, pytest.raises(APIConnectionError):
        client.chat("small", USER)
    assert len(server.requests) == 3 and len(fake.sleeps) == 2


def test_timeouts_are_retried_then_raised_as_api_timeout_error() -> None:
    server = ScriptedServer(httpx.ReadTimeout("slow"))
    with make_client(server, max_retries=1) as client, pytest.raises(APITimeoutError):
        client.chat("small", USER)
    assert len(server.requests) == 2


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413, 422, 500])
def test_no_retry_on_non_retryable_status(status: int) -> None:
    server = ScriptedServer(error(status, "no"))
    fake = FakeTime()
    with make_client(server, fake) as client, pytest.raises(APIError):
        client.chat("small", USER)
    assert len(server.requests) == 1 and fake.sleeps == []


def test_retry_after_seconds_is_honoured() -> None:
    server = ScriptedServer(error(429, "wait", headers={"retry-after": "7"}),
                            httpx.Response(200, json=completion()))
    fake = FakeTime()
    with make_client(server, fake) as client:
        client.chat("small", USER)
    assert fake.sleeps == [7.0]


def test_retry_after_http_date_is_honoured() -> None:
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    server = ScriptedServer(error(503, "busy", headers={"retry-after": when}),
                            httpx.Response(200, json=completion()))
    fake = FakeTime()
    with make_client(server, fake) as client:
        client.chat("small", USER)
    assert len(fake.sleeps) == 1 and 28.0 <= fake.sleeps[0] <= 30.0


def test_max_retries_zero_disables_retries() -> None:
    server = ScriptedServer(error(503, "busy"))
    with make_client(server, max_retries=0) as client, pytest.raises(ServerError):
        client.chat("small", USER)
    assert len(server.requests) == 1


# -- streaming --------------------------------------------------------------------------------


def test_stream_yields_typed_chunks_and_keeps_usage_and_headers() -> None:
    server = ScriptedServer(sse_response(sse(*stream_chunks(), ": keep-alive"), headers={
        "x-request-id": "req-s", "x-ratelimit-remaining-tokens": "900"}))
    with make_client(server) as client:
        stream = client.chat_stream("small", USER, max_tokens=5)
        assert server.requests == []  # lazy: sent on first iteration
        chunks = list(stream)
    assert [c.choices[0].delta.content for c in chunks] == ["Hel", "lo", None]
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert stream.usage is not None and stream.usage.completion_tokens == 3
    assert stream.request_id == "req-s"
    assert stream.rate_limit is not None and stream.rate_limit.remaining_tokens == 900
    body = server.bodies()[0]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == 5


def test_stream_tolerates_unknown_fields_and_multiline_events() -> None:
    event = "data: " + json.dumps(chunk("a", novel=1))[:20] + "\ndata: " + \
        json.dumps(chunk("a", novel=1))[20:] + "\n\n"
    body = b"event: message\nid: 1\n" + event.encode() + b"data: [DONE]\n\n"
    with make_client(ScriptedServer(sse_response(body))) as client:
        chunks = list(client.chat_stream("small", USER))
    assert len(chunks) == 1 and chunks[0].model_extra == {"novel": 1}


def test_stream_retries_before_the_first_chunk() -> None:
    server = ScriptedServer(error(502, "bad upstream"), broken_stream(b"", asynchronous=False),
                            sse_response(sse(*stream_chunks())))
    fake = FakeTime()
    with make_client(server, fake) as client, client.chat_stream("small", USER) as stream:
        text = "".join(c.choices[0].delta.content or "" for c in stream)
    assert text == "Hello" and len(server.requests) == 3 and len(fake.sleeps) == 2
    assert server.bodies()[0] == server.bodies()[2]


def test_no_retry_after_the_first_chunk() -> None:
    head = sse(chunk("Hel"), done=False)
    server = ScriptedServer(broken_stream(head, asynchronous=False),
                            sse_response(sse(*stream_chunks())))
    fake = FakeTime()
    seen = []
    with make_client(server, fake) as client, \
            pytest.raises(APIConnectionError, match="mid-stream"):
        for c in client.chat_stream("small", USER):
            seen.append(c.choices[0].delta.content)
    assert seen == ["Hel"] and len(server.requests) == 1 and fake.sleeps == []


def test_stream_cut_before_done_is_an_error() -> None:
    server = ScriptedServer(sse_response(sse(chunk("Hel"), done=False)))
    with make_client(server) as client, pytest.raises(APIConnectionError, match="incomplete"):
        list(client.chat_stream("small", USER))
    assert len(server.requests) == 1


def test_error_event_inside_stream_raises_api_error() -> None:
    event = {"error": {"message": "upstream died", "type": "upstream_error", "code": "x"}}
    server = ScriptedServer(sse_response(sse(chunk("a"), event)))
    with make_client(server) as client, pytest.raises(APIError, match="upstream died"):
        list(client.chat_stream("small", USER))


def test_stream_error_status_raises_typed_error() -> None:
    server = ScriptedServer(error(404, "no such model"))
    with make_client(server) as client, pytest.raises(NotFoundError, match="no such model"):
        list(client.chat_stream("nope", USER))


def test_stream_can_be_closed_early() -> None:
    server = ScriptedServer(sse_response(sse(*stream_chunks())))
    with make_client(server) as client:
        stream = client.chat_stream("small", USER)
        first = next(stream)
        stream.close()
        assert list(stream) == []
    assert first.choices[0].delta.content == "Hel"


# -- symmetry ---------------------------------------------------------------------------------

_ASYNC_NAMES = {"close": "aclose", "__enter__": "__aenter__", "__exit__": "__aexit__"}


def _public(cls: type) -> set[str]:
    names = {n for n in dir(cls) if not n.startswith("_") and callable(getattr(cls, n))}
    return names | {"__enter__", "__exit__", "__aenter__", "__aexit__"} & set(dir(cls))


def _shape(function: object) -> list[tuple[str, object, object]]:
    return [(p.name, p.kind, p.default)
            for p in inspect.signature(function).parameters.values()]  # type: ignore[arg-type]


def test_client_and_async_client_expose_the_same_methods() -> None:
    sync_names = _public(Client)
    async_names = _public(AsyncClient)
    assert {_ASYNC_NAMES.get(n, n) for n in sync_names} == async_names
    for name in sync_names:
        sync_method = getattr(Client, name)
        async_method = getattr(AsyncClient, _ASYNC_NAMES.get(name, name))
        assert _shape(sync_method) == _shape(async_method), name
        for param in inspect.signature(sync_method).parameters.values():
            other = inspect.signature(async_method).parameters[param.name]
            if param.name not in ("sleep", "transport", "exc_type", "exc", "tb"):
                assert param.annotation == other.annotation, (name, param.name)
        if name not in ("chat_stream",) and name not in _ASYNC_NAMES:
            assert inspect.iscoroutinefunction(async_method), name
    assert _shape(Client.__init__) == _shape(AsyncClient.__init__)
    # chat_stream is a plain call on both: the async one returns an async iterator.
    assert not inspect.iscoroutinefunction(AsyncClient.chat_stream)
