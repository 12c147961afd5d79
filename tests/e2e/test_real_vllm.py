"""A real vLLM (CPU, tiny random Mixtral, Mistral tokenizer mode) answers as the gateway needs.

These talk to vLLM directly (test_vllm_gateway.py puts the gateway in front of the same
session server). Health checks prove nothing on CPU (a bad head_dim passes /health and dies on the first
request), so every test sends real generation requests. Temperature 0 in float32 is greedy and
deterministic, and ``ignore_eos`` fixes the completion length, so the assertions are exact.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from mistral_common.protocol.instruct.messages import UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from deploy import vllm_local
from tests.e2e.conftest import VllmEndpoint, VllmServer

# The first test also pays for the session's vLLM start (45 s idle, ~2 min on a busy machine)
# and, from a clean clone, the tiny model build: room beyond the suite's 300 s default.
pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]

MAX_TOKENS = 12
PROMPT = "Name three rivers of France."
REQUEST_TIMEOUT_SECONDS = 60.0
REFERENCE_TIMEOUT_SECONDS = 120.0
IN_FLIGHT_MAX_TOKENS = 400  # ~3 s of decoding: long enough to scrape /metrics mid-request
REQUIRED_VLLM_GAUGES = (
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
)


@pytest.fixture
def client(vllm_server: VllmServer) -> Iterator[httpx.Client]:
    """Straight to vLLM, with the replica API key it was started with."""
    with httpx.Client(base_url=vllm_server.endpoint.base_url, headers=vllm_server.headers,
                      timeout=REQUEST_TIMEOUT_SECONDS) as c:
        yield c


def chat_body(model: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "temperature": 0,
        "max_tokens": MAX_TOKENS,
        "ignore_eos": True,
        **extra,
    }


def stream_events(client: httpx.Client, body: dict[str, Any]) -> list[str]:
    """The ``data:`` payloads of an SSE chat stream, in order, including ``[DONE]``."""
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return [line[len("data: "):] for line in response.iter_lines()
                if line.startswith("data: ")]


def mistral_v1_prompt_tokens(text: str) -> int:
    """What the gateway's limiter counts for one user message (Mixtral's v1 tokenizer)."""
    request = ChatCompletionRequest(messages=[UserMessage(content=text)])
    return len(MistralTokenizer.v1().encode_chat_completion(request).tokens)


def test_models_lists_the_spec_model_name(client: httpx.Client,
                                          vllm_server: VllmServer) -> None:
    response = client.get("/v1/models")
    assert response.status_code == 200
    [model] = response.json()["data"]
    assert model["id"] == vllm_server.endpoint.served_model_name
    # the gateway's context_window for the model is the same number
    assert model["max_model_len"] == vllm_server.max_model_len


def test_replica_api_key_is_required(vllm_endpoint: VllmEndpoint) -> None:
    """As in the cloud, vLLM answers only requests carrying VLLM_API_KEY."""
    response = httpx.get(f"{vllm_endpoint.base_url}/v1/models", timeout=REQUEST_TIMEOUT_SECONDS)
    assert response.status_code == 401


def test_chat_completion_is_real_greedy_and_counted(client: httpx.Client,
                                                    vllm_endpoint: VllmEndpoint) -> None:
    body = chat_body(vllm_endpoint.served_model_name)
    first = client.post("/v1/chat/completions", json=body)
    assert first.status_code == 200, first.text
    reply = first.json()
    assert reply["object"] == "chat.completion"
    assert reply["model"] == vllm_endpoint.served_model_name
    choice = reply["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str) and choice["message"]["content"]
    assert choice["finish_reason"] == "length"

    usage = reply["usage"]
    assert usage["prompt_tokens"] > 0
    assert usage["completion_tokens"] == MAX_TOKENS
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    # vLLM tokenizes with mistral-common in Mistral mode: its count is the gateway's count.
    assert usage["prompt_tokens"] == mistral_v1_prompt_tokens(PROMPT)

    again = client.post("/v1/chat/completions", json=body).json()
    assert again["choices"][0]["message"]["content"] == choice["message"]["content"]


def test_stream_matches_the_completion_and_ends_with_usage(client: httpx.Client,
                                                           vllm_endpoint: VllmEndpoint) -> None:
    model = vllm_endpoint.served_model_name
    whole = client.post("/v1/chat/completions", json=chat_body(model)).json()

    events = stream_events(client, chat_body(
        model, stream=True, stream_options={"include_usage": True}))
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == model for c in chunks)

    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == []
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    assert {k: usage_chunk["usage"][k] for k in counts} == {k: whole["usage"][k] for k in counts}
    assert usage_chunk["usage"]["completion_tokens"] == MAX_TOKENS
    content_chunks = chunks[:-1]
    assert all(c.get("usage") is None for c in content_chunks)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in content_chunks)
    assert text == whole["choices"][0]["message"]["content"]
    assert content_chunks[-1]["choices"][0]["finish_reason"] == "length"


def gauges(client: httpx.Client) -> dict[str, float]:
    """The ``vllm:`` router gauges from /metrics (one engine, one model: one sample each)."""
    response = client.get("/metrics")
    assert response.status_code == 200
    values: dict[str, float] = {}
    for line in response.text.splitlines():
        name = line.split("{")[0].split(" ")[0]
        if name in REQUIRED_VLLM_GAUGES:
            values[name] = float(line.rsplit(" ", 1)[1])
    return values


def test_metrics_gauges_show_a_request_in_flight(client: httpx.Client,
                                                 vllm_endpoint: VllmEndpoint) -> None:
    """The gauges the router's load view reads move with real load, and settle after it."""
    body = chat_body(vllm_endpoint.served_model_name, max_tokens=IN_FLIGHT_MAX_TOKENS,
                     stream=True)
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        lines = response.iter_lines()
        while not next(lines).startswith("data: "):
            pass  # the first event: the request is scheduled and decoding
        busy = gauges(client)
        for _ in lines:
            pass
    assert set(busy) == set(REQUIRED_VLLM_GAUGES), "router gauges missing from vLLM /metrics"
    assert busy["vllm:num_requests_running"] >= 1
    assert busy["vllm:kv_cache_usage_perc"] > 0
    idle = gauges(client)
    assert idle["vllm:num_requests_running"] == 0
    assert idle["vllm:num_requests_waiting"] == 0


def test_engine_runs_the_mixture_of_experts_path(client: httpx.Client,
                                                 vllm_server: VllmServer) -> None:
    """The tiny model takes vLLM's fused-MoE layer, as Mixtral 8x7B does on GPUs."""
    log = vllm_server.log_text()
    assert "MixtralForCausalLM" in log
    assert "CPU Unquantized MoE backend" in log


REFERENCE_GENERATE = """
import sys, torch
from mistral_common.protocol.instruct.messages import UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from transformers import MixtralForCausalLM

model_dir, prompt, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
tok = MistralTokenizer.v1()
ids = tok.encode_chat_completion(ChatCompletionRequest(messages=[UserMessage(content=prompt)]))
model = MixtralForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
out = model.generate(torch.tensor([ids.tokens]), max_new_tokens=n, min_new_tokens=n,
                     do_sample=False)
sys.stdout.write(tok.decode(out[0, len(ids.tokens):].tolist()))
"""


def test_greedy_output_matches_the_transformers_reference(
    client: httpx.Client, vllm_server: VllmServer
) -> None:
    """vLLM's CPU MoE kernels compute what transformers' reference Mixtral computes.

    Random weights make the text gibberish, so equality token for token is a sharp check.
    """
    python = vllm_local.vllm_python()
    reference = subprocess.run(
        [str(python), "-c", REFERENCE_GENERATE, str(vllm_server.model_path), PROMPT,
         str(MAX_TOKENS)],
        check=False, capture_output=True, text=True, timeout=REFERENCE_TIMEOUT_SECONDS,
        env={**os.environ, **vllm_local.CPU_ENV},
    )
    assert reference.returncode == 0, reference.stderr[-2000:]
    body = chat_body(vllm_server.endpoint.served_model_name)
    served = client.post("/v1/chat/completions", json=body).json()
    assert served["choices"][0]["message"]["content"] == reference.stdout
