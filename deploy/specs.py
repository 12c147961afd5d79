"""Loading a tier's SkyPilot spec (sky/<tier>.yaml), rendering operator overrides, validating it.

Rendering is pure dict work on the YAML so it is fast and testable without SkyPilot; validation
hands the rendered config to SkyPilot's own parser (`sky.Task.from_yaml_config` and
`sky.serve.validate_service_task`, offline), through `deploy.skypilot_launcher` — the only module
that imports `sky` — and only when asked, because `import sky` costs seconds.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from deploy.errors import SpecError
from deploy.launcher import TierSpec
from deploy.planner import known_accelerators

TIERS = ("tiny", "small", "medium")
SPOT_ONDEMAND_FALLBACK_REPLICAS = 1
"""With --spot, one replica stays on-demand so a spot preemption wave never empties the tier."""


def default_sky_dir() -> Path:
    """`sky/` at the repository root (this file is deploy/specs.py)."""
    return Path(__file__).resolve().parent.parent / "sky"


@dataclass(frozen=True)
class Overrides:
    """What the operator may change on the command line; None leaves the spec's value."""

    gpus: str | None = None  # "H100:2" or "H100"
    spot: bool | None = None
    min_replicas: int | None = None
    max_replicas: int | None = None
    region: str | None = None
    cloud: str | None = None
    envs: Mapping[str, str] = field(default_factory=dict)


def load_spec(tier: str, sky_dir: Path | None = None) -> TierSpec:
    """Read sky/<tier>.yaml; a missing file or broken YAML is a SpecError naming the path."""
    if not tier or "/" in tier or tier.startswith("."):
        raise SpecError(f"invalid tier name {tier!r}")
    path = (sky_dir or default_sky_dir()) / f"{tier}.yaml"
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        known = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise SpecError(f"no spec for tier {tier!r} at {path} (known: {', '.join(known)})") from None
    except (OSError, yaml.YAMLError) as exc:
        raise SpecError(f"cannot read {path}: {exc}") from exc
    if not isinstance(config, dict):
        raise SpecError(f"{path}: expected a mapping at the top level")
    return TierSpec(tier=tier, config=config, source=str(path))


def parse_gpus(value: str) -> tuple[str, int]:
    """'H100:2' -> ('H100', 2); the name must be on the project's accelerator list."""
    name, _, count_text = value.partition(":")
    try:
        count = int(count_text) if count_text else 1
    except ValueError:
        raise SpecError(f"--gpus {value!r}: the count after ':' must be an integer") from None
    known = known_accelerators()
    canonical = {k.lower(): k for k in known}.get(name.strip().lower())
    if canonical is None:
        raise SpecError(f"--gpus {value!r}: unknown accelerator {name!r} "
                        f"(known: {', '.join(known)})")
    if count < 1:
        raise SpecError(f"--gpus {value!r}: the count must be at least 1")
    return canonical, count


def render(spec: TierSpec, overrides: Overrides) -> TierSpec:
    """A new spec with the overrides applied; the original is left untouched."""
    config: dict[str, Any] = copy.deepcopy(dict(spec.config))
    resources: dict[str, Any] = config.setdefault("resources", {})
    service: dict[str, Any] | None = config.get("service")
    policy: dict[str, Any] = service.setdefault("replica_policy", {}) if service else {}

    if overrides.gpus:
        name, count = parse_gpus(overrides.gpus)
        resources["accelerators"] = f"{name}:{count}"
    if overrides.cloud:
        resources["cloud"] = overrides.cloud
    if overrides.region:
        resources["region"] = overrides.region
    if overrides.spot is not None:
        resources["use_spot"] = overrides.spot
        if service is not None:
            if overrides.spot:
                # SkyServe keeps this many replicas on-demand and the rest on spot.
                policy.setdefault("base_ondemand_fallback_replicas",
                                  SPOT_ONDEMAND_FALLBACK_REPLICAS)
            else:  # SkyServe rejects fallback keys on on-demand resources
                policy.pop("base_ondemand_fallback_replicas", None)
                policy.pop("dynamic_ondemand_fallback", None)
                policy.pop("spot_placer", None)
    if overrides.min_replicas is not None or overrides.max_replicas is not None:
        if service is None:
            raise SpecError(f"{spec.source}: --min/--max-replicas need a service: section")
        if overrides.min_replicas is not None:
            policy["min_replicas"] = overrides.min_replicas
        if overrides.max_replicas is not None:
            policy["max_replicas"] = overrides.max_replicas
        low, high = policy.get("min_replicas", 1), policy.get("max_replicas", policy.get(
            "min_replicas", 1))
        if low < 0 or high < low:
            raise SpecError(f"replicas: need 0 <= min ({low}) <= max ({high})")
    if overrides.envs:
        envs = config.setdefault("envs", {}) or {}
        envs.update({str(k): str(v) for k, v in overrides.envs.items()})
        config["envs"] = envs
    return TierSpec(tier=spec.tier, config=config, source=spec.source)


def spec_accelerators(spec: TierSpec) -> list[str]:
    """Accelerator names the spec asks for (dict, list, 'A:n' string, or any_of/ordered)."""
    resources = spec.config.get("resources") or {}
    candidates = [resources, *(resources.get("any_of") or []), *(resources.get("ordered") or [])]
    names: list[str] = []
    for entry in candidates:
        acc = entry.get("accelerators")
        if isinstance(acc, str):
            names.append(acc.split(":")[0])
        elif isinstance(acc, dict):
            names.extend(str(k) for k in acc)
        elif isinstance(acc, list):
            names.extend(str(item).split(":")[0] for item in acc)
    return names


def check_accelerators(spec: TierSpec) -> None:
    """SkyPilot checks names only against a catalog it downloads; check ours offline."""
    known = known_accelerators()
    unknown = [name for name in spec_accelerators(spec) if name not in known]
    if unknown:
        raise SpecError(f"{spec.source}: unknown accelerators {unknown} (known: {list(known)})")


def validate(spec: TierSpec, secrets: Mapping[str, str] | None = None) -> None:
    """Accelerator names against our list, then SkyPilot's own task and service validation."""
    check_accelerators(spec)
    from deploy.skypilot_launcher import validate_task_config

    validate_task_config(spec.config, secrets or {})
