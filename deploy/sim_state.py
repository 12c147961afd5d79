"""The simulator's run-time state: queue and counters, recorded requests, knobs, /metrics text.

One `SimState` per app (no module globals), so tests can run several simulators in a process.
The queue mirrors vLLM's scheduler shape: an `asyncio.Semaphore(capacity)` is the running batch;
requests blocked on it are "waiting". KV-cache use is the tokens of running requests (prompt plus
planned completion) over `kv_cache_tokens`, which is plausible enough for load-aware routing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Final

import orjson
from starlette.requests import Request
from starlette.responses import Response

if TYPE_CHECKING:
    from deploy.sim import SimConfig

# Knobs /sim/config may change at run time, with the Python types each accepts.
RUNTIME_FIELDS: Final[dict[str, tuple[type, ...]]] = {
    "ttft_seconds": (int, float),
    "itl_seconds": (int, float),
    "fail_rate": (int, float),
    "fail_status": (int,),
    "hang": (bool,),
    "classifier": (bool,),
    "classifier_garbage": (bool,),
    "reply_tokens": (int,),
}
_ERROR_TYPES: Final = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
                       429: "RateLimitError", 503: "ServiceUnavailableError"}


def error_response(status: int, message: str, param: str | None = None) -> Response:
    """vLLM's error envelope: {"error": {"message", "type", "param", "code"}}."""
    error_type = _ERROR_TYPES.get(status, "InternalServerError" if status >= 500 else "Error")
    body = {"error": {"message": message, "type": error_type, "param": param, "code": status}}
    return Response(orjson.dumps(body), status, media_type="application/json")


class SimState:
    """Mutable state shared by the simulator's handlers (single event loop, so no locks)."""

    def __init__(self, config: SimConfig) -> None:
        self.knobs = config
        self.rng = random.Random(config.seed)
        self.created = int(time.time())
        self.kv_cache_tokens = config.kv_cache_tokens
        self._slots = asyncio.Semaphore(config.capacity)
        self.records: deque[dict[str, Any]] = deque(maxlen=config.record)
        self.running = 0
        self.waiting = 0
        self.live_tokens = 0
        self.reset()

    def reset(self) -> None:
        self.records.clear()
        self.received = 0
        self.completed = 0
        self.failed = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0

    def stats(self) -> dict[str, int]:
        """received: authorised chat requests (valid or not); completed: answered with 200 and,
        for streams, sent to the end; failed: injected failures."""
        return {"received": self.received, "running": self.running, "waiting": self.waiting,
                "completed": self.completed, "failed": self.failed}

    def record(self, request: Request, body: Any) -> None:
        if self.records.maxlen:
            self.records.append({
                "path": request.url.path,
                "body": body,
                "authorization": "authorization" in request.headers,
                "x_request_id": request.headers.get("x-request-id"),
            })

    def update_knobs(self, changes: Any) -> None:
        """Apply a /sim/config body; raises TypeError/ValueError naming the offending field."""
        if not isinstance(changes, dict):
            raise TypeError("expected a JSON object")
        for name, value in changes.items():
            allowed = RUNTIME_FIELDS.get(name)
            if allowed is None:
                raise ValueError(f"unknown field {name!r}; allowed: {', '.join(RUNTIME_FIELDS)}")
            if not isinstance(value, allowed) or (bool not in allowed and isinstance(value, bool)):
                raise TypeError(f"field {name!r} has the wrong type: {value!r}")
        self.knobs = dataclasses.replace(self.knobs, **changes)

    @asynccontextmanager
    async def slot(self, kv_tokens: int, prompt_tokens: int) -> AsyncIterator[None]:
        """Hold one place in the running batch for a request, waiting in the queue if full."""
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        self.live_tokens += kv_tokens
        self.prompt_tokens_total += prompt_tokens
        try:
            yield
        finally:
            self.running -= 1
            self.live_tokens -= kv_tokens
            self._slots.release()


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def metrics_text(state: SimState, model: str) -> str:
    """vLLM's Prometheus exposition for the gauges and counters a router reads, by hand."""
    labels = f'{{engine="0",model_name="{_escape(model)}"}}'
    kv_usage = min(1.0, state.live_tokens / state.kv_cache_tokens)
    lines = []
    for name, help_text, value in (
        ("vllm:num_requests_running", "Number of requests in model execution batches.",
         state.running),
        ("vllm:num_requests_waiting", "Number of requests waiting to be processed.",
         state.waiting),
        ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", kv_usage),
    ):
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge",
                  f"{name}{labels} {float(value)!r}"]
    for name, help_text, value in (
        ("vllm:prompt_tokens", "Number of prefill tokens processed.",
         state.prompt_tokens_total),
        ("vllm:generation_tokens", "Number of generation tokens processed.",
         state.generation_tokens_total),
    ):
        lines += [f"# HELP {name}_total {help_text}", f"# TYPE {name}_total counter",
                  f"{name}_total{labels} {float(value)!r}"]
    return "\n".join(lines) + "\n"
