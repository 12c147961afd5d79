"""The app factory: `create_app(settings, catalog)` builds everything once, in `lifespan`,
into one frozen `Services` value; importing this module does nothing.

Middleware is pure ASGI (no `BaseHTTPMiddleware`, which would buffer streams): it assigns the
request id, bounds the request body's size and arrival time, and records the per-request
metric and the one access-log line.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.auth import Authenticator
from gateway.catalog import ModelCatalog
from gateway.config import Catalog, Settings, check_admin_token, env, store_url
from gateway.errors import ConfigError, GatewayError
from gateway.health import HealthKeeper
from gateway.limiter import Limiter
from gateway.metrics import Metrics
from gateway.middleware import RequestContext
from gateway.moderation import GuardrailChoice, guardrail_for
from gateway.proxy import Upstream
from gateway.routing import ReplicaPool
from gateway.store import Store, open_store
from gateway.tokens import TokenCounter

log = logging.getLogger("plateforme.gateway")


@dataclass(frozen=True)
class ModelRuntime:
    """Per-model values computed at start-up so the request path only looks them up."""

    counter: TokenCounter
    guardrail: GuardrailChoice
    upstream_headers: dict[str, str]


class Background:
    """Tasks that must finish even if the request that started them is gone (settlements);
    shutdown waits for them up to the drain timeout."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed: %r", task.exception())

    async def drain(self, timeout: float) -> None:
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=timeout)


@dataclass(frozen=True)
class Services:
    settings: Settings
    catalog: Catalog
    models: ModelCatalog
    runtime: dict[str, ModelRuntime]
    store: Store
    auth: Authenticator
    limiter: Limiter
    pool: ReplicaPool
    upstream: Upstream
    health: HealthKeeper
    metrics: Metrics
    admin_token: str | None
    background: Background

    def spawn(self, coro: Awaitable[Any]) -> None:
        """Run `coro` in the background, tracked so shutdown waits for it."""
        self.background.spawn(coro)


def _runtime(catalog: Catalog, counters: dict[str | None, TokenCounter]) -> dict[str, ModelRuntime]:
    runtime = {}
    for name, model in catalog.models.items():
        if model.tokenizer not in counters:
            counters[model.tokenizer] = TokenCounter(model.tokenizer)
        counter = counters[model.tokenizer]
        g_name, guardrail = guardrail_for(catalog.moderation, model.guardrail)
        headers = {"content-type": "application/json"}
        if model.replica_api_key_env:
            secret = env(model.replica_api_key_env)
            if not secret:
                raise ConfigError(f"models.{name}.replica_api_key_env: environment variable "
                                  f"{model.replica_api_key_env!r} is not set")
            headers["authorization"] = f"Bearer {secret}"
        runtime[name] = ModelRuntime(
            counter=counter,
            guardrail=GuardrailChoice(g_name, guardrail.version, guardrail.text,
                                      counter.count_text(guardrail.text)),
            upstream_headers=headers)
    return runtime


def create_app(settings: Settings, catalog: Catalog, *,
               store_factory: Callable[[str], Store] = open_store) -> FastAPI:
    """Validate what can be validated now (admin token, tokenizers, replica keys), then leave
    all I/O to the lifespan."""
    admin_token = check_admin_token(settings.admin_token) if settings.admin_token else None
    runtime = _runtime(catalog, {})
    metrics = Metrics.create()
    server = catalog.server

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = store_factory(store_url(catalog, settings))
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=30),
            # Our own User-Agent rather than `skip_auto_headers`: skipping costs a sorted
            # CIMultiDict build and a header copy on every request (~5% of a request's CPU).
            auto_decompress=False, headers={"User-Agent": "plateforme-gateway"})
        pool = ReplicaPool({n: m.replicas for n, m in catalog.models.items()}, catalog.routing)
        limiter = Limiter(store, catalog.limits, metrics)
        background = Background()
        services = Services(
            settings=settings, catalog=catalog, models=ModelCatalog(catalog, int(time.time())),
            runtime=runtime, store=store, auth=Authenticator(store, catalog, server),
            limiter=limiter, pool=pool, metrics=metrics, admin_token=admin_token,
            upstream=Upstream(session, pool, metrics,
                              connect_timeout=server.connect_timeout_seconds,
                              read_timeout=server.read_timeout_seconds,
                              request_timeout=server.request_timeout_seconds,
                              max_attempts=catalog.routing.max_attempts,
                              spawn=background.spawn),
            health=HealthKeeper(pool, store, session, metrics,
                                lambda model: runtime[model].upstream_headers,
                                probe_interval=catalog.routing.probe_interval_seconds,
                                refresh_interval=catalog.routing.refresh_seconds,
                                scrape=catalog.routing.metrics_scrape),
            background=background,
        )
        try:
            await services.health.refresh_registry()
            metrics.store_up.set(1)
        except GatewayError:
            metrics.store_up.set(0)
            log.warning("store unreachable at start; serving by the outage policy")
        loops = [asyncio.create_task(coro) for coro in (
            services.auth.watch_versions(), services.health.run_registry(),
            services.health.run_probes(), services.limiter.replay_pending())]
        app.state.services = services
        log.info("gateway started", extra={"models": len(catalog.models),
                                           "admin_api": admin_token is not None})
        try:
            yield
        finally:
            for task in loops:
                task.cancel()
            await asyncio.gather(*loops, return_exceptions=True)
            # settlements still being written: the ledger must get them
            await background.drain(server.drain_timeout_seconds)
            await session.close()
            await store.close()

    app = FastAPI(title="Plateforme gateway", version="0.1.0", lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    install_error_handlers(app)
    from gateway.routes import admin, chat, moderations, ops

    app.include_router(chat.router)
    app.include_router(moderations.router)
    app.include_router(ops.router)
    if admin_token is not None:
        app.include_router(admin.router)
    else:
        log.warning("PLATEFORME_ADMIN_TOKEN is not set: the admin API is disabled")
    # The chat route stays registered (OpenAPI) but is served straight from the middleware:
    # the framework's router and dependency layers cost ~10% of a request's CPU.
    app.add_middleware(RequestContext, metrics=metrics, max_body_bytes=server.max_body_bytes,
                       body_timeout=server.body_timeout_seconds,
                       direct={("POST", "/v1/chat/completions"):
                               direct_endpoint(chat.chat_completions)})
    return app


def direct_endpoint(endpoint: Callable[[Request], Awaitable[Response]]) -> ASGIApp:
    """An ASGI app for a `Request -> Response` endpoint with the app's error rendering:
    a `GatewayError` leaves in the OpenAI envelope, anything else as a logged 500."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            response = await endpoint(Request(scope, receive, send))
        except GatewayError as exc:
            response = error_response(exc)
        except Exception as exc:
            log.error("unhandled error: %s", type(exc).__name__, exc_info=exc)
            response = error_response(
                GatewayError("The gateway hit an internal error.", code="internal_error"))
        await response(scope, receive, send)

    return app


def error_response(error: GatewayError) -> Response:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves in OpenAI's envelope; nothing leaves as a stack trace."""

    async def gateway_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, GatewayError)
        return error_response(exc)

    async def validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        from gateway.errors import BadRequest
        return error_response(BadRequest(_describe(exc.errors())))

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        from gateway.errors import GatewayError as Base
        error = Base(str(exc.detail), code=None)
        error.status = exc.status_code
        error.type = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(error)

    async def unexpected(request: Request, exc: Exception) -> Response:
        log.error("unhandled error: %s", type(exc).__name__, exc_info=exc)
        error = GatewayError("The gateway hit an internal error.", code="internal_error")
        return error_response(error)

    app.add_exception_handler(GatewayError, gateway_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)


def _describe(errors: Any) -> str:
    parts = []
    for err in list(errors)[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{loc or 'body'}: {err.get('msg', 'invalid')}")
    return "Invalid request: " + "; ".join(parts)
