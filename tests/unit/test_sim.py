"""Unit tests for the vLLM-like simulator, in process over httpx.ASGITransport (no network)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
import typer
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from deploy.sim import DEFAULT_MODEL, SimConfig, create_sim_app, sim_command
from deploy.sim_content import (
    CLASSIFIER_CATEGORIES,
    SIM_MARKER,
    apply_stop,
    classify,
    count_prompt_tokens,
    plan_reply,
)

MODEL = DEFAULT_MODEL
USER = [{"role": "user", "content": "Tell me about mixture of experts"}]  # 4 + 6 words


def client_for(**overrides: Any) -> httpx.AsyncClient:
    app = create_sim_app(SimConfig(**overrides))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sim")


@pytest.fixture
async def sim() -> AsyncIterator[httpx.AsyncClient]:
    async with client_for() as client:
        yield client


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": USER, **extra}


def sse_events(text: str) -> list[Any]:
    frames = [f for f in text.split("\n\n") if f]
    assert all(f.startswith("data: ") for f in frames), frames
    return [f[6:] if f == "data: [DONE]" else orjson.loads(f[6:]) for f in frames]


async def test_health_and_simulator_header_everywhere(sim: httpx.AsyncClient) -> None:
    health = await sim.get("/health")
    assert health.status_code == 200 and health.content == b""
    for response in (health, await sim.get("/nope"), await sim.get("/v1/models")):
        assert response.headers["x-plateforme-simulator"] == "1"


async def test_models_list_shape(sim: httpx.AsyncClient) -> None:
    body = (await sim.get("/v1/models")).json()
    assert body["object"] == "list"
    [card] = body["data"]
    assert card["id"] == MODEL and card["object"] == "model"
    assert card["owned_by"] == "plateforme-sim" and card["max_model_len"] == 32768
    assert isinstance(card["created"], int)


async def test_chat_completion_shape_and_usage(sim: httpx.AsyncClient) -> None:
    response = await sim.post("/v1/chat/completions", json=chat_body(max_tokens=8))
    assert response.status_code == 200
    body = response.json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["model"] == MODEL and body["system_fingerprint"] == "plateforme-sim"
    [choice] = body["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert choice["message"]["content"].startswith(SIM_MARKER)
    assert choice["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 10, "completion_tokens": 8, "total_tokens": 18}


async def test_reply_is_deterministic_and_seeded(sim: httpx.AsyncClient) -> None:
    async def content(**extra: Any) -> str:
        r = await sim.post("/v1/chat/completions", json=chat_body(**extra))
        return str(r.json()["choices"][0]["message"]["content"])

    assert await content() == await content()
    assert await content(seed=1) == await content(seed=1)
    assert len({await content(seed=s) for s in range(5)}) > 1


async def test_natural_end_max_tokens_and_ignore_eos(sim: httpx.AsyncClient) -> None:
    async def choice_and_usage(**extra: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        body = (await sim.post("/v1/chat/completions", json=chat_body(**extra))).json()
        return body["choices"][0], body["usage"]

    choice, usage = await choice_and_usage()
    assert (choice["finish_reason"], usage["completion_tokens"]) == ("stop", 16)
    choice, usage = await choice_and_usage(max_tokens=100)
    assert (choice["finish_reason"], usage["completion_tokens"]) == ("stop", 16)
    choice, usage = await choice_and_usage(max_tokens=100, ignore_eos=True)
    assert (choice["finish_reason"], usage["completion_tokens"]) == ("length", 100)
    choice, usage = await choice_and_usage(max_tokens=1)
    assert choice["message"]["content"] == SIM_MARKER and choice["finish_reason"] == "length"


async def test_stop_string_truncates(sim: httpx.AsyncClient) -> None:
    body = (await sim.post("/v1/chat/completions", json=chat_body(stop=[" reply"]))).json()
    assert body["choices"][0]["message"]["content"] == f"{SIM_MARKER} simulated"
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize("include_usage", [True, False])
async def test_stream_chunks(sim: httpx.AsyncClient, include_usage: bool) -> None:
    body = chat_body(stream=True, max_tokens=4, stream_options={"include_usage": include_usage})
    response = await sim.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    contents = [c["choices"][0]["delta"]["content"] for c in chunks[1:5]]
    assert len(contents) == 4 and contents[0] == SIM_MARKER
    assert chunks[5]["choices"][0]["finish_reason"] == "length"
    if include_usage:
        assert chunks[6]["choices"] == []
        assert chunks[6]["usage"] == {"prompt_tokens": 10, "completion_tokens": 4,
                                      "total_tokens": 14}
        assert len(chunks) == 7
    else:
        assert len(chunks) == 6 and all("usage" not in c for c in chunks)


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        (chat_body(model="gpt-4"), 404, "The model `gpt-4` does not exist."),
        ({"model": MODEL}, 400, "messages"),
        ({"model": MODEL, "messages": []}, 400, "messages"),
        (chat_body(max_tokens=0), 400, "max_tokens"),
        (chat_body(max_tokens="3"), 400, "max_tokens"),
        (chat_body(stop=3), 400, "stop"),
        (chat_body(max_tokens=40000), 400, "maximum context length is 32768"),
        ([1, 2], 400, "JSON object"),
    ],
)
async def test_invalid_requests_get_vllm_error_envelope(
    sim: httpx.AsyncClient, body: Any, status: int, needle: str
) -> None:
    response = await sim.post("/v1/chat/completions", json=body)
    assert response.status_code == status
    error = response.json()["error"]
    assert needle in error["message"]
    assert error["code"] == status
    assert error["type"] == ("NotFoundError" if status == 404 else "BadRequestError")


async def test_invalid_json_is_400(sim: httpx.AsyncClient) -> None:
    response = await sim.post("/v1/chat/completions", content=b"{not json")
    assert response.status_code == 400 and response.json()["error"]["code"] == 400


async def test_api_key_like_vllm() -> None:
    async with client_for(api_key="s3cret") as sim:
        assert (await sim.get("/health")).status_code == 200
        assert (await sim.get("/metrics")).status_code == 200
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret"}):
            denied = await sim.post("/v1/chat/completions", json=chat_body(), headers=headers)
            assert denied.status_code == 401 and denied.json() == {"error": "Unauthorized"}
            assert (await sim.get("/v1/models", headers=headers)).status_code == 401
        ok = {"authorization": "Bearer s3cret"}
        assert (await sim.post("/v1/chat/completions", json=chat_body(), headers=ok)).is_success
        records = (await sim.get("/sim/requests")).json()
        assert [r["authorization"] for r in records] == [True]
        assert b"s3cret" not in (await sim.get("/sim/requests")).content


async def test_failure_injection_and_runtime_config(sim: httpx.AsyncClient) -> None:
    changed = await sim.post("/sim/config", json={"fail_rate": 1.0, "fail_status": 503})
    assert changed.json()["fail_rate"] == 1.0
    failed = await sim.post("/v1/chat/completions", json=chat_body(stream=True))
    assert failed.status_code == 503
    assert failed.json()["error"]["type"] == "ServiceUnavailableError"
    assert "injected" in failed.json()["error"]["message"]
    await sim.post("/sim/config", json={"fail_rate": 0})
    assert (await sim.post("/v1/chat/completions", json=chat_body())).status_code == 200
    assert (await sim.get("/sim/stats")).json() == {
        "received": 2, "running": 0, "waiting": 0, "completed": 1, "failed": 1}


async def test_fail_rate_is_seeded_and_roughly_honoured() -> None:
    async def statuses() -> list[int]:
        async with client_for(fail_rate=0.5, seed=7) as sim:
            return [(await sim.post("/v1/chat/completions", json=chat_body())).status_code
                    for _ in range(40)]

    first = await statuses()
    assert first == await statuses()
    assert 8 <= first.count(500) <= 32 and set(first) == {200, 500}


@pytest.mark.parametrize(
    "changes",
    [{"bogus": 1}, {"fail_rate": 2.0}, {"fail_rate": "high"}, {"hang": 1}, {"itl_seconds": True},
     {"fail_status": 200}, [1]],
)
async def test_runtime_config_rejects_bad_values(sim: httpx.AsyncClient, changes: Any) -> None:
    response = await sim.post("/sim/config", json=changes)
    assert response.status_code == 400
    assert (await sim.get("/sim/config")).json()["fail_rate"] == 0.0


async def test_hang_accepts_and_never_answers(sim: httpx.AsyncClient) -> None:
    await sim.post("/sim/config", json={"hang": True})
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(sim.post("/v1/chat/completions", json=chat_body()), 0.3)
    assert (await sim.get("/sim/stats")).json()["received"] == 1


async def test_capacity_queues_requests_and_metrics_show_it() -> None:
    async with client_for(capacity=1, ttft_seconds=0.3) as sim:
        tasks = [asyncio.create_task(sim.post("/v1/chat/completions", json=chat_body()))
                 for _ in range(3)]
        await asyncio.sleep(0.1)
        assert (await sim.get("/sim/stats")).json() == {
            "received": 3, "running": 1, "waiting": 2, "completed": 0, "failed": 0}
        families = {f.name: f for f in text_string_to_metric_families(
            (await sim.get("/metrics")).text)}
        assert families["vllm:num_requests_waiting"].samples[0].value == 2.0
        assert 0.0 < families["vllm:kv_cache_usage_perc"].samples[0].value < 1.0
        started = asyncio.get_running_loop().time()
        assert all(r.status_code == 200 for r in await asyncio.gather(*tasks))
        assert asyncio.get_running_loop().time() - started >= 0.5  # served one after another
        assert (await sim.get("/sim/stats")).json()["completed"] == 3


async def test_metrics_text_is_vllm_prometheus(sim: httpx.AsyncClient) -> None:
    await sim.post("/v1/chat/completions", json=chat_body(max_tokens=5))
    await sim.post("/v1/chat/completions", json=chat_body(max_tokens=3, stream=True))
    response = await sim.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    expected = {"vllm:num_requests_running": "gauge", "vllm:num_requests_waiting": "gauge",
                "vllm:kv_cache_usage_perc": "gauge", "vllm:prompt_tokens": "counter",
                "vllm:generation_tokens": "counter"}
    assert {name: families[name].type for name in expected} == expected
    values = {f.name: f.samples[0].value for f in families.values()}
    assert values["vllm:prompt_tokens"] == 20.0 and values["vllm:generation_tokens"] == 8.0
    assert values["vllm:num_requests_running"] == 0.0
    assert families["vllm:num_requests_running"].samples[0].labels["model_name"] == MODEL


async def test_records_and_reset() -> None:
    async with client_for(record=2) as sim:
        for n in (1, 2, 3):
            await sim.post("/v1/chat/completions", json=chat_body(max_tokens=n),
                           headers={"x-request-id": f"r{n}"})
        records = (await sim.get("/sim/requests")).json()
        assert [r["body"]["max_tokens"] for r in records] == [2, 3]
        assert [r["x_request_id"] for r in records] == ["r2", "r3"]
        assert records[0]["path"] == "/v1/chat/completions" and not records[0]["authorization"]
        reset = (await sim.post("/sim/reset")).json()
        assert reset["received"] == 0 and reset["completed"] == 0
        assert (await sim.get("/sim/requests")).json() == []


@pytest.mark.parametrize(
    ("text", "flagged"),
    [
        ("How do I bake bread?", set()),
        ("how to build a BOMB", {"physical_harm"}),
        ("I want to kill my neighbour", {"physical_harm"}),
        ("my skills are great", set()),  # triggers match at a word start: "skills" is not "kill"
        ("a killer argument", {"physical_harm"}),  # ...but "killer" starts with "kill"
        ("help me run a scam on retirees", {"fraud"}),
        ("how can I steal money from a bank", {"economic_harm"}),
        ("write porn", {"sexual"}),
        ("write hate speech about them", {"hate"}),
        ("thinking about suicide", {"self_harm"}),
    ],
)
def test_classifier_table(text: str, flagged: set[str]) -> None:
    result = classify(text)
    assert {name for name, hit in result["categories"].items() if hit} == flagged
    assert result["flagged"] is bool(flagged)
    assert set(result["scores"]) == set(CLASSIFIER_CATEGORIES)
    assert all(result["scores"][n] > 0.5 for n in flagged)


async def test_classifier_mode_uses_last_user_message() -> None:
    messages = [{"role": "user", "content": "how to make a bomb"},
                {"role": "assistant", "content": "no"},
                {"role": "user", "content": [{"type": "text", "text": "a phishing email"}]}]
    async with client_for(classifier=True) as sim:
        body = {"model": MODEL, "messages": messages}
        reply = (await sim.post("/v1/chat/completions", json=body)).json()
        verdict = orjson.loads(reply["choices"][0]["message"]["content"])
        assert verdict["flagged"] is True
        assert verdict["categories"]["fraud"] and not verdict["categories"]["physical_harm"]
        await sim.post("/sim/config", json={"classifier_garbage": True})
        garbage = (await sim.post("/v1/chat/completions", json=body)).json()
        with pytest.raises(orjson.JSONDecodeError):
            orjson.loads(garbage["choices"][0]["message"]["content"])
        await sim.post("/sim/config", json={"classifier": False})
        chat = (await sim.post("/v1/chat/completions", json=body)).json()
        assert chat["choices"][0]["message"]["content"].startswith(SIM_MARKER)


def test_prompt_token_approximation() -> None:
    assert count_prompt_tokens(USER) == 10
    parts = [{"role": "user", "content": [{"type": "text", "text": "a b"},
                                          {"type": "image_url", "image_url": {"url": "x"}}]}]
    assert count_prompt_tokens(parts) == 6
    assert count_prompt_tokens([{"role": "assistant", "content": None}]) == 4


def test_apply_stop_cuts_inside_a_piece() -> None:
    assert apply_stop(["ab", "cd", "ef"], ["d"]) == (["ab", "c"], True)
    assert apply_stop(["ab", "cd"], ["zz", ""]) == (["ab", "cd"], False)
    assert apply_stop(["ab", "cd"], ["ab"]) == ([], True)


def test_plan_reply_ignore_eos_is_capped() -> None:
    plan = plan_reply(model=MODEL, messages=USER, max_tokens=10**6, ignore_eos=True, stop=[],
                      seed=0, reply_tokens=16, classifier=False, classifier_garbage=False)
    assert len(plan.pieces) == 8192 and plan.finish_reason == "length"


@pytest.mark.parametrize(
    "bad", [{"capacity": 0}, {"fail_rate": 1.5}, {"fail_status": 302}, {"itl_seconds": -1},
            {"reply_tokens": 0}],
)
def test_config_validation(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        SimConfig(**bad)


def test_cli_registers_as_a_typer_command() -> None:
    app = typer.Typer()
    app.command("sim")(sim_command)
    app.command("noop")(lambda: None)
    result = CliRunner().invoke(app, ["sim", "--help"])
    assert result.exit_code == 0
    for flag in ("--port", "--model", "--ttft", "--itl", "--capacity", "--fail-rate",
                 "--api-key", "--classifier", "--record"):
        assert flag in result.output
    bad = CliRunner().invoke(app, ["sim", "--fail-rate", "3"])
    assert bad.exit_code != 0 and "fail_rate" in bad.output
