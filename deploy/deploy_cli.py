"""`plateforme deploy plan|up|status|down|logs TIER`: the operator's deploy commands.

Each command renders the tier's spec, drives a `Launcher` (SkyPilot, or the local one with
`--local`) and keeps the gateway's replica list in step through its admin API: `up` registers
after READY, `down` deregisters first, `status` shows both views and where they disagree.
SkyPilot is imported only by the cloud commands, inside `deploy.skypilot_launcher`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, Optional

import typer

from deploy import planner, specs
from deploy.errors import DeployError, SkyPilotNotInstalled
from deploy.launcher import DEFAULT_WAIT_TIMEOUT_SECONDS, Launcher, ReplicaStatus, UpOptions

if TYPE_CHECKING:
    from deploy.admin import AdminClient

deploy_app = typer.Typer(
    help="Stand tiers up on any cloud with SkyPilot (or --local), registered with the gateway.",
    no_args_is_help=True)

TIER_GATEWAY_MODELS = {"tiny": "mistral-tiny", "small": "mistral-small",
                       "medium": "mistral-medium"}
SECRET_NAMES = ("HF_TOKEN", "VLLM_API_KEY")  # passed to SkyPilot as --secret from the env
INSTALL_HINT = "SkyPilot is not installed: pip install 'plateforme[sky]' (or use --local)"

SkyDir = typer.Option(None, "--sky-dir", envvar="PLATEFORME_SKY_DIR",
                      help="Directory of the tier specs (default: the repo's sky/).")
StateDir = typer.Option(None, "--state-dir", envvar="PLATEFORME_DEPLOY_STATE_DIR",
                        help="Where --local keeps pid/port files (default ~/.plateforme/deploy).")
Local = typer.Option(False, "--local", help="Run on this machine instead of a cloud.")
GatewayUrl = typer.Option(None, "--gateway-url", help="Gateway base URL (default $PLATEFORME_URL).")
ModelName = typer.Option(None, "--model", help="Gateway model to register with "
                         "(default: tiny->mistral-tiny, small->mistral-small, ...).")


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


@contextmanager
def _errors() -> Iterator[None]:
    """Every deploy failure is one line on stderr and exit 1, never a traceback."""
    try:
        yield
    except SkyPilotNotInstalled:
        _fail(INSTALL_HINT)
    except DeployError as exc:
        _fail(str(exc))


def _progress(message: str) -> None:
    typer.echo(f"  {message}", err=True)


def _gateway_model(tier: str, model: str | None) -> str:
    if model:
        return model
    if tier not in TIER_GATEWAY_MODELS:
        _fail(f"no gateway model known for tier {tier!r}: pass --model NAME")
    return TIER_GATEWAY_MODELS[tier]


def _launcher(local: bool, state_dir: Path | None, engine: str = "sim",
              model_path: str | None = None) -> Launcher:
    if local:
        from deploy.local_launcher import LocalLauncher

        if engine not in ("sim", "vllm"):
            _fail(f"--engine must be sim or vllm, got {engine!r}")
        return LocalLauncher(state_dir=state_dir, engine="vllm" if engine == "vllm" else "sim",
                             model_path=model_path)
    from deploy.skypilot_launcher import SkyPilotLauncher

    return SkyPilotLauncher()


def _admin(gateway_url: str | None) -> AdminClient | None:
    """The gateway's admin client, or None with a warning when it cannot be configured."""
    from deploy.admin import AdminClient, AdminError

    try:
        return AdminClient(base_url=gateway_url)
    except AdminError as exc:
        typer.echo(f"warning: gateway not reachable for registration: {exc}", err=True)
        return None


def _parse_envs(pairs: Sequence[str]) -> dict[str, str]:
    envs: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            _fail(f"--env {pair!r}: expected NAME=VALUE")
        envs[key] = value
    return envs


def _prices(sets: Sequence[planner.Sizing], timeout: float
            ) -> tuple[dict[tuple[str, int], planner.Price], str | None]:
    try:
        from deploy.skypilot_launcher import catalog_prices
    except ImportError:  # pragma: no cover - the module itself imports no sky
        return {}, planner.PRICES_UNAVAILABLE
    return planner.attach_prices(sets, lambda wanted: catalog_prices(wanted, timeout))


@deploy_app.command("plan")
def plan_command(
    tier: str = typer.Argument(..., help="tiny, small or medium."),
    context: Optional[int] = typer.Option(None, help="Context length to size for (tokens)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    prices: bool = typer.Option(True, "--prices/--no-prices",
                                help="Look prices up in SkyPilot's catalog (needs network)."),
    price_timeout: float = typer.Option(20.0, help="Seconds to wait for the catalog."),
) -> None:
    """Size the tier's model to GPUs: weights and KV cache per GPU, tokens and sequences."""
    arch = planner.TIER_MODELS.get(tier)
    if arch is None:
        _fail(f"unknown tier {tier!r} (known: {', '.join(planner.TIER_MODELS)})")
    ctx = context or arch.context
    if ctx <= 0:
        _fail("--context must be positive")
    sizings = planner.plan(arch, ctx)
    fits = planner.smallest_fits(sizings)
    found, note = _prices(fits, price_timeout) if prices else ({}, planner.PRICES_UNAVAILABLE)
    if as_json:
        typer.echo(json.dumps(planner.plan_json(arch, ctx, sizings, found, note), indent=2))
    else:
        typer.echo(planner.render_table(arch, ctx, sizings, found, note))


@deploy_app.command("up")
def up_command(
    tier: str = typer.Argument(..., help="tiny, small or medium."),
    local: bool = Local,
    engine: str = typer.Option("sim", help="With --local: sim (simulator) or vllm."),
    model_path: Optional[str] = typer.Option(
        None, help="With --engine vllm: weights to load (default: the tiny CI Mixtral)."),
    gpus: Optional[str] = typer.Option(None, help='Accelerators, e.g. "H100:2".'),
    spot: Optional[bool] = typer.Option(None, "--spot/--no-spot",
                                        help="Spot instances (one on-demand fallback replica)."),
    min_replicas: Optional[int] = typer.Option(None, help="SkyServe min replicas."),
    max_replicas: Optional[int] = typer.Option(None, help="SkyServe max replicas."),
    region: Optional[str] = typer.Option(None, help="Cloud region."),
    cloud: Optional[str] = typer.Option(None, help="Cloud (aws, gcp, azure, ...)."),
    env: list[str] = typer.Option([], "--env", help="Override a spec env: NAME=VALUE."),
    gateway_url: Optional[str] = GatewayUrl,
    model: Optional[str] = ModelName,
    register: bool = typer.Option(True, "--register/--no-register",
                                  help="Register the replicas with the gateway."),
    wait_timeout: float = typer.Option(DEFAULT_WAIT_TIMEOUT_SECONDS,
                                       help="Seconds to wait for READY."),
    sky_dir: Optional[Path] = SkyDir,
    state_dir: Optional[Path] = StateDir,
) -> None:
    """Render the tier's spec, start it, wait until READY, then register it with the gateway."""
    gateway_model = _gateway_model(tier, model)
    secrets = {name: os.environ[name] for name in SECRET_NAMES if os.environ.get(name)}
    with _errors():
        spec = specs.render(specs.load_spec(tier, sky_dir), specs.Overrides(
            gpus=gpus, spot=spot, min_replicas=min_replicas, max_replicas=max_replicas,
            region=region, cloud=cloud, envs=_parse_envs(env)))
        if not local:
            if "VLLM_API_KEY" not in secrets:
                _fail("set VLLM_API_KEY: cloud replicas answer only requests carrying it")
            specs.validate(spec, secrets)
        launcher = _launcher(local, state_dir, engine, model_path)
        typer.echo(f"deploying {tier} ({spec.model_id}) "
                   f"{'locally' if local else 'with SkyPilot'}", err=True)
        endpoint = launcher.up(tier, spec, UpOptions(wait_timeout_seconds=wait_timeout,
                                                     progress=_progress, secrets=secrets))
    typer.echo(f"{tier} READY at {endpoint.url}")
    if not register:
        return
    admin = _admin(gateway_url)
    if admin is None:
        _fail(f"{tier} is up but not registered; rerun `plateforme deploy up {tier}` "
              "once PLATEFORME_URL / PLATEFORME_ADMIN_TOKEN are set")
    from deploy.admin import AdminError

    with admin:
        for url in endpoint.replica_urls:
            try:
                admin.register_replica(gateway_model, url)
            except AdminError as exc:
                _fail(f"{tier} is up but registering {url} as {gateway_model} failed: {exc}")
            typer.echo(f"registered {url} as a replica of {gateway_model}")


def drift(replicas: Sequence[ReplicaStatus], registered: Sequence[str]) -> list[str]:
    """Warnings where the launcher's and the gateway's views disagree."""
    live = {r.url for r in replicas if r.ready and r.url}
    known = {r.url for r in replicas if r.url}
    warnings = [f"registered with the gateway but {'not READY' if url in known else 'gone'}: "
                f"{url}" for url in registered if url not in live]
    warnings += [f"READY but not registered with the gateway: {url}"
                 for url in sorted(live - set(registered))]
    return warnings


@deploy_app.command("status")
def status_command(
    tier: str = typer.Argument(...), local: bool = Local,
    gateway_url: Optional[str] = GatewayUrl, model: Optional[str] = ModelName,
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    state_dir: Optional[Path] = StateDir,
) -> None:
    """The launcher's replicas next to the gateway's registered ones, with warnings."""
    gateway_model = _gateway_model(tier, model)
    with _errors():
        replicas = _launcher(local, state_dir).status(tier)
    registered: list[str] | None = None
    admin = _admin(gateway_url)
    if admin is not None:
        from deploy.admin import AdminError

        with admin:
            try:
                registered = admin.list_replicas(gateway_model)
            except AdminError as exc:
                typer.echo(f"warning: cannot list the gateway's replicas: {exc}", err=True)
    warnings = drift(replicas, registered) if registered is not None else []
    if as_json:
        typer.echo(json.dumps({
            "tier": tier, "model": gateway_model, "registered": registered, "warnings": warnings,
            "replicas": [{"id": r.replica_id, "status": r.status, "url": r.url}
                         for r in replicas]}, indent=2))
        return
    typer.echo(f"{tier} ({'local' if local else 'SkyServe'}):")
    for r in replicas:
        typer.echo(f"  replica {r.replica_id:<8} {r.status:<14} {r.url or '-'}")
    typer.echo(f"gateway model {gateway_model}: " + (
        ", ".join(registered) or "no replicas" if registered is not None else "unknown"))
    for warning in warnings:
        typer.echo(f"warning: {warning}", err=True)


@deploy_app.command("down")
def down_command(
    tier: str = typer.Argument(...), local: bool = Local,
    gateway_url: Optional[str] = GatewayUrl, model: Optional[str] = ModelName,
    force: bool = typer.Option(False, help="Tear down even if deregistering fails."),
    state_dir: Optional[Path] = StateDir,
) -> None:
    """Deregister the tier's replicas from the gateway first, then tear it down."""
    gateway_model = _gateway_model(tier, model)
    with _errors():
        launcher = _launcher(local, state_dir)
        urls = {r.url for r in launcher.status(tier) if r.url}
    admin = _admin(gateway_url)
    if admin is None and not force:
        _fail("cannot deregister from the gateway; fix it or pass --force")
    if admin is not None:
        from deploy.admin import AdminError

        with admin:
            try:
                for url in sorted(urls & set(admin.list_replicas(gateway_model))):
                    admin.deregister_replica(gateway_model, url)
                    typer.echo(f"deregistered {url} from {gateway_model}")
            except AdminError as exc:
                if not force:
                    _fail(f"deregistering failed ({exc}); nothing torn down (--force to go on)")
                typer.echo(f"warning: deregistering failed: {exc}", err=True)
    with _errors():
        launcher.down(tier)
    typer.echo(f"{tier} is down")


@deploy_app.command("logs")
def logs_command(
    tier: str = typer.Argument(...), local: bool = Local,
    tail: int = typer.Option(100, help="Lines from the end."),
    state_dir: Optional[Path] = StateDir,
) -> None:
    """The last lines of the tier's server log (a replica's, for SkyServe)."""
    with _errors():
        typer.echo(_launcher(local, state_dir).logs(tier, tail))
