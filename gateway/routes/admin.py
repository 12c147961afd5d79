"""The admin API (`/admin/v1`): keys, usage and replica registrations, behind the admin token.

Mounted only when `PLATEFORME_ADMIN_TOKEN` is set (and long enough). The token is compared
in constant time; an API key is never accepted here. A key's secret is returned once, by
the create call, and never again.
"""

from __future__ import annotations

import dataclasses
import hmac
import re
import time
from typing import Any

from fastapi import APIRouter, Depends
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.app import Services
from gateway.auth import bearer_token
from gateway.config import _check_http_url
from gateway.errors import AuthenticationFailed, BadRequest, NotFound
from gateway.keys import generate_key, looks_like_key
from gateway.routes.chat import services
from gateway.schemas import (
    KeyCreate,
    KeyUpdate,
    ReplicaRegistration,
    openapi_body,
    parse_body,
    validate,
)
from gateway.store import KeyRecord

_DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_KEY_ID = re.compile(r"^[0-9a-f]{16}$")


def require_admin(request: Request) -> Services:
    svc = services(request)
    token = bearer_token(request.headers.get("authorization"))
    if looks_like_key(token):
        raise AuthenticationFailed("API keys are not accepted on the admin API; use the "
                                   "admin token.", code="invalid_admin_token")
    assert svc.admin_token is not None  # the router is mounted only with a token
    if not hmac.compare_digest(token.encode(), svc.admin_token.encode()):
        raise AuthenticationFailed("Invalid admin token.", code="invalid_admin_token")
    return svc


router = APIRouter(prefix="/admin/v1", dependencies=[Depends(require_admin)])


def _check_refs(svc: Services, plan: str | None, models: list[str] | None) -> None:
    if plan is not None and plan not in svc.catalog.plans:
        raise BadRequest(f"Unknown plan {plan!r}; configured: {sorted(svc.catalog.plans)}.",
                         param="plan")
    for name in models or ():
        if name != "*" and svc.models.get(name) is None:
            raise BadRequest(f"Unknown model {name!r}.", param="models")


def _canonical(svc: Services, models: list[str] | None) -> tuple[str, ...] | None:
    if models is None:
        return None
    return tuple(m if m == "*" else svc.models.get(m).name for m in models)  # type: ignore[union-attr]


async def _key(svc: Services, key_id: str) -> KeyRecord:
    record = await svc.store.get_key(key_id) if _KEY_ID.match(key_id) else None
    if record is None:
        raise NotFound(f"No key with id {key_id!r}.", code="key_not_found")
    return record


@router.post("/keys", status_code=201, openapi_extra=openapi_body(KeyCreate))
async def create_key(request: Request) -> Response:
    svc = services(request)
    body = validate(KeyCreate, parse_body(await request.body()))
    _check_refs(svc, body.plan, body.models)
    now = time.time()
    expires_at = body.expires_at or (now + body.expires_in if body.expires_in else None)
    new = generate_key()
    record = KeyRecord(
        id=new.id, hash=new.hash, owner=body.owner, plan=body.plan, created_at=now,
        expires_at=expires_at, rpm=body.rpm, tpm=body.tpm, max_concurrent=body.max_concurrent,
        monthly_tokens=body.monthly_tokens, models=_canonical(svc, body.models),
        moderation=body.moderation, input_moderation=body.input_moderation, name=body.name)
    await svc.store.create_key(record)
    return JSONResponse({**record.public(), "key": new.key}, status_code=201)


@router.get("/keys")
async def list_keys(request: Request) -> Response:
    records = await services(request).store.list_keys()
    return JSONResponse({"object": "list", "data": [r.public() for r in records]})


@router.get("/keys/{key_id}")
async def show_key(request: Request, key_id: str) -> Response:
    return JSONResponse((await _key(services(request), key_id)).public())


@router.patch("/keys/{key_id}", openapi_extra=openapi_body(KeyUpdate))
async def update_key(request: Request, key_id: str) -> Response:
    svc = services(request)
    await _key(svc, key_id)
    body = validate(KeyUpdate, parse_body(await request.body()))
    changes = body.model_dump(exclude_unset=True)
    _check_refs(svc, changes.get("plan"), changes.get("models"))
    if "models" in changes:
        changes["models"] = _canonical(svc, changes["models"])
    record = await svc.store.update_key(key_id, changes)
    if record is None:
        raise NotFound(f"No key with id {key_id!r}.", code="key_not_found")
    return JSONResponse(record.public())


@router.delete("/keys/{key_id}")
async def revoke_key(request: Request, key_id: str) -> Response:
    svc = services(request)
    await _key(svc, key_id)
    record = await svc.store.revoke_key(key_id)
    assert record is not None
    return JSONResponse(record.public())


@router.get("/usage")
async def usage(request: Request, key_id: str | None = None, since: str | None = None
                ) -> Response:
    if since is not None and not _DAY.match(since):
        raise BadRequest("since must be a UTC day, YYYY-MM-DD.", param="since")
    rows = await services(request).store.usage(key_id=key_id, since=since)
    return JSONResponse({"object": "list", "data": [dataclasses.asdict(r) for r in rows]})


def _model(svc: Services, name: str) -> str:
    resolved = svc.models.get(name)
    if resolved is None:
        raise NotFound(f"The model {name!r} does not exist.", code="model_not_found")
    return resolved.name


@router.get("/models/{name}/replicas")
async def list_replicas(request: Request, name: str) -> Response:
    svc = services(request)
    model = _model(svc, name)
    registered = {r.url for r in await svc.store.list_replicas() if r.model == model}
    data: list[dict[str, Any]] = [{"url": r.url, "source": "config" if r.static else "registered",
             "healthy": not r.ejected, "outstanding": r.outstanding,
             "consecutive_failures": r.consecutive_failures,
             # vLLM's own gauges as the router last scraped them (0 until a scrape)
             "vllm_running": r.vllm_running, "vllm_waiting": r.vllm_waiting,
             "kv_cache_usage": r.kv_cache_usage}
            for r in svc.pool.replicas(model)]
    known = {d["url"] for d in data}
    data += [{"url": url, "source": "registered", "healthy": None, "outstanding": 0,
              "consecutive_failures": 0} for url in sorted(registered - known)]
    return JSONResponse({"object": "list", "model": model, "data": data})


def _url(value: str) -> str:
    try:
        return _check_http_url(value)
    except ValueError as exc:
        raise BadRequest(str(exc), param="url") from None


@router.post("/models/{name}/replicas", status_code=201,
             openapi_extra=openapi_body(ReplicaRegistration))
async def register_replica(request: Request, name: str) -> Response:
    svc = services(request)
    model = _model(svc, name)
    body = validate(ReplicaRegistration, parse_body(await request.body()))
    url = _url(body.url)
    added = await svc.store.add_replica(model, url)
    await svc.health.refresh_registry()
    return JSONResponse({"model": model, "url": url, "added": added},
                        status_code=201 if added else 200)


@router.delete("/models/{name}/replicas")
async def deregister_replica(request: Request, name: str, url: str | None = None) -> Response:
    svc = services(request)
    model = _model(svc, name)
    if url is None:
        raw = await request.body()
        url = parse_body(raw).get("url") if raw else None
    if not isinstance(url, str):
        raise BadRequest("Give the replica's url (query parameter or JSON body).", param="url")
    removed = await svc.store.remove_replica(model, _url(url))
    await svc.health.refresh_registry()
    if not removed:
        raise NotFound(f"{url!r} is not a registered replica of {model!r}.",
                       code="replica_not_found")
    return JSONResponse({"model": model, "url": _url(url), "removed": True})

