"""Every Prometheus metric the gateway exports, defined once.

Names carry the `plateforme_` prefix and their unit; `_total` only on counters. Labels are
bounded: model (from the config), replica (a registered URL), status class, limit kind, store
operation. Never a key id: per-key usage lives in the usage ledger.

With several uvicorn workers, prometheus-client's multiprocess mode is used: the
`PROMETHEUS_MULTIPROC_DIR` environment variable (set by `plateforme gateway serve --workers N`)
makes every worker write its values to files there, and `/metrics` merges them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

LATENCY_BUCKETS_SECONDS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
)
TTFT_BUCKETS_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
ITL_BUCKETS_SECONDS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
STORE_BUCKETS_SECONDS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, 2.0)


def status_class(status: int) -> str:
    return f"{status // 100}xx"


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


@dataclass(frozen=True)
class Metrics:
    registry: CollectorRegistry
    requests: Counter
    request_duration: Histogram
    time_to_first_token: Histogram
    inter_token_latency: Histogram
    tokens: Counter
    rate_limited: Counter
    moderation: Counter
    upstream_errors: Counter
    upstream_retries: Counter
    replica_healthy: Gauge
    replica_outstanding: Gauge
    store_latency: Histogram
    store_up: Gauge
    store_failures: Counter

    @classmethod
    def create(cls) -> Metrics:
        """A fresh registry per app, so two apps in one process (tests) never collide."""
        registry = CollectorRegistry(auto_describe=True)
        live: Literal["livesum"] = "livesum"  # multiprocess gauge mode: sum over live workers
        return cls(
            registry=registry,
            requests=Counter(
                "plateforme_requests_total", "Requests answered, by route, model and status.",
                ["route", "model", "status_class"], registry=registry),
            request_duration=Histogram(
                "plateforme_request_duration_seconds", "End-to-end request latency.",
                ["model", "stream"], buckets=LATENCY_BUCKETS_SECONDS, registry=registry),
            time_to_first_token=Histogram(
                "plateforme_time_to_first_token_seconds",
                "Time from request arrival to the first streamed chunk sent to the client.",
                ["model"], buckets=TTFT_BUCKETS_SECONDS, registry=registry),
            inter_token_latency=Histogram(
                "plateforme_inter_token_latency_seconds",
                "Mean gap between streamed chunks, one observation per stream.",
                ["model"], buckets=ITL_BUCKETS_SECONDS, registry=registry),
            tokens=Counter(
                "plateforme_tokens_total", "Tokens by model and kind (prompt, completion, "
                "guardrail).", ["model", "kind"], registry=registry),
            rate_limited=Counter(
                "plateforme_rate_limited_total", "Requests refused by a limit, by limit kind.",
                ["model", "limit"], registry=registry),
            moderation=Counter(
                "plateforme_moderation_total", "Moderation outcomes (guardrail applied, input "
                "flagged, classifier errors).", ["model", "outcome"], registry=registry),
            upstream_errors=Counter(
                "plateforme_upstream_errors_total", "Failed upstream attempts by replica and "
                "kind (connect, timeout, status_5xx, stream).", ["model", "replica", "kind"],
                registry=registry),
            upstream_retries=Counter(
                "plateforme_upstream_retries_total", "Requests retried on another replica.",
                ["model", "replica"], registry=registry),
            replica_healthy=Gauge(
                "plateforme_replica_healthy", "1 when the replica is in rotation, 0 ejected.",
                ["model", "replica"], registry=registry, multiprocess_mode="liveall"),
            replica_outstanding=Gauge(
                "plateforme_replica_outstanding_requests", "Requests in flight per replica.",
                ["model", "replica"], registry=registry, multiprocess_mode=live),
            store_latency=Histogram(
                "plateforme_store_latency_seconds", "Store round trip latency by operation.",
                ["op"], buckets=STORE_BUCKETS_SECONDS, registry=registry),
            store_up=Gauge(
                "plateforme_store_up", "1 when the store answered its last call, else 0.",
                registry=registry, multiprocess_mode="liveall"),
            store_failures=Counter(
                "plateforme_store_failures_total", "Store calls that failed, by operation.",
                ["op"], registry=registry),
        )


def _forget_dead_workers(directory: str) -> None:
    """Drop the `live*` gauge files of workers that no longer run.

    prometheus-client keeps a worker's gauges until `mark_process_dead(pid)` is called, and
    uvicorn's supervisor never calls it: a worker it killed and replaced (a crash, a missed
    health check) would otherwise export its last replica health and store state forever,
    under its dead pid, next to the live workers' values. Counters and histograms stay: what
    a dead worker counted did happen.
    """
    for path in Path(directory).glob("gauge_live*_*.db"):
        pid = path.stem.rsplit("_", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            multiprocess.mark_process_dead(int(pid), directory)  # type: ignore[no-untyped-call]


def _alive(pid: int) -> bool:
    """Whether `pid` runs: a killed worker is a zombie until its supervisor reaps it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # no procfs here: ask the kernel whether the pid exists at all
        try:
            os.kill(pid, 0)  # signal 0: an existence check, nothing is sent
        except ProcessLookupError:
            return False
        except PermissionError:  # it exists, under another user
            pass
        return True
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def render(metrics: Metrics) -> tuple[bytes, str]:
    """The exposition text: this process's registry, or every worker's in multiprocess mode."""
    directory = multiprocess_dir()
    if directory:
        _forget_dead_workers(directory)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(metrics.registry), CONTENT_TYPE_LATEST
