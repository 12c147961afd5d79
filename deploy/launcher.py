"""The `Launcher` seam: one protocol that the SkyPilot and the local launchers implement.

The CLI talks only to this protocol, so `deploy up --local` and the cloud path run the same flow
(render, up, wait for READY, register) and tests drive either one through the same calls.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

ProgressCallback = Callable[[str], None]

DEFAULT_WAIT_TIMEOUT_SECONDS = 45 * 60.0
"""How long `up` waits for READY: Mixtral's readiness probe alone allows 20 minutes."""


def _silent(_message: str) -> None:
    """Default progress sink: say nothing."""


@dataclass(frozen=True)
class TierSpec:
    """A tier's spec after rendering: the SkyPilot task config as a plain mapping.

    Immutable by convention: renderers build new configs rather than editing this one.
    """

    tier: str
    config: Mapping[str, Any]
    source: str  # the file it came from, for messages

    @property
    def envs(self) -> dict[str, str]:
        """The task's `envs` as strings (the local launcher reads MODEL_ID etc. from here)."""
        raw = self.config.get("envs") or {}
        return {str(k): "" if v is None else str(v) for k, v in raw.items()}

    @property
    def model_id(self) -> str:
        """The model the server loads (`envs.MODEL_ID`); the gateway's `upstream_model`."""
        return self.envs.get("MODEL_ID", "")


@dataclass(frozen=True)
class UpOptions:
    """How `up` behaves: how long to wait and where progress goes."""

    wait_timeout_seconds: float = DEFAULT_WAIT_TIMEOUT_SECONDS
    poll_interval_seconds: float = 10.0
    progress: ProgressCallback = _silent
    secrets: Mapping[str, str] = field(default_factory=dict)  # e.g. HF_TOKEN, VLLM_API_KEY


@dataclass(frozen=True)
class Endpoint:
    """A tier that is up: where to reach it and which URLs to register with the gateway."""

    tier: str
    name: str  # SkyServe service name, or "local"
    url: str  # the service's own endpoint (SkyServe load balancer, or the local server)
    replica_urls: tuple[str, ...]  # READY replicas the gateway should route to


@dataclass(frozen=True)
class ReplicaStatus:
    """One replica as the launcher sees it."""

    replica_id: str
    status: str  # SkyServe's ReplicaStatus name (READY, STARTING, ...) or the local state
    url: str | None

    @property
    def ready(self) -> bool:
        return self.status == "READY"


class Launcher(Protocol):
    """Stands a tier's server up and down; implementations never register with the gateway."""

    def up(self, tier: str, spec: TierSpec, options: UpOptions) -> Endpoint:
        """Start (or find already running) and wait until READY; idempotent."""
        ...

    def status(self, tier: str) -> list[ReplicaStatus]:
        """Replicas of the tier; raises NotDeployed when there is no service."""
        ...

    def down(self, tier: str) -> None:
        """Tear the tier down; raises NotDeployed when there is nothing to stop."""
        ...

    def logs(self, tier: str, tail: int = 100) -> str:
        """The last `tail` lines of the server's log."""
        ...
