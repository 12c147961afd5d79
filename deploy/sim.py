"""`plateforme sim`: a local OpenAI-compatible endpoint that behaves like a vLLM server.

It is what development, tests and load tests run against when no GPU is at hand, so it keeps
vLLM's wire shapes (models list, chat completions, SSE chunks with an optional usage chunk,
`/health`, `/metrics` gauges, `--api-key` behaviour, error envelope) and its scheduling shape
(at most `capacity` requests generating, the rest waiting in a queue), with configurable time to
first token, inter-token latency and failure injection. It never pretends to be a model: every
reply starts with ``[plateforme-sim]`` and every response carries ``x-plateforme-simulator: 1``.

Test control API (no auth; never expose the simulator beyond loopback):
- ``GET|POST /sim/config``: read or change ttft_seconds, itl_seconds, fail_rate, fail_status,
  hang, classifier, classifier_garbage, reply_tokens at run time;
- ``GET /sim/requests``: the last ``record`` chat requests (path, body, whether an
  Authorization header was present — never its value — and x-request-id);
- ``GET /sim/stats``: received / running / waiting / completed / failed counters;
- ``POST /sim/reset``: clears records and counters (live running/waiting gauges excepted).

Reply and token-count rules live in :mod:`deploy.sim_content`.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Final

import orjson
import typer
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deploy.sim_content import SSE_DONE, ChunkEncoder, count_prompt_tokens, plan_reply
from deploy.sim_state import RUNTIME_FIELDS, SimState, error_response, metrics_text

DEFAULT_MODEL: Final = "mistralai/Mixtral-8x7B-Instruct-v0.1"
SIMULATOR_HEADER: Final = (b"x-plateforme-simulator", b"1")
GRACEFUL_SHUTDOWN_SECONDS: Final = 1  # hung requests must not hold Ctrl-C


@dataclass(frozen=True)
class SimConfig:
    """How the simulated vLLM server behaves; the RUNTIME_FIELDS can change via /sim/config."""

    model: str = DEFAULT_MODEL
    ttft_seconds: float = 0.0
    itl_seconds: float = 0.0
    capacity: int = 64
    fail_rate: float = 0.0
    fail_status: int = 500
    hang: bool = False
    api_key: str | None = None
    seed: int = 0
    classifier: bool = False
    classifier_garbage: bool = False
    record: int = 100
    reply_tokens: int = 16
    max_model_len: int = 32768
    kv_cache_tokens: int = 262144

    def __post_init__(self) -> None:
        if self.capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {self.capacity}")
        if not 0.0 <= self.fail_rate <= 1.0:
            raise ValueError(f"fail_rate must be within [0, 1], got {self.fail_rate}")
        if not 400 <= self.fail_status <= 599:
            raise ValueError(f"fail_status must be a 4xx/5xx status, got {self.fail_status}")
        if self.ttft_seconds < 0 or self.itl_seconds < 0:
            raise ValueError("ttft_seconds and itl_seconds must be >= 0")
        if self.reply_tokens < 1 or self.record < 0 or self.max_model_len < 1:
            raise ValueError("reply_tokens and max_model_len must be >= 1, record >= 0")


def _json(content: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(content), status, media_type="application/json")


class _SimulatorHeader:
    """Pure ASGI middleware (no BaseHTTPMiddleware: it would buffer streams) adding the header."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), SIMULATOR_HEADER]
            await send(message)

        await self.app(scope, receive, send_with_header)


def _bad_request(message: str, param: str | None = None) -> Response:
    return error_response(400, message, param)


def _parse_chat(body: Any, model: str) -> Response | None:
    """The minimal validation vLLM would do before scheduling; None when the body is usable."""
    if not isinstance(body, dict):
        return _bad_request("The request body must be a JSON object.")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return _bad_request("`messages` must be a non-empty list.", "messages")
    requested = body.get("model", model)
    if requested != model:
        return error_response(404, f"The model `{requested}` does not exist.", "model")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (type(max_tokens) is not int or max_tokens < 1):
        return _bad_request("`max_tokens` must be a positive integer.", "max_tokens")
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, str) and not (
        isinstance(stop, list) and all(isinstance(s, str) for s in stop)
    ):
        return _bad_request("`stop` must be a string or a list of strings.", "stop")
    return None


def create_sim_app(config: SimConfig) -> Starlette:
    """Build the simulator; all state lives in one SimState owned by this app."""
    state = SimState(config)
    expected_auth = f"Bearer {config.api_key}" if config.api_key else None

    def unauthorized(request: Request) -> Response | None:
        if expected_auth is None or request.headers.get("authorization") == expected_auth:
            return None
        return _json({"error": "Unauthorized"}, 401)  # exactly what vLLM --api-key answers

    async def health(request: Request) -> Response:
        return Response(status_code=200)

    async def version(request: Request) -> Response:
        return _json({"version": "plateforme-sim"})

    async def models(request: Request) -> Response:
        if (denied := unauthorized(request)) is not None:
            return denied
        card = {"id": config.model, "object": "model", "created": state.created,
                "owned_by": "plateforme-sim", "root": config.model, "parent": None,
                "max_model_len": config.max_model_len}
        return _json({"object": "list", "data": [card]})

    async def chat(request: Request) -> Response:
        if (denied := unauthorized(request)) is not None:
            return denied
        state.received += 1
        raw = await request.body()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            state.record(request, raw.decode("utf-8", "replace"))
            return _bad_request("The request body is not valid JSON.")
        state.record(request, body)
        if (invalid := _parse_chat(body, config.model)) is not None:
            return invalid
        knobs = state.knobs
        if knobs.hang:
            await _wait_for_disconnect(request)
            return Response(status_code=499)
        if knobs.fail_rate and state.rng.random() < knobs.fail_rate:
            state.failed += 1
            return error_response(knobs.fail_status, "[plateforme-sim] injected failure")

        messages = body["messages"]
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        prompt_tokens = count_prompt_tokens(messages)
        requested = prompt_tokens + (max_tokens or 0)
        if requested > config.max_model_len:
            return _bad_request(
                f"This model's maximum context length is {config.max_model_len} tokens. However, "
                f"you requested {requested} tokens ({prompt_tokens} in the messages, "
                f"{max_tokens} in the completion). Please reduce the length of the messages or "
                "completion.", "messages")
        stop = body.get("stop")
        plan = plan_reply(
            model=config.model, messages=messages, max_tokens=max_tokens,
            ignore_eos=body.get("ignore_eos") is True,
            stop=[stop] if isinstance(stop, str) else (stop or []),
            seed=body.get("seed", config.seed), reply_tokens=knobs.reply_tokens,
            classifier=knobs.classifier, classifier_garbage=knobs.classifier_garbage,
        )
        completion_id = "chatcmpl-" + secrets.token_hex(16)
        created = int(time.time())
        completion_tokens = len(plan.pieces)
        if body.get("stream") is True:
            options = body.get("stream_options")
            include_usage = isinstance(options, dict) and options.get("include_usage") is True
            encoder = ChunkEncoder(completion_id, created, config.model)

            async def frames() -> AsyncIterator[bytes]:
                async with state.slot(prompt_tokens + completion_tokens, prompt_tokens):
                    if knobs.ttft_seconds:
                        await asyncio.sleep(knobs.ttft_seconds)
                    yield encoder.role()
                    for i, piece in enumerate(plan.pieces):
                        if i and knobs.itl_seconds:
                            await asyncio.sleep(knobs.itl_seconds)
                        state.generation_tokens_total += 1
                        yield encoder.content(piece)
                    yield encoder.finish(plan.finish_reason)
                    if include_usage:
                        yield encoder.usage(prompt_tokens, completion_tokens)
                    yield SSE_DONE
                    state.completed += 1

            return StreamingResponse(frames(), media_type="text/event-stream")

        async with state.slot(prompt_tokens + completion_tokens, prompt_tokens):
            delay = knobs.ttft_seconds + knobs.itl_seconds * max(completion_tokens - 1, 0)
            if delay:
                await asyncio.sleep(delay)
            state.generation_tokens_total += completion_tokens
        state.completed += 1
        return _json({
            "id": completion_id, "object": "chat.completion", "created": created,
            "model": config.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": plan.text},
                         "logprobs": None, "finish_reason": plan.finish_reason,
                         "stop_reason": None}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
            "system_fingerprint": "plateforme-sim",
        })

    async def metrics(request: Request) -> Response:
        return Response(metrics_text(state, config.model),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    async def sim_config(request: Request) -> Response:
        if request.method == "POST":
            try:
                changes = orjson.loads(await request.body())
                state.update_knobs(changes)
            except (orjson.JSONDecodeError, TypeError, ValueError) as exc:
                return _bad_request(f"[plateforme-sim] bad /sim/config body: {exc}")
        return _json({name: getattr(state.knobs, name) for name in RUNTIME_FIELDS})

    async def sim_requests(request: Request) -> Response:
        return _json(list(state.records))

    async def sim_stats(request: Request) -> Response:
        return _json(state.stats())

    async def sim_reset(request: Request) -> Response:
        state.reset()
        return _json(state.stats())

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/version", version, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/sim/config", sim_config, methods=["GET", "POST"]),
        Route("/sim/requests", sim_requests, methods=["GET"]),
        Route("/sim/stats", sim_stats, methods=["GET"]),
        Route("/sim/reset", sim_reset, methods=["POST"]),
    ]
    app = Starlette(routes=routes)
    app.add_middleware(_SimulatorHeader)
    app.state.sim = state
    return app


async def _wait_for_disconnect(request: Request) -> None:
    """Hang mode: the body is read, so the next ASGI message can only be the disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def sim_command(
    port: int = typer.Option(8001, help="Port to listen on."),
    host: str = typer.Option("127.0.0.1", help="Interface to bind (keep it on loopback)."),
    model: str = typer.Option(DEFAULT_MODEL, help="The model name served, as vLLM's --model."),
    ttft: float = typer.Option(0.0, help="Time to first token, seconds."),
    itl: float = typer.Option(0.0, help="Inter-token latency, seconds."),
    capacity: int = typer.Option(64, help="Requests generating at once; more wait in a queue."),
    fail_rate: float = typer.Option(0.0, help="Probability (0..1) of answering --fail-status."),
    fail_status: int = typer.Option(500, help="Status of injected failures."),
    hang: bool = typer.Option(False, help="Accept requests and never answer (timeout tests)."),
    api_key: str | None = typer.Option(
        None, envvar="PLATEFORME_SIM_API_KEY", help="Require 'Authorization: Bearer KEY'."),
    classifier: bool = typer.Option(False, help="Answer chats as a moderation classifier."),
    seed: int = typer.Option(0, help="Seed for failure injection and reply words."),
    record: int = typer.Option(100, help="Keep the last N request bodies for /sim/requests."),
    reply_tokens: int = typer.Option(16, help="Natural reply length in tokens (before EOS)."),
    max_model_len: int = typer.Option(32768, help="Context window reported and enforced."),
) -> None:
    """Run a local OpenAI-compatible endpoint that behaves like a vLLM server (a simulator).

    It answers /v1/models, /v1/chat/completions (JSON and SSE), /health and vLLM-style
    /metrics with configurable latency, queueing and failures; /sim/* controls it at run time.
    """
    import uvicorn

    try:
        config = SimConfig(
            model=model, ttft_seconds=ttft, itl_seconds=itl, capacity=capacity,
            fail_rate=fail_rate, fail_status=fail_status, hang=hang, api_key=api_key or None,
            seed=seed, classifier=classifier, record=record, reply_tokens=reply_tokens,
            max_model_len=max_model_len)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    typer.echo(f"plateforme-sim (a simulator, not a model) serving {model} "
               f"on http://{host}:{port}/v1", err=True)
    uvicorn.run(create_sim_app(config), host=host, port=port, loop="uvloop", http="httptools",
                log_level="warning", access_log=False,
                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS)


if __name__ == "__main__":
    typer.run(sim_command)
