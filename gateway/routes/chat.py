"""The user-facing API: chat completions and the model list.

The request path reads top to bottom, cheap checks first (an unknown model must not spend
quota): authenticate → parse and validate → resolve the model (404/403) → moderation rewrite
→ count prompt tokens → admit (429) → input moderation when the key requires it (400 flagged,
fail closed) → forward (replica, stream, settle).
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway import moderation
from gateway.app import Services
from gateway.auth import Principal
from gateway.catalog import ResolvedModel
from gateway.errors import BadRequest
from gateway.limiter import Grant, rate_limit_headers
from gateway.proxy import Call, Outcome
from gateway.routes.moderations import screen_input
from gateway.schemas import ChatRequest, openapi_body, parse_body, validate

router = APIRouter()
MODERATION_HEADER = "x-plateforme-moderation"

CHAT_OPENAPI: dict[str, Any] = openapi_body(ChatRequest)


def services(request: Request) -> Services:
    svc: Services = request.app.state.services
    return svc


def upstream_body(data: dict[str, Any], req: ChatRequest, model: ResolvedModel,
                  messages: list[dict[str, Any]], max_tokens: int) -> bytes:
    """The caller's own parameters, with the gateway's few rewrites."""
    body = dict(data)
    body["model"] = model.config.upstream_model
    body["messages"] = messages
    body.pop("safe_prompt", None)
    body.pop("max_completion_tokens", None)
    body["max_tokens"] = max_tokens
    seed = body.pop("random_seed", None)
    if seed is not None:
        body["seed"] = seed
    if req.stream:  # always ask for usage, to count tokens; relayed only if asked for
        body["stream_options"] = {**(req.stream_options or {}), "include_usage": True}
    return orjson.dumps(body)


@router.post("/v1/chat/completions", openapi_extra=CHAT_OPENAPI)
async def chat_completions(request: Request) -> Response:
    svc = services(request)
    started = time.perf_counter()
    principal = await svc.auth.authenticate(request.headers.get("authorization"))
    data = parse_body(await request.body())
    req = validate(ChatRequest, data)
    model = svc.models.resolve(req.model, principal)
    runtime = svc.runtime[model.name]
    info = request.scope["state"]["log"]
    info.update(model=model.name, key_id=principal.key_id, stream=req.stream)

    max_tokens = req.max_tokens or req.max_completion_tokens or model.config.default_max_tokens
    applied = moderation.apply(data["messages"], principal, req.safe_prompt, runtime.guardrail)
    prompt_tokens = runtime.counter.count_chat(applied.messages)
    if prompt_tokens + max_tokens > model.config.context_window:
        raise BadRequest(
            f"This request needs {prompt_tokens} prompt tokens plus max_tokens {max_tokens}, "
            f"more than the model's context window of {model.config.context_window}.",
            param="max_tokens", code="context_length_exceeded")
    grant = await svc.limiter.admit(principal, model.name, prompt_tokens,
                                    max_tokens * (req.n or 1))
    if principal.input_moderation:  # after admission, so flagged floods still spend the limits
        await screen_input(svc, principal, model.name, data["messages"], grant)
    if applied.guardrail is not None:
        svc.metrics.moderation.labels(model.name, "guardrail").inc()

    headers = rate_limit_headers(grant.decision)
    headers[MODERATION_HEADER] = applied.header()
    call = Call(model=model.name,
                payload=upstream_body(data, req, model, applied.messages, max_tokens),
                stream=req.stream, client_wants_usage=req.wants_usage(),
                headers=runtime.upstream_headers, response_headers=headers,
                affinity=req.user, started=started)
    return await svc.upstream.forward(call, _settler(svc, principal, model.name, grant,
                                                     applied.guardrail_tokens, info))


def _settler(svc: Services, principal: Principal, model: str, grant: Grant,
             guardrail_tokens: int, info: dict[str, Any]) -> Any:
    """Settlement for this request: refund, free the slot, ledger, token metrics, log fields.
    The guardrail's tokens are reported apart from the caller's prompt tokens."""

    def settle(outcome: Outcome) -> Any:
        reached = outcome.prompt_tokens is not None or outcome.completion_tokens > 0
        total_prompt = outcome.prompt_tokens if outcome.prompt_tokens is not None else (
            grant.prompt_tokens if reached else 0)
        guardrail = min(guardrail_tokens, total_prompt) if reached else 0
        prompt = total_prompt - guardrail
        info.update(replica=outcome.replica, upstream_status=outcome.status,
                    prompt_tokens=prompt, completion_tokens=outcome.completion_tokens,
                    guardrail_tokens=guardrail)
        tokens = svc.metrics.tokens
        if prompt:
            tokens.labels(model, "prompt").inc(prompt)
        if outcome.completion_tokens:
            tokens.labels(model, "completion").inc(outcome.completion_tokens)
        if guardrail:
            tokens.labels(model, "guardrail").inc(guardrail)
        return svc.limiter.settle(grant, model, prompt, outcome.completion_tokens, guardrail,
                                  outcome.error)

    return settle


@router.get("/v1/models")
async def list_models(request: Request) -> Response:
    svc = services(request)
    principal = await svc.auth.authenticate(request.headers.get("authorization"))
    return JSONResponse(svc.models.listing(principal))
