"""The whole platform on a real vLLM: gateway in front, replica started and registered by deploy.

The session's vLLM (CPU, tiny random Mixtral, Mistral tokenizer mode) was started by
`plateforme deploy up small --local --engine vllm` and registered with a gateway whose
`mistral-small` had no replica, so every success here went through that registration. Users
call with the bundled client and the `openai` SDK; the checks compare the gateway's books with
vLLM's own: the usage it reports, its Prometheus counters, and the gauges the router scrapes.
Temperature 0 in float32 is greedy and deterministic, and `ignore_eos` fixes completion lengths.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest
from plateforme_client import AsyncClient, Client, RateLimitError

from tests.e2e.conftest import GATEWAY_MODEL, TIER, VllmPlatform

# The first test may pay for the session's vLLM start (45 s idle, ~2.5 min on a busy machine).
pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]

MAX_TOKENS = 12
REQUEST_TIMEOUT_SECONDS = 60.0
STREAM_MAX_TOKENS = 64
IN_FLIGHT_MAX_TOKENS = 2000  # tens of seconds of decoding: cancelled once the router saw it
SCRAPE_WAIT_SECONDS = 20.0  # routing.probe_interval_seconds is 0.5 s; a busy machine lags
LEDGER_WAIT_SECONDS = 10.0
TPM = 100_000
# Mixtral's v1 template folds the system prompt into the last user turn; non-ASCII on purpose.
CONVERSATION: list[Any] = [
    {"role": "system", "content": "You answer in one short sentence."},
    {"role": "user", "content": "Name a river of France."},
    {"role": "assistant", "content": "The Loire."},
    {"role": "user", "content": "And one in Québec — with a café ☕ nearby?"},
]
HELLO: list[Any] = [{"role": "user", "content": "Name three rivers of France."}]


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(0.2)


def vllm_counters(platform: VllmPlatform) -> dict[str, float]:
    """vLLM's own request and token counters from its /metrics (summed over label sets)."""
    names = ("vllm:prompt_tokens_total", "vllm:generation_tokens_total",
             "vllm:request_success_total")
    text = httpx.get(f"{platform.server.endpoint.base_url}/metrics",
                     timeout=REQUEST_TIMEOUT_SECONDS).text
    totals = dict.fromkeys(names, 0.0)
    for line in text.splitlines():
        name = line.split("{")[0].split(" ")[0]
        if name in totals:
            totals[name] += float(line.rsplit(" ", 1)[1])
    return totals


def counter_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, int]:
    return {name: round(after[name] - before[name]) for name in before}


def ledger(platform: VllmPlatform, key_id: str) -> dict[str, int]:
    """The gateway's usage ledger for one key, summed over its rows."""
    with platform.gateway.admin() as admin:
        rows = admin.usage(key_id=key_id)
    return {field: sum(int(row[field]) for row in rows)
            for field in ("requests", "prompt_tokens", "completion_tokens", "errors")}


def settled(platform: VllmPlatform, key_id: str, requests: int) -> dict[str, int]:
    """The ledger once `requests` requests are settled (settlement may trail the response)."""
    result: dict[str, int] = wait_for(
        lambda: (row := ledger(platform, key_id))["requests"] >= requests and row,
        LEDGER_WAIT_SECONDS, f"{requests} settled requests in the ledger")
    return result


def replica_view(platform: VllmPlatform) -> dict[str, Any]:
    """The router's view of the vLLM replica, as the admin API lists it."""
    with httpx.Client(base_url=platform.gateway.url, timeout=REQUEST_TIMEOUT_SECONDS,
                      headers={"authorization": f"Bearer {platform.gateway.admin_token}"}) as h:
        data = h.get(f"/admin/v1/models/{GATEWAY_MODEL}/replicas").json()["data"]
    [replica] = [r for r in data if r["url"] == platform.server.endpoint.base_url]
    result: dict[str, Any] = replica
    return result


def chat(platform: VllmPlatform, key: str, messages: list[dict[str, Any]], max_tokens: int
         ) -> httpx.Response:
    return httpx.post(
        f"{platform.gateway.url}/v1/chat/completions",
        headers={"authorization": f"Bearer {key}"}, timeout=REQUEST_TIMEOUT_SECONDS,
        json={"model": "small", "messages": messages, "max_tokens": max_tokens,
              "temperature": 0, "ignore_eos": True})


@pytest.fixture
def key(vllm_platform: VllmPlatform) -> dict[str, Any]:
    """A fresh key: its own ledger rows and its own rate-limit windows."""
    return vllm_platform.gateway.create_key("beta", tpm=TPM)


def test_deploy_up_registered_the_vllm_replica(vllm_platform: VllmPlatform) -> None:
    with vllm_platform.gateway.admin() as admin:
        assert admin.list_replicas(GATEWAY_MODEL) == [vllm_platform.server.endpoint.base_url]
    view = wait_for(lambda: (r := replica_view(vllm_platform))["healthy"] and r, 10.0,
                    "the replica healthy in the router")
    assert view["source"] == "registered"
    print(f"\nvLLM start to registered: {vllm_platform.server.startup_seconds:.1f} s",
          file=sys.stderr)


def test_chat_with_the_bundled_client_is_vllms_answer(vllm_platform: VllmPlatform,
                                                      key: dict[str, Any]) -> None:
    """Through the gateway, the text is exactly what vLLM answers directly (greedy)."""
    direct = httpx.post(
        f"{vllm_platform.server.endpoint.base_url}/v1/chat/completions",
        headers=vllm_platform.server.headers, timeout=REQUEST_TIMEOUT_SECONDS,
        json={"model": vllm_platform.server.endpoint.served_model_name, "messages": HELLO,
              "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}).json()
    with Client(api_key=key["key"], base_url=vllm_platform.gateway.url) as client:
        reply = client.chat(model="small", messages=HELLO, max_tokens=MAX_TOKENS,
                            temperature=0, ignore_eos=True)
    assert reply.text == direct["choices"][0]["message"]["content"]
    assert reply.model == vllm_platform.server.endpoint.served_model_name
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None
    assert reply.usage.completion_tokens == MAX_TOKENS
    assert reply.usage.prompt_tokens == direct["usage"]["prompt_tokens"]
    assert reply.rate_limit is not None


async def test_chat_with_the_async_client(vllm_platform: VllmPlatform,
                                          key: dict[str, Any]) -> None:
    async with AsyncClient(api_key=key["key"], base_url=vllm_platform.gateway.url) as client:
        reply = await client.chat(model="small", messages=HELLO, max_tokens=MAX_TOKENS,
                                  temperature=0, ignore_eos=True)
        chunks = [chunk async for chunk in client.chat_stream(
            model="small", messages=HELLO, max_tokens=MAX_TOKENS, temperature=0,
            ignore_eos=True)]
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert reply.text and streamed == reply.text
    assert reply.usage is not None and reply.usage.completion_tokens == MAX_TOKENS


def test_openai_sdk_stream_ends_with_vllms_usage(vllm_platform: VllmPlatform,
                                                 key: dict[str, Any]) -> None:
    sdk = openai.OpenAI(api_key=key["key"], base_url=f"{vllm_platform.gateway.url}/v1",
                        max_retries=0, timeout=REQUEST_TIMEOUT_SECONDS)
    started = time.monotonic()
    stream = sdk.chat.completions.create(
        model="small", messages=HELLO, max_tokens=STREAM_MAX_TOKENS, temperature=0,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    elapsed = time.monotonic() - started
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert usage_chunk.usage.completion_tokens == STREAM_MAX_TOKENS
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-2].choices[0].finish_reason == "length"
    text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    whole = sdk.chat.completions.create(
        model="small", messages=HELLO, max_tokens=STREAM_MAX_TOKENS, temperature=0,
        extra_body={"ignore_eos": True})
    assert text == whole.choices[0].message.content
    assert whole.usage is not None
    assert whole.usage.prompt_tokens == usage_chunk.usage.prompt_tokens
    print(f"\nstream of {STREAM_MAX_TOKENS} tokens through the gateway: {elapsed:.2f} s "
          f"({STREAM_MAX_TOKENS / elapsed:.0f} tokens/s end to end)", file=sys.stderr)


def test_usage_ledger_equals_vllms_own_counts(vllm_platform: VllmPlatform,
                                              key: dict[str, Any]) -> None:
    """The ledger sums what vLLM reported, and vLLM's own counters moved by as much."""
    before = vllm_counters(vllm_platform)
    reported = {"prompt_tokens": 0, "completion_tokens": 0}
    for messages, max_tokens in ((HELLO, 5), (CONVERSATION, 9)):
        response = chat(vllm_platform, key["key"], messages, max_tokens)
        assert response.status_code == 200, response.text
        for name in reported:
            reported[name] += response.json()["usage"][name]
    sdk = openai.OpenAI(api_key=key["key"], base_url=f"{vllm_platform.gateway.url}/v1",
                        max_retries=0, timeout=REQUEST_TIMEOUT_SECONDS)
    stream = sdk.chat.completions.create(
        model="small", messages=CONVERSATION, max_tokens=7, temperature=0,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    final = [c for c in stream][-1].usage
    assert final is not None
    reported["prompt_tokens"] += final.prompt_tokens
    reported["completion_tokens"] += final.completion_tokens

    books = settled(vllm_platform, key["id"], 3)
    vllm = counter_delta(before, vllm_counters(vllm_platform))
    assert books == {"requests": 3, "errors": 0, **reported}
    assert reported["completion_tokens"] == 5 + 9 + 7
    assert vllm == {"vllm:prompt_tokens_total": reported["prompt_tokens"],
                    "vllm:generation_tokens_total": reported["completion_tokens"],
                    "vllm:request_success_total": 3}
    print(f"\nledger {books} == vLLM {vllm}", file=sys.stderr)


@pytest.mark.parametrize("messages", [HELLO, CONVERSATION], ids=["one-turn", "conversation"])
def test_admission_counts_prompt_tokens_exactly_as_vllm(vllm_platform: VllmPlatform,
                                                        messages: list[dict[str, Any]]) -> None:
    """The gateway reserves prompt + max_tokens with mistral-common's v1 tokenizer at admission
    and refunds the unused part from vLLM's usage: both visible in x-ratelimit-remaining-tokens."""
    key = vllm_platform.gateway.create_key("beta", tpm=TPM)
    first = chat(vllm_platform, key["key"], messages, MAX_TOKENS)
    assert first.status_code == 200, first.text
    assert first.headers["x-ratelimit-limit-tokens"] == str(TPM)
    usage = first.json()["usage"]
    counted_at_admission = TPM - MAX_TOKENS - int(first.headers["x-ratelimit-remaining-tokens"])
    assert counted_at_admission == usage["prompt_tokens"]

    settled(vllm_platform, key["id"], 1)
    second = chat(vllm_platform, key["key"], messages, 3 * MAX_TOKENS)
    assert second.status_code == 200, second.text
    # the first request now holds what it used; the second its prompt plus its max_tokens
    assert int(second.headers["x-ratelimit-remaining-tokens"]) == (
        TPM - usage["total_tokens"] - (usage["prompt_tokens"] + 3 * MAX_TOKENS))


def test_rpm_limit_refuses_before_vllm(vllm_platform: VllmPlatform) -> None:
    key = vllm_platform.gateway.create_key("beta", rpm=2, tpm=TPM)
    before = vllm_counters(vllm_platform)
    remaining = []
    for _ in range(2):
        response = chat(vllm_platform, key["key"], HELLO, 2)
        assert response.status_code == 200, response.text
        remaining.append(response.headers["x-ratelimit-remaining-requests"])
    refused = chat(vllm_platform, key["key"], HELLO, 2)
    assert remaining == ["1", "0"]
    assert refused.status_code == 429, refused.text
    assert float(refused.headers["retry-after"]) > 0
    assert refused.json()["error"]["type"]
    with (Client(api_key=key["key"], base_url=vllm_platform.gateway.url, max_retries=0)
          as client, pytest.raises(RateLimitError) as raised):
        client.chat(model="small", messages=HELLO, max_tokens=2)
    assert raised.value.status_code == 429
    assert counter_delta(before, vllm_counters(vllm_platform))[
        "vllm:request_success_total"] == 2
    assert settled(vllm_platform, key["id"], 2)["requests"] == 2


def test_vllm_metrics_feed_the_routers_load_view(vllm_platform: VllmPlatform,
                                                 key: dict[str, Any]) -> None:
    """While a long stream decodes, the router's scrape shows vLLM's queue and KV-cache use;
    cancelling the stream cancels the upstream request, and the gauges settle back."""
    body = {"model": "small", "messages": HELLO, "max_tokens": IN_FLIGHT_MAX_TOKENS,
            "temperature": 0, "ignore_eos": True, "stream": True}
    with (httpx.Client(timeout=REQUEST_TIMEOUT_SECONDS) as http,
          http.stream("POST", f"{vllm_platform.gateway.url}/v1/chat/completions", json=body,
                      headers={"authorization": f"Bearer {key['key']}"}) as response):
        assert response.status_code == 200
        lines = response.iter_lines()
        while not next(lines).startswith("data: "):
            pass  # the first event: vLLM has scheduled the request and is decoding
        busy = wait_for(lambda: (r := replica_view(vllm_platform))["vllm_running"] >= 1
                        and r, SCRAPE_WAIT_SECONDS, "the router to scrape vllm_running >= 1")
    assert busy["outstanding"] == 1
    assert busy["kv_cache_usage"] > 0
    assert busy["vllm_waiting"] == 0
    idle = wait_for(lambda: (r := replica_view(vllm_platform))["vllm_running"] == 0
                    and r["outstanding"] == 0 and r, SCRAPE_WAIT_SECONDS,
                    "the cancelled request to leave vLLM")
    assert idle["healthy"] is True


@pytest.mark.runs_last
def test_deploy_down_deregisters_then_stops_vllm(vllm_platform: VllmPlatform,
                                                 key: dict[str, Any]) -> None:
    down = vllm_platform.deploy("down", TIER, "--local")
    assert down.returncode == 0, down.stderr
    url = vllm_platform.server.endpoint.base_url
    assert f"deregistered {url} from {GATEWAY_MODEL}" in down.stdout
    with vllm_platform.gateway.admin() as admin:
        assert admin.list_replicas(GATEWAY_MODEL) == []
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/health", timeout=5.0)
    refused = chat(vllm_platform, key["key"], HELLO, 2)
    assert refused.status_code == 503, refused.text
