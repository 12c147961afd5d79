"""The chat path as the official `openai` SDK sees it, over a real gateway and simulator."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest

from tests.fixtures.procs import MIXTRAL, Gateway, GatewayFactory, Sim, SimFactory, basic_config

MESSAGES: list[Any] = [{"role": "user", "content": "Say hello"}]


@dataclass
class Platform:
    sim: Sim
    gateway: Gateway
    key: str
    client: openai.OpenAI


@pytest.fixture(scope="module")
def platform(module_sims: SimFactory, module_gateways: GatewayFactory,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    sim = module_sims()
    config = basic_config([sim.url], f"sqlite:///{tmp_path_factory.mktemp('db')}/state.db")
    config["models"]["mistral-tiny"] = {"aliases": ["tiny"], "upstream_model": "mistral-7b",
                                        "replicas": [sim.url]}
    gateway = module_gateways(config)
    key = gateway.create_key()["key"]
    client = openai.OpenAI(api_key=key, base_url=f"{gateway.url}/v1", max_retries=0)
    yield Platform(sim, gateway, key, client)
    client.close()


def test_chat_completion_through_an_alias(platform: Platform) -> None:
    completion = platform.client.chat.completions.create(
        model="small", messages=MESSAGES, max_tokens=5)
    assert completion.choices[0].message.content
    assert "[plateforme-sim]" in (completion.choices[0].message.content or "")
    assert completion.usage is not None and completion.usage.completion_tokens == 5
    received = platform.sim.requests()[-1]["body"]
    assert received["model"] == MIXTRAL and received["max_tokens"] == 5


def test_stream_with_and_without_include_usage(platform: Platform) -> None:
    stream = platform.client.chat.completions.create(
        model="open-mixtral-8x7b", messages=MESSAGES, max_tokens=4, stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith("[plateforme-sim]")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4

    plain = list(platform.client.chat.completions.create(
        model="small", messages=MESSAGES, max_tokens=4, stream=True))
    assert plain and all(c.usage is None for c in plain)
    # the gateway still asked the upstream for usage, to count tokens
    assert platform.sim.requests()[-1]["body"]["stream_options"] == {"include_usage": True}


def test_list_models_shows_only_allowed_models_with_aliases(platform: Platform) -> None:
    models = {m.id: m for m in platform.client.models.list()}
    assert set(models) == {"mistral-small"}  # the beta plan allows only mistral-small
    assert models["mistral-small"].model_extra is not None
    assert models["mistral-small"].model_extra["aliases"] == ["small", "open-mixtral-8x7b"]


def test_openai_sdk_raises_the_matching_exceptions(platform: Platform) -> None:
    bad = openai.OpenAI(api_key="plf_0000000000000000_" + "x" * 43,
                        base_url=f"{platform.gateway.url}/v1", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="small", messages=MESSAGES)
    with pytest.raises(openai.PermissionDeniedError):
        platform.client.chat.completions.create(model="tiny", messages=MESSAGES)
    with pytest.raises(openai.NotFoundError):
        platform.client.chat.completions.create(model="mistral-huge", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError):
        platform.client.chat.completions.create(model="small", messages=MESSAGES,
                                                temperature=5)
    with pytest.raises(openai.BadRequestError) as info:
        platform.client.chat.completions.create(
            model="small", messages=MESSAGES, seed=1, extra_body={"random_seed": 2})
    assert "random_seed" in str(info.value)
    with pytest.raises(openai.BadRequestError):
        platform.client.chat.completions.create(model="small", messages=[])


def test_mistral_parameters_are_mapped_and_others_pass_through(platform: Platform) -> None:
    platform.client.chat.completions.create(
        model="small", messages=MESSAGES,
        extra_body={"random_seed": 42, "safe_prompt": False, "top_k": 5},
        response_format={"type": "json_object"}, stop=["\n"])
    body = platform.sim.requests()[-1]["body"]
    assert body["seed"] == 42 and "random_seed" not in body
    assert "safe_prompt" not in body
    assert body["top_k"] == 5 and body["response_format"] == {"type": "json_object"}
    assert body["stop"] == ["\n"] and body["max_tokens"] == 64  # the model's default cap


def test_errors_are_openai_shaped_with_request_ids(platform: Platform) -> None:
    url = f"{platform.gateway.url}/v1/chat/completions"
    auth = {"authorization": f"Bearer {platform.key}"}
    cases = [
        (httpx.post(url, headers={**auth, "content-type": "application/json"},
                    content=b"{not json", timeout=5), 400),
        (httpx.post(url, headers=auth, content=b"[1, 2]", timeout=5), 400),
        (httpx.post(url, headers=auth, content=b"x" * (8 * 1024 * 1024 + 1), timeout=30), 413),
        (httpx.post(url, headers=auth, json={"model": "small", "messages": [
            {"role": "wizard", "content": "x"}]}, timeout=5), 400),
        (httpx.get(f"{platform.gateway.url}/v1/nothing-here", timeout=5), 404),
        (httpx.post(url, json={"model": "small", "messages": MESSAGES}, timeout=5), 401),
    ]
    for response, status in cases:
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert set(error) == {"message", "type", "code", "param"}
        assert "Traceback" not in response.text
        assert response.headers["x-request-id"]
    echoed = httpx.post(url, headers={**auth, "x-request-id": "my-trace-123"},
                        json={"model": "small", "messages": MESSAGES}, timeout=5)
    assert echoed.headers["x-request-id"] == "my-trace-123"
    for hostile in (b"bad id <script>", b"x" * 500, "caf\u00e9".encode("latin-1")):
        injected = httpx.post(url, headers={**auth, "x-request-id": hostile},
                              json={"model": "small", "messages": MESSAGES}, timeout=5)
        assert injected.status_code == 200
        assert injected.headers["x-request-id"].encode() != hostile
        assert len(injected.headers["x-request-id"]) <= 128


def test_usage_ledger_counts_requests_and_tokens(platform: Platform) -> None:
    key = platform.gateway.create_key()
    client = openai.OpenAI(api_key=key["key"], base_url=f"{platform.gateway.url}/v1")
    for _ in range(3):
        client.chat.completions.create(model="small", messages=MESSAGES, max_tokens=3)
    list(client.chat.completions.create(model="small", messages=MESSAGES,
                                        max_tokens=2, stream=True))
    with platform.gateway.admin() as admin:
        import time
        deadline = time.monotonic() + 5
        while True:
            rows = admin.usage(key_id=key["id"])
            if rows and rows[0]["requests"] == 4 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    assert len(rows) == 1
    row = rows[0]
    assert row["model"] == "mistral-small" and row["requests"] == 4
    assert row["completion_tokens"] == 3 * 3 + 2
    assert row["prompt_tokens"] > 0
