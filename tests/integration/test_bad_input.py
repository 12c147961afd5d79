"""Hostile input and credentials against a real gateway process: every refusal is the right
status in OpenAI's envelope, nothing reaches a 5xx, and the gateway keeps serving.

Raw sockets send what httpx refuses to (invalid UTF-8, CR/LF in a header, a body that trickles
in); the gateway runs with a 1 s body timeout and a 64 KiB body limit so the bounds show fast.
"""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.fixtures.procs import ADMIN_TOKEN, Gateway, GatewayFactory, SimFactory, basic_config

MAX_BODY_BYTES = 64 * 1024
USER = [{"role": "user", "content": "hello"}]
pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def gateway(module_sims: SimFactory, module_gateways: GatewayFactory,
            tmp_path_factory: pytest.TempPathFactory) -> Gateway:
    sim = module_sims()
    store = f"sqlite:///{tmp_path_factory.mktemp('bad') / 'state.db'}"
    return module_gateways(basic_config([sim.url], store, server={
        "body_timeout_seconds": 1.0, "max_body_bytes": MAX_BODY_BYTES}))


@pytest.fixture(scope="module")
def key(gateway: Gateway) -> str:
    return str(gateway.create_key()["key"])


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30) as c:
        yield c


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, response.text[:300])
    error = response.json()["error"]
    assert set(error) == {"message", "type", "code", "param"}, error
    assert response.headers["x-request-id"]
    return dict(error)


def raw(gateway: Gateway, data: bytes, *, pause: float = 0.0, chunks: list[bytes] | None = None,
        timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """Send `data` (then `chunks`, `pause` s apart) on a fresh socket; the parsed answer."""
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=timeout) as sock:
        sock.sendall(data)
        for chunk in chunks or ():
            if select.select([sock], [], [], pause)[0]:
                break  # the gateway answered already: stop feeding it
            try:
                sock.sendall(chunk)
            except OSError:  # the gateway already answered and closed
                break
        received = b""
        while b"\r\n\r\n" not in received or not _complete(received):
            part = sock.recv(65536)
            if not part:
                break
            received += part
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


def _complete(received: bytes) -> bool:
    head, _, body = received.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return True


def request_head(gateway: Gateway, key: str, length: int | None, extra: str = "") -> bytes:
    size = f"content-length: {length}\r\n" if length is not None else \
        "transfer-encoding: chunked\r\n"
    return (f"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1:{gateway.port}\r\n"
            f"authorization: Bearer {key}\r\ncontent-type: application/json\r\n{size}{extra}"
            "\r\n").encode()


def chat(client: httpx.Client, gateway: Gateway, key: str, **body: Any) -> httpx.Response:
    return client.post(f"{gateway.url}/v1/chat/completions", json=body,
                       headers={"authorization": f"Bearer {key}"})


# -- bodies -------------------------------------------------------------------------------


def test_invalid_utf8_and_non_json_bodies_are_400(gateway: Gateway, key: str,
                                                  client: httpx.Client) -> None:
    auth = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    for body in [b'{"model": "small", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
                 b"\xc3\x28", b"", b"[1, 2]", b"null", b'"text"', b"{", b"\x00" * 100]:
        response = client.post(f"{gateway.url}/v1/chat/completions", content=body,
                               headers=auth)
        assert error_of(response, 400)["type"] == "invalid_request_error", body


def test_deeply_nested_json_and_huge_numbers_are_refused_cleanly(
        gateway: Gateway, key: str, client: httpx.Client) -> None:
    auth = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    deep = b'{"model": "small", "messages": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"
    error_of(client.post(f"{gateway.url}/v1/chat/completions", content=deep, headers=auth), 400)
    nested = b'{"model":"small","messages":[{"role":"user","content":"hi"}],"x":' + \
        b'{"a":' * 200 + b"1" + b"}" * 200 + b"}"  # within the parser's depth: passes through
    assert client.post(f"{gateway.url}/v1/chat/completions", content=nested,
                       headers=auth).status_code == 200
    for number in [b"1e400", b"-1e400", b"9" * 400, b"NaN", b"Infinity", b"1.5"]:
        for field in [b"max_tokens", b"temperature", b"n", b"seed", b"random_seed", b"top_p"]:
            body = (b'{"model":"small","messages":[{"role":"user","content":"hi"}],"' + field
                    + b'":' + number + b"}")
            response = client.post(f"{gateway.url}/v1/chat/completions", content=body,
                                   headers=auth)
            assert response.status_code in (200, 400), (field, number, response.text)
            if response.status_code == 400:
                error_of(response, 400)


@pytest.mark.parametrize("changes", [
    {"max_tokens": -1}, {"max_tokens": 0}, {"max_tokens": 10**12}, {"max_tokens": "ten"},
    {"max_tokens": 2**63}, {"max_tokens": 1.5}, {"n": 0}, {"n": 9}, {"n": -3},
    {"messages": []}, {"messages": [{"role": "wizard", "content": "hi"}]},
    {"messages": [{"content": "no role"}]}, {"messages": "hi"}, {"messages": [None]},
    {"model": ""}, {"model": None}, {"temperature": -1}, {"temperature": 3},
    {"random_seed": 1, "seed": 2}, {"stop": 5}, {"stream": "maybe"},
], ids=str)
def test_invalid_chat_bodies_are_400_before_any_quota_is_spent(
        gateway: Gateway, key: str, client: httpx.Client, changes: dict[str, Any]) -> None:
    body = {"model": "small", "messages": USER, **changes}
    response = chat(client, gateway, key, **body)
    error = error_of(response, 400)
    assert error["type"] == "invalid_request_error"
    assert "x-ratelimit-remaining-requests" not in response.headers  # refused before admit


def test_n_reserves_n_times_max_tokens_and_is_capped_at_8(
        gateway: Gateway, client: httpx.Client) -> None:
    # tpm 1000: prompt + 8 * 100 fits, prompt + 8 * 125 never does.
    key = gateway.create_key(tpm=1000)["key"]
    fits = chat(client, gateway, key, model="small", messages=USER, max_tokens=100, n=8)
    assert fits.status_code == 200, fits.text
    used = 1000 - int(fits.headers["x-ratelimit-remaining-tokens"])
    assert used >= 800  # the whole n * max_tokens was reserved at admission
    refused = chat(client, gateway, key, model="small", messages=USER, max_tokens=125, n=8)
    assert error_of(refused, 429)["code"] == "request_exceeds_limit"
    assert "max_tokens 1000" in refused.json()["error"]["message"]  # n * max_tokens
    assert error_of(chat(client, gateway, key, model="small", messages=USER, n=9), 400)
    # Accounting follows what the upstream reported, not the reservation.
    reported = fits.json()["usage"]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with gateway.admin() as admin:
            rows = admin.usage(key_id=_key_id(key))
        if rows and rows[0]["requests"] == 1:
            break
        time.sleep(0.1)
    assert rows[0]["completion_tokens"] == reported["completion_tokens"]
    assert rows[0]["prompt_tokens"] == reported["prompt_tokens"]


def _key_id(key: str) -> str:
    return key[len("plf_"):len("plf_") + 16]


def test_bodies_over_the_limit_are_413_declared_or_chunked(gateway: Gateway, key: str) -> None:
    status, _, body = raw(gateway, request_head(gateway, key, MAX_BODY_BYTES + 1))
    assert status == 413 and b"payload_too_large" in body
    chunk = b"x" * 16384
    framed = b"%x\r\n%s\r\n" % (len(chunk), chunk)
    status, _, body = raw(gateway, request_head(gateway, key, None),
                          chunks=[framed] * 6 + [b"0\r\n\r\n"])
    assert status == 413 and b"payload_too_large" in body
    status, _, body = raw(gateway, request_head(gateway, key, None).replace(
        b"transfer-encoding: chunked", b"content-length: -5"))
    assert status == 400


def test_slow_loris_bodies_get_408_from_the_body_timeout(gateway: Gateway, key: str) -> None:
    started = time.monotonic()
    status, headers, body = raw(gateway, request_head(gateway, key, 200) + b'{"model"')
    assert status == 408, body
    assert b"request_body_timeout" in body and headers["x-request-id"]
    assert time.monotonic() - started < 5
    # A byte every 0.3 s keeps the socket busy but not the deadline: still 408 at ~1 s.
    started = time.monotonic()
    status, _, body = raw(gateway, request_head(gateway, key, 200), pause=0.3,
                          chunks=[b" "] * 20)
    assert status == 408, body
    assert time.monotonic() - started < 4
    assert httpx.get(f"{gateway.url}/health", timeout=5).status_code == 200


# -- headers ------------------------------------------------------------------------------


def test_request_id_injection_is_replaced_not_echoed(gateway: Gateway, key: str,
                                                     client: httpx.Client) -> None:
    for bad in ["a b", "<script>", "x" * 129, "id;rm -rf", "é", "id\tx"]:
        response = client.get(f"{gateway.url}/v1/models",
                               headers={"authorization": f"Bearer {key}",
                                        "x-request-id": bad.encode("utf-8")})
        assert response.status_code == 200
        assert response.headers["x-request-id"] != bad
        assert len(response.headers["x-request-id"]) == 24
    good = client.get(f"{gateway.url}/health", headers={"x-request-id": "req-42.a:b"})
    assert good.headers["x-request-id"] == "req-42.a:b"
    # CR/LF in the value: the parser ends the header there; nothing is injected back.
    status, headers, _ = raw(gateway, (
        b"GET /health HTTP/1.1\r\nhost: x\r\nx-request-id: abc\r\nset-cookie: evil=1\r\n"
        b"\r\n"))
    assert status == 200 and "set-cookie" not in headers
    status, headers, _ = raw(gateway, b"GET /health HTTP/1.1\r\nhost: x\r\n"
                             b"x-request-id: abc\rset-cookie: evil=1\r\n\r\n")
    assert status in (200, 400) and "set-cookie" not in headers
    assert headers.get("x-request-id") != "abc\rset-cookie: evil=1"


def test_very_long_headers_are_431_or_refused_by_their_own_check(gateway: Gateway, key: str,
                                                     client: httpx.Client) -> None:
    long_auth = client.get(f"{gateway.url}/v1/models",
                           headers={"authorization": "Bearer plf_" + "a" * 60_000})
    assert error_of(long_auth, 401)["type"] == "authentication_error"
    long_id = client.get(f"{gateway.url}/v1/models", headers={
        "authorization": f"Bearer {key}", "x-request-id": "r" * 60_000})
    assert long_id.status_code == 200 and len(long_id.headers["x-request-id"]) == 24
    for size in (70_000, 2_000_000):  # heads over 64 KiB: 431, before any handler
        for path in ("/health", "/v1/chat/completions"):
            response = client.get(f"{gateway.url}{path}", headers={"x-filler": "f" * size})
            assert error_of(response, 431)["code"] == "request_headers_too_large"
    many = {f"x-h{i}": "v" * 1000 for i in range(80)}  # many headers add up the same way
    assert error_of(client.get(f"{gateway.url}/health", headers=many), 431)
    assert httpx.get(f"{gateway.url}/health", timeout=5).status_code == 200


# -- authentication -----------------------------------------------------------------------


@pytest.mark.parametrize("authorization", [
    None, "", "Bearer", "Bearer  x", "Basic dXNlcjpwYXNz", "bearer", "Token abc",
    "Bearer sk-0123456789abcdef0123456789abcdef", "Bearer plf_short",
    "Bearer plf_0123456789abcdef_" + "A" * 42, "Bearer plf_0123456789abcdef_" + "A" * 44,
    "Bearer plf_0123456789ABCDEF_" + "A" * 43, "Bearer plf_0123456789abcdefX" + "A" * 43,
    "Bearer xyz_0123456789abcdef_" + "A" * 43, "Bearer plf_0123456789abcdef_" + "A" * 43,
    "Bearer " + ADMIN_TOKEN,
], ids=lambda v: "none" if v is None else v[:40])
def test_malformed_or_unknown_credentials_are_401_on_v1(
        gateway: Gateway, client: httpx.Client, authorization: str | None) -> None:
    headers = {} if authorization is None else {"authorization": authorization}
    for response in (client.get(f"{gateway.url}/v1/models", headers=headers),
                     client.post(f"{gateway.url}/v1/chat/completions", headers=headers,
                                 json={"model": "small", "messages": USER})):
        assert error_of(response, 401)["type"] == "authentication_error"


def test_a_real_key_with_a_wrong_secret_is_401(gateway: Gateway, key: str,
                                               client: httpx.Client) -> None:
    forged = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")
    response = client.get(f"{gateway.url}/v1/models",
                          headers={"authorization": f"Bearer {forged}"})
    assert error_of(response, 401)["code"] == "invalid_api_key"


def test_revoked_and_expired_keys_are_401_with_their_codes(
        gateway: Gateway, client: httpx.Client) -> None:
    revoked = gateway.create_key()
    expiring = gateway.create_key(expires_in=1)
    for k in (revoked, expiring):
        assert client.get(f"{gateway.url}/v1/models", headers={
            "authorization": f"Bearer {k['key']}"}).status_code == 200
    with gateway.admin() as admin:
        admin.revoke_key(revoked["id"])
    time.sleep(1.2)  # the expiry passes; the revocation reaches the cache via the version poll
    for k, code in ((revoked, "revoked_api_key"), (expiring, "expired_api_key")):
        response = chat(client, gateway, k["key"], model="small", messages=USER)
        assert error_of(response, 401)["code"] == code


def test_admin_token_and_api_keys_never_cross(gateway: Gateway, key: str,
                                              client: httpx.Client) -> None:
    as_key = client.get(f"{gateway.url}/admin/v1/keys",
                        headers={"authorization": f"Bearer {key}"})
    assert error_of(as_key, 401)["code"] == "invalid_admin_token"
    for bad in [None, "Bearer", "Bearer wrong-token", f"Basic {ADMIN_TOKEN}",
                f"Bearer {ADMIN_TOKEN}x", f"Bearer {ADMIN_TOKEN[:-1]}"]:
        headers = {} if bad is None else {"authorization": bad}
        response = client.post(f"{gateway.url}/admin/v1/keys", headers=headers,
                               json={"owner": "mallory", "plan": "beta"})
        assert error_of(response, 401)["type"] == "authentication_error", bad
    as_admin = client.get(f"{gateway.url}/v1/models",
                          headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
    assert error_of(as_admin, 401)["type"] == "authentication_error"
    with gateway.admin() as admin:
        assert "mallory" not in str(admin.list_keys())
    assert key not in gateway.logs() and ADMIN_TOKEN not in gateway.logs()


def test_a_slow_body_on_delete_is_bounded_too(gateway: Gateway) -> None:
    """DELETE /admin/v1/models/{name}/replicas reads an optional JSON body: the body bounds
    cover every method that may carry one, not only POST and PATCH."""
    head = (f"DELETE /admin/v1/models/small/replicas HTTP/1.1\r\nhost: x\r\n"
            f"authorization: Bearer {ADMIN_TOKEN}\r\ncontent-type: application/json\r\n"
            "content-length: 100\r\n\r\n").encode()
    started = time.monotonic()
    status, _, body = raw(gateway, head + b'{"url"')
    assert status == 408, body
    assert time.monotonic() - started < 5
    chunk = b"x" * 16384
    status, _, body = raw(gateway, head.replace(b"content-length: 100",
                                                b"transfer-encoding: chunked"),
                          chunks=[b"%x\r\n%s\r\n" % (len(chunk), chunk)] * 6 + [b"0\r\n\r\n"])
    assert status == 413, body


def test_a_slow_request_head_is_cut_at_the_deadline(gateway: Gateway) -> None:
    """uvicorn arms no timer while headers arrive; the gateway's protocol closes a connection
    whose head is not complete within body_timeout_seconds (1 s here), first request or a
    later one on a kept-alive connection."""
    for prefix in (b"", b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
            sock.sendall(prefix + b"GET /health HTTP/1.1\r\nhost: x\r\n")
            started = time.monotonic()
            received = b""
            while True:  # trickle header lines; the server must hang up on us
                if select.select([sock], [], [], 0.3)[0]:
                    try:
                        part = sock.recv(65536)
                    except OSError:
                        break
                    if not part:
                        break
                    received += part
                    continue
                try:
                    sock.sendall(b"x-slow: 1\r\n")
                except OSError:
                    break
                assert time.monotonic() - started < 6, "the slow head was never cut"
            assert time.monotonic() - started < 4
            assert received.count(b"HTTP/1.1 200") == (1 if prefix else 0)
    assert httpx.get(f"{gateway.url}/health", timeout=5).status_code == 200
