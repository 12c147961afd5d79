"""POST /v1/moderations (OpenAI's shape) and input moderation of chat requests.

Decisions (also in the README's Moderation section):
- Any valid key may call /v1/moderations, whatever its `models` list: the endpoint exposes
  a fixed classification, not the classifier model itself. The call is admitted against the
  key's limits like a chat request (one request; the classifier prompts plus
  `max_tokens` per input reserved, the unused part refunded) and recorded in the usage
  ledger under the classifier model's name.
- `model` may be omitted or name the classifier (or an alias); anything else is a 400 that
  names the configured classifier. No classifier configured: 404 `moderation_not_configured`.
- Input moderation of a chat (`input_moderation` on the key or its plan) runs after
  admission, so a flood of flagged requests still spends the key's requests and concurrency;
  the classifier call itself is not charged to the key's limits but is recorded in the ledger
  under the classifier model. It fails closed: a classifier error is the chat's error (502
  `classifier_error`, 503, 504) and the chat is not forwarded; no classifier configured is
  a 503 `classifier_not_configured`.
"""

from __future__ import annotations

import secrets
from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.app import Services
from gateway.auth import Principal
from gateway.classifier import MAX_INPUTS, Classifier, Usage
from gateway.errors import BadRequest, ModerationBlocked, NotFound, ServiceUnavailable
from gateway.limiter import Grant, rate_limit_headers
from gateway.schemas import ModerationRequest, openapi_body, parse_body, validate

router = APIRouter()

MODERATIONS_OPENAPI: dict[str, Any] = openapi_body(ModerationRequest)
SCREENED_ROLES = ("system", "user")  # what the caller wrote; assistant and tool turns are not


def classifier_for(svc: Services) -> Classifier | None:
    """The configured classifier, bound to this app's upstream (cheap: no I/O)."""
    config = svc.catalog.moderation.classifier
    if config is None:
        return None
    model = svc.models.get(config.model)
    assert model is not None  # the config validator checked the name
    runtime = svc.runtime[model.name]
    return Classifier(config, model, runtime.counter, runtime.upstream_headers, svc.upstream,
                      svc.metrics)


@router.post("/v1/moderations", openapi_extra=MODERATIONS_OPENAPI)
async def moderations(request: Request) -> Response:
    svc: Services = request.app.state.services
    principal = await svc.auth.authenticate(request.headers.get("authorization"))
    req = validate(ModerationRequest, parse_body(await request.body()))
    classifier = classifier_for(svc)
    if classifier is None:
        raise NotFound("Moderation is not configured on this gateway "
                       "(no moderation.classifier in its config).",
                       code="moderation_not_configured")
    if not classifier.answers_to(req.model):
        raise BadRequest(f"The moderation model here is {classifier.name!r}; omit `model` or "
                         "use that name.", param="model", code="model_not_found")
    texts = [req.input] if isinstance(req.input, str) else list(req.input)
    if len(texts) > MAX_INPUTS:
        raise BadRequest(f"At most {MAX_INPUTS} inputs per request.", param="input")
    info = request.scope["state"]["log"]
    info.update(model=classifier.name, key_id=principal.key_id)

    prompt_tokens = classifier.reservation(texts)
    grant = await svc.limiter.admit(principal, classifier.name, prompt_tokens,
                                    classifier.config.max_tokens * len(texts))
    usage = Usage()
    ok = False
    try:
        verdicts = await classifier.classify(texts, usage)
        ok = True
    finally:  # also on cancellation: the concurrency slot must be freed
        svc.spawn(svc.limiter.settle(grant, classifier.name, usage.prompt_tokens,
                                     usage.completion_tokens, 0, not ok))
    body = {"id": "modr-" + secrets.token_hex(12), "model": classifier.name,
            "results": [v.result() for v in verdicts]}
    return JSONResponse(body, headers=rate_limit_headers(grant.decision))


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p["text"] for p in content
                        if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def caller_text(messages: list[dict[str, Any]]) -> str:
    """The text the caller wrote (system and user turns), the one input moderation screens."""
    parts = (_content_text(m.get("content")) for m in messages
             if isinstance(m, dict) and m.get("role") in SCREENED_ROLES)
    return "\n\n".join(p for p in parts if p.strip())


async def screen_input(svc: Services, principal: Principal, model: str,
                       messages: list[dict[str, Any]], grant: Grant) -> None:
    """Input moderation for an admitted chat, fail closed. On any refusal or failure the
    chat's grant is settled here (nothing used, slot freed) before the error propagates."""
    usage = Usage()
    classifier: Classifier | None = None
    try:
        classifier = classifier_for(svc)
        if classifier is None:
            raise ServiceUnavailable(
                "This API key requires input moderation, but no moderation classifier is "
                "configured on this gateway.", code="classifier_not_configured")
        text = caller_text(messages)
        if not text:
            return  # nothing written to screen (e.g. only images)
        classifier.reservation([text], param="messages")
        (verdict,) = await classifier.classify([text], usage)
        if verdict.flagged:
            svc.metrics.moderation.labels(model, "input_blocked").inc()
            names = ", ".join(verdict.flagged_categories()) or "unspecified"
            raise ModerationBlocked(
                f"The input was flagged by moderation (categories: {names}) and was not sent "
                "to the model.", param="messages")
    except BaseException:
        svc.spawn(svc.limiter.settle(grant, model, 0, 0, 0, True))
        raise
    finally:
        if classifier is not None and usage.calls:
            svc.spawn(svc.limiter.record_usage(principal.key_id, classifier.name,
                                               usage.prompt_tokens, usage.completion_tokens,
                                               bool(usage.errors)))
