"""The reference point for CPU per request: the smallest useful proxy (Starlette, uvicorn with
uvloop and httptools, one pooled aiohttp session), no auth, limits, logs or metrics.

On a busy machine CPU time per request inflates for every process alike (caches, frequency,
context switches); measured in the same run, this proxy tells how much of the gateway's cost
is the machine and how much is the gateway's features. Upstream from `BENCH_UPSTREAM_JSON` /
`BENCH_UPSTREAM_SSE` (a request with `"stream": true` goes to the second).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

PATH = "/v1/chat/completions"
HEADERS = {"content-type": "application/json"}
sessions: list[aiohttp.ClientSession] = []


async def chat(request: Request) -> Response:
    body = await request.body()
    stream = b'"stream":true' in body
    base = os.environ["BENCH_UPSTREAM_SSE" if stream else "BENCH_UPSTREAM_JSON"]
    session = sessions[0]
    if not stream:
        async with session.post(base + PATH, data=body, headers=HEADERS) as upstream:
            return Response(await upstream.read(), upstream.status,
                            media_type="application/json")
    upstream = await session.post(base + PATH, data=body, headers=HEADERS)

    async def relay() -> AsyncIterator[bytes]:
        try:
            async for chunk in upstream.content.iter_any():
                yield chunk
        finally:
            upstream.close()

    return StreamingResponse(relay(), media_type="text/event-stream")


async def health(request: Request) -> Response:
    return Response(b"ok")


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    sessions.append(aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)))
    yield
    await sessions.pop().close()


app = Starlette(routes=[Route(PATH, chat, methods=["POST"]), Route("/health", health)],
                lifespan=lifespan)
