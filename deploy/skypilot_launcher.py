"""The SkyPilot launcher: SkyServe services through SkyPilot's Python SDK — the only module that
imports `sky`, always lazily (it costs ~4 s and, for SDK calls, a local API server).

Every SDK call returns a request id (a string) that `get` resolves, so the SDK is injected as a
small object with those plain functions (`SkySDK`); tests pass a fake, production the thin
`RealSky` adapter. SkyPilot's exceptions are mapped onto `deploy.errors` here and nowhere else.
Readiness is read from `serve.status` records (never from `sky serve status --endpoint`, which
prints "No live services." and exits 0).
"""

from __future__ import annotations

import copy
import io
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from deploy.errors import (DeployError, LaunchError, NotDeployed, ReadinessTimeout,
                           SkyPilotNotInstalled, SpecError)
from deploy.launcher import Endpoint, ReplicaStatus, TierSpec, UpOptions
from deploy.planner import Price

FAILED_SERVICE_STATUSES = frozenset({"CONTROLLER_FAILED", "FAILED", "FAILED_CLEANUP"})
PRICE_CLOUDS = ("aws", "gcp", "azure", "lambda", "runpod", "nebius")
PRICE_TIMEOUT_SECONDS = 20.0

# SkyPilot exception class names -> ours, matched along the MRO so no `sky` import is needed to
# classify (and fakes may raise plain RuntimeError/ValueError).
_ERROR_MAP: Mapping[str, type[DeployError]] = {
    "ClusterNotUpError": NotDeployed, "ServeUserTerminatedError": NotDeployed,
    "InvalidSkyPilotConfigError": SpecError, "ValueError": SpecError,
}


def service_name(tier: str) -> str:
    """SkyServe service names are lowercase letters, digits and dashes."""
    return f"plateforme-{tier}"


def to_deploy_error(exc: BaseException, action: str) -> DeployError:
    """Classify an SDK exception; anything unknown is a LaunchError with SkyPilot's message."""
    if isinstance(exc, DeployError):
        return exc
    for klass in type(exc).__mro__:
        if klass.__name__ in _ERROR_MAP:
            return _ERROR_MAP[klass.__name__](f"{action}: {exc}")
    return LaunchError(f"{action}: {type(exc).__name__}: {exc}")


def _name(value: Any) -> str:
    """sky's enums (ServiceStatus.READY) and fakes' strings read the same way."""
    return str(getattr(value, "value", value))


def _http(url: str) -> str:
    return url if url.startswith("http") else f"http://{url}"


class SkySDK(Protocol):
    """The slice of SkyPilot's SDK the launcher uses; each call returns a request id."""

    def task_from_yaml_config(self, config: dict[str, Any],
                              secrets: Sequence[tuple[str, str]]) -> Any: ...
    def serve_up(self, task: Any, service_name: str) -> str: ...
    def serve_status(self, service_names: list[str] | None) -> str: ...
    def serve_down(self, service_names: list[str]) -> str: ...
    def serve_tail_logs(self, service_name: str, replica_id: int, tail: int,
                        output_stream: io.StringIO) -> None: ...
    def get(self, request_id: str) -> Any: ...


class RealSky:
    """`SkySDK` over the real `sky` package (0.14: `sky.serve.up/status/down/tail_logs`,
    `sky.get`, `sky.Task.from_yaml_config`)."""

    def __init__(self) -> None:
        try:
            import sky
            import sky.serve
        except ImportError as exc:
            raise SkyPilotNotInstalled() from exc
        self._sky: Any = sky  # typed loosely: its SDK functions return generic RequestIds

    def task_from_yaml_config(self, config: dict[str, Any],
                              secrets: Sequence[tuple[str, str]]) -> Any:
        task = self._sky.Task.from_yaml_config(copy.deepcopy(config),
                                               secrets_overrides=list(secrets) or None)
        if task.service is not None:
            self._sky.serve.validate_service_task(task, pool=False)
        return task

    def serve_up(self, task: Any, service_name: str) -> str:
        return str(self._sky.serve.up(task, service_name))

    def serve_status(self, service_names: list[str] | None) -> str:
        return str(self._sky.serve.status(service_names))

    def serve_down(self, service_names: list[str]) -> str:
        return str(self._sky.serve.down(service_names))

    def serve_tail_logs(self, service_name: str, replica_id: int, tail: int,
                        output_stream: io.StringIO) -> None:
        self._sky.serve.tail_logs(service_name, target="replica", replica_id=replica_id,
                                  follow=False, output_stream=output_stream, tail=tail)

    def get(self, request_id: str) -> Any:
        return self._sky.get(request_id)


def validate_task_config(config: Mapping[str, Any], secrets: Mapping[str, str]) -> None:
    """SkyPilot's own offline validation of a task + service config (no API server, no network):
    `sky.Task.from_yaml_config` (schema, resources) and `sky.serve.validate_service_task`."""
    sdk = RealSky()
    try:
        sdk.task_from_yaml_config(dict(config), list(secrets.items()))
    except Exception as exc:  # SkyPilot raises ValueError, jsonschema and its own types
        raise SpecError(f"SkyPilot rejects the spec: {exc}") from exc


def catalog_prices(sets: Sequence[tuple[str, int]],
                   timeout_seconds: float = PRICE_TIMEOUT_SECONDS) -> dict[tuple[str, int], Price]:
    """Cheapest on-demand and spot $/h per (accelerator, count) from SkyPilot's catalog
    (`sky.catalog.list_accelerators`). The catalog downloads CSVs with no timeout of its own, so
    the lookup runs in a daemon thread: TimeoutError if it is slow, OSError if it fails."""
    result: dict[str, Any] = {}

    def fetch() -> None:
        try:
            import sky.catalog

            result["offers"] = sky.catalog.list_accelerators(
                gpus_only=True, clouds=list(PRICE_CLOUDS), require_price=True)
        except ImportError:
            result["error"] = OSError("SkyPilot is not installed")
        except Exception as exc:  # network errors surface as requests/urllib/pandas types
            result["error"] = OSError(f"{type(exc).__name__}: {exc}")

    worker = threading.Thread(target=fetch, name="sky-catalog", daemon=True)
    worker.start()
    worker.join(timeout_seconds)
    if worker.is_alive():
        raise TimeoutError(f"SkyPilot's catalog did not answer in {timeout_seconds:.0f} s")
    if "error" in result:
        raise result["error"]
    prices: dict[tuple[str, int], Price] = {}
    wanted = set(sets)
    for name, offers in result["offers"].items():
        for offer in offers:
            key = (name, int(offer.accelerator_count))
            if key not in wanted or offer.price is None:
                continue
            old = prices.get(key)
            if old is None or (old.on_demand or float("inf")) > offer.price:
                spot = offer.spot_price if offer.spot_price == offer.spot_price else None  # NaN
                prices[key] = Price(on_demand=float(offer.price),
                                    spot=float(spot) if spot else None, cloud=offer.cloud)
    return prices


class SkyPilotLauncher:
    """`Launcher` over SkyServe: one service per tier, named `plateforme-<tier>`."""

    def __init__(self, sdk: SkySDK | None = None, *, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._sdk: SkySDK = sdk if sdk is not None else RealSky()
        self._sleep = sleep
        self._clock = clock

    def _call(self, action: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Run one SDK call and resolve its request id, mapping SkyPilot's errors."""
        try:
            request_id = fn(*args)
            return self._sdk.get(request_id)
        except Exception as exc:  # the SDK boundary: SkyPilot raises many unrelated types
            raise to_deploy_error(exc, action) from exc

    def _record(self, name: str) -> dict[str, Any] | None:
        records = self._call(f"status of {name}", self._sdk.serve_status, [name]) or []
        return next((r for r in records if r.get("name") == name), None)

    def up(self, tier: str, spec: TierSpec, options: UpOptions) -> Endpoint:
        name = service_name(tier)
        record = self._record(name)
        if record is not None:
            status = _name(record.get("status"))
            if status == "SHUTTING_DOWN" or status in FAILED_SERVICE_STATUSES:
                raise LaunchError(f"service {name} exists in state {status}: "
                                  f"run `plateforme deploy down {tier}` first")
            options.progress(f"service {name} already exists ({status}); not creating another")
        else:
            try:
                task = self._sdk.task_from_yaml_config(dict(spec.config),
                                                       list(options.secrets.items()))
            except Exception as exc:
                raise SpecError(f"SkyPilot rejects {spec.source}: {exc}") from exc
            options.progress(f"starting service {name} (controller and first replicas)")
            self._call(f"serve up {name}", self._sdk.serve_up, task, name)
        return self._wait_ready(tier, name, options)

    def _wait_ready(self, tier: str, name: str, options: UpOptions) -> Endpoint:
        deadline = self._clock() + options.wait_timeout_seconds
        last = ""
        while True:
            record = self._record(name)
            if record is None:
                raise LaunchError(f"service {name} disappeared while starting")
            status = _name(record.get("status"))
            replicas = self._replicas(record)
            summary = f"{name}: {status}; replicas: " + (
                ", ".join(f"{r.replica_id} {r.status}" for r in replicas) or "none yet")
            if summary != last:
                options.progress(summary)
                last = summary
            ready = [r.url for r in replicas if r.ready and r.url]
            if status == "READY" and ready:
                return Endpoint(tier=tier, name=name, url=_http(str(record.get("endpoint") or "")),
                                replica_urls=tuple(ready))
            if status in FAILED_SERVICE_STATUSES:
                raise LaunchError(f"service {name} failed ({summary}); see "
                                  f"`plateforme deploy logs {tier}`")
            if self._clock() >= deadline:
                raise ReadinessTimeout(
                    f"service {name} not READY after {options.wait_timeout_seconds:.0f} s "
                    f"({summary}); it keeps starting: `plateforme deploy status {tier}`")
            self._sleep(options.poll_interval_seconds)

    @staticmethod
    def _replicas(record: Mapping[str, Any]) -> list[ReplicaStatus]:
        return [ReplicaStatus(replica_id=str(info.get("replica_id")),
                              status=_name(info.get("status")),
                              url=_http(info["endpoint"]) if info.get("endpoint") else None)
                for info in record.get("replica_info") or []]

    def status(self, tier: str) -> list[ReplicaStatus]:
        record = self._record(service_name(tier))
        if record is None:
            raise NotDeployed(f"no SkyServe service {service_name(tier)}")
        return self._replicas(record)

    def down(self, tier: str) -> None:
        name = service_name(tier)
        if self._record(name) is None:
            raise NotDeployed(f"no SkyServe service {name}")
        self._call(f"serve down {name}", self._sdk.serve_down, [name])

    def logs(self, tier: str, tail: int = 100) -> str:
        replicas = self.status(tier)
        if not replicas:
            return ""
        buffer = io.StringIO()
        try:
            self._sdk.serve_tail_logs(service_name(tier), int(replicas[0].replica_id), tail,
                                      buffer)
        except Exception as exc:  # the SDK boundary
            raise to_deploy_error(exc, f"logs of {service_name(tier)}") from exc
        return buffer.getvalue()
