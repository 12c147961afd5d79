"""The simulator as a real process (`python -m deploy.sim`) over real TCP on loopback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest

from deploy.sim import DEFAULT_MODEL
from deploy.sim_content import SIM_MARKER

REPO_ROOT = Path(__file__).resolve().parents[2]
ITL_SECONDS = 0.2
START_TIMEOUT_SECONDS = 20.0
TIMEOUT = httpx.Timeout(10.0, connect=2.0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def start_sim(*args: str, env: dict[str, str] | None = None) -> Iterator[str]:
    """Run the simulator on a free port until the caller is done; always kill it."""
    port = free_port()
    with tempfile.TemporaryFile() as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "deploy.sim", "--port", str(port), *args],
            cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=stderr,
            env={**os.environ, **(env or {})},
        )
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + START_TIMEOUT_SECONDS
            while True:
                assert proc.poll() is None, "simulator exited early"
                try:
                    if httpx.get(f"{base}/health", timeout=1.0).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "simulator did not become healthy"
                time.sleep(0.05)
            yield base
        except BaseException:
            stderr.seek(0)
            sys.stderr.write(stderr.read().decode(errors="replace"))
            raise
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


@pytest.fixture(scope="module")
def sim_url() -> Iterator[str]:
    with start_sim("--itl", str(ITL_SECONDS)) as url:
        yield url


@pytest.fixture
def sim(sim_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sim_url, timeout=TIMEOUT) as client:
        client.post("/sim/config", json={"hang": False, "fail_rate": 0.0}).raise_for_status()
        client.post("/sim/reset").raise_for_status()
        yield client


def timed_stream(client: httpx.Client, body: dict[str, Any]) -> list[tuple[float, Any]]:
    """(seconds since the request was sent, parsed SSE payload) for each event as it arrives."""
    started = time.monotonic()
    events: list[tuple[float, Any]] = []
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["x-plateforme-simulator"] == "1"
        for line in response.iter_lines():
            if line.startswith("data: "):
                payload = line[6:]
                events.append((time.monotonic() - started,
                               payload if payload == "[DONE]" else orjson.loads(payload)))
    return events


@pytest.mark.parametrize("include_usage", [True, False])
def test_stream_is_delivered_chunk_by_chunk(sim: httpx.Client, include_usage: bool) -> None:
    tokens = 6
    body = {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": tokens, "stream": True,
            "stream_options": {"include_usage": include_usage}}
    events = timed_stream(sim, body)
    assert events[-1][1] == "[DONE]"
    content_times = [t for t, e in events[:-1] if e["choices"] and "content" in
                     e["choices"][0]["delta"] and e["choices"][0]["delta"]["content"]]
    assert len(content_times) == tokens
    total = events[-1][0]
    # (tokens - 1) inter-token gaps of 0.2 s: the whole stream takes >= 1 s, and the first
    # token must reach us long before the end — a buffered stream would deliver both at once.
    assert total >= (tokens - 1) * ITL_SECONDS * 0.9
    assert content_times[0] < 0.5
    assert total - content_times[0] >= (tokens - 2) * ITL_SECONDS
    gaps = [b - a for a, b in zip(content_times, content_times[1:])]
    assert min(gaps) >= ITL_SECONDS * 0.5
    usage = [e for _, e in events[:-1] if "usage" in e]
    if include_usage:
        assert [u["choices"] for u in usage] == [[]]
        assert usage[0]["usage"]["completion_tokens"] == tokens
    else:
        assert usage == []


def test_openai_sdk_calls_the_simulator_directly(sim_url: str, sim: httpx.Client) -> None:
    client = openai.OpenAI(base_url=f"{sim_url}/v1", api_key="unused", timeout=10.0,
                           max_retries=0)
    try:
        assert [m.id for m in client.models.list()] == [DEFAULT_MODEL]
        messages: Any = [{"role": "user", "content": "Say hi"}]
        completion = client.chat.completions.create(model=DEFAULT_MODEL, messages=messages,
                                                    max_tokens=3)
        content = completion.choices[0].message.content
        assert content is not None and content.startswith(SIM_MARKER)
        assert completion.usage is not None and completion.usage.completion_tokens == 3
        stream = client.chat.completions.create(
            model=DEFAULT_MODEL, messages=messages, max_tokens=3, stream=True,
            stream_options={"include_usage": True})
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text.startswith(SIM_MARKER)
        assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 3 + 6
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="gpt-4", messages=messages)
    finally:
        client.close()
    assert sim.get("/sim/stats").json()["completed"] == 2


def test_client_disconnect_frees_the_running_slot(sim_url: str, sim: httpx.Client) -> None:
    body = {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 50, "ignore_eos": True, "stream": True}  # ~10 s if not cancelled
    with httpx.Client(base_url=sim_url, timeout=TIMEOUT) as other:
        with other.stream("POST", "/v1/chat/completions", json=body) as response:
            lines = response.iter_lines()  # keep a reference: dropping it closes the response
            assert next(lines).startswith("data: ")
            assert sim.get("/sim/stats").json()["running"] == 1
    deadline = time.monotonic() + 2.0
    while sim.get("/sim/stats").json()["running"] != 0:
        assert time.monotonic() < deadline, "disconnected stream still counted as running"
        time.sleep(0.05)
    assert sim.get("/sim/stats").json()["completed"] == 0


def test_hang_mode_times_out_the_client_but_not_the_server(
    sim_url: str, sim: httpx.Client
) -> None:
    sim.post("/sim/config", json={"hang": True}).raise_for_status()
    body = {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{sim_url}/v1/chat/completions", json=body,
                   timeout=httpx.Timeout(0.5, connect=2.0))
    assert sim.get("/health").status_code == 200
    assert sim.get("/sim/stats").json()["received"] == 1


def test_api_key_from_environment_with_openai_sdk() -> None:
    with start_sim("--model", "tiny", env={"PLATEFORME_SIM_API_KEY": "k-123"}) as base:
        denied = openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0,
                               timeout=10.0)
        allowed = openai.OpenAI(base_url=f"{base}/v1", api_key="k-123", max_retries=0,
                                timeout=10.0)
        try:
            with pytest.raises(openai.AuthenticationError):
                denied.models.list()
            reply = allowed.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
            assert reply.model == "tiny"
            assert reply.choices[0].message.content == f"{SIM_MARKER} simulated"
        finally:
            denied.close()
            allowed.close()
