"""Operations endpoints: liveness, readiness and Prometheus metrics (no token needed)."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.errors import StoreUnavailable
from gateway.metrics import render
from gateway.routes.chat import services

router = APIRouter()


@router.get("/health")
async def health() -> Response:
    return JSONResponse({"status": "ok"})


@router.get("/ready")
async def ready(request: Request) -> Response:
    """Ready when the store answers (or the outage policy serves without it) and every
    model has at least one healthy replica."""
    svc = services(request)
    try:
        await svc.store.ping()
        store = "ok"
    except StoreUnavailable:
        store = "unreachable"
    policy = svc.catalog.limits.store_failure
    replicas = {name: svc.pool.healthy_count(name) for name in svc.models.names()}
    store_ready = store == "ok" or policy == "fail_open_local"
    is_ready = store_ready and all(count > 0 for count in replicas.values())
    body = {"status": "ready" if is_ready else "not_ready", "store": store,
            "store_failure_policy": policy, "degraded": store != "ok",
            "healthy_replicas": replicas}
    return JSONResponse(body, status_code=200 if is_ready else 503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    data, content_type = render(services(request).metrics)
    return Response(data, media_type=content_type)
