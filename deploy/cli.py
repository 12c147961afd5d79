"""The `plateforme` command: gateway, keys, usage, up, sim and deploy.

Operator commands talk to the gateway's admin API through `PLATEFORME_URL` and
`PLATEFORME_ADMIN_TOKEN`; every failure prints one line and exits non-zero, never a
traceback. Heavy imports (uvicorn, SkyPilot) happen inside the commands that need them.
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
import tempfile
import time
from typing import Any, NoReturn, Optional

import typer

from deploy.admin import AdminClient, AdminError
from deploy.deploy_cli import deploy_app
from deploy.sim import sim_command

app = typer.Typer(help="Plateforme: an open LLM platform (gateway, keys, deploy).",
                  no_args_is_help=True, pretty_exceptions_enable=False)
gateway_app = typer.Typer(help="Run or check the gateway.", no_args_is_help=True)
keys_app = typer.Typer(help="Issue, list, change and revoke API keys (admin API).",
                       no_args_is_help=True)
app.add_typer(gateway_app, name="gateway")
app.add_typer(keys_app, name="keys")
app.add_typer(deploy_app, name="deploy")
app.command("sim")(sim_command)

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw]?)$")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def parse_duration(text: str) -> float:
    """'30d', '12h', '90m', '3600s' or plain seconds."""
    match = _DURATION.match(text.strip())
    if not match:
        raise typer.BadParameter(f"not a duration: {text!r} (use e.g. 30d, 12h, 90m)")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def _admin() -> AdminClient:
    try:
        return AdminClient()
    except AdminError as exc:
        fail(str(exc))


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and value > 1e9:  # a timestamp
        return time.strftime("%Y-%m-%d %H:%M", time.gmtime(value))
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


# gateway ------------------------------------------------------------------------------
@gateway_app.command("check")
def gateway_check(config: str = typer.Option(..., "--config", "-c", envvar="PLATEFORME_CONFIG",
                                             help="The YAML config file.")) -> None:
    """Validate a config file (and the environment) without starting anything."""
    from gateway.config import load_catalog, load_settings
    from gateway.errors import ConfigError

    try:
        catalog = load_catalog(config)
        load_settings()
    except ConfigError as exc:
        fail(str(exc), 2)
    typer.echo(f"{config}: OK ({len(catalog.models)} models, {len(catalog.plans)} plans, "
               f"store {catalog.store.split(':')[0]})")


@gateway_app.command("serve")
def gateway_serve(
    config: str = typer.Option(..., "--config", "-c", envvar="PLATEFORME_CONFIG",
                               help="The YAML config file."),
    host: str = typer.Option("127.0.0.1", help="Address to bind."),
    port: int = typer.Option(8000, help="Port to bind."),
    workers: int = typer.Option(1, min=1, help="Worker processes (share the store)."),
) -> None:
    """Run the gateway (uvicorn with uvloop and httptools)."""
    import uvicorn

    from gateway.app import create_app
    from gateway.config import check_admin_token, load_catalog, load_settings
    from gateway.errors import ConfigError
    from gateway.logs import configure_logging

    try:
        catalog = load_catalog(config)
        settings = load_settings(config=config)
        if settings.admin_token:
            check_admin_token(settings.admin_token)
        configure_logging(settings.log_level, settings.log_format)
        if workers == 1:
            app_or_path: Any = create_app(settings, catalog)
    except ConfigError as exc:
        fail(str(exc), 2)
    from gateway.http_protocol import BoundedHeadProtocol

    # httptools, with a deadline on request heads (uvicorn has none): body_timeout_seconds.
    bounded_http = functools.partial(BoundedHeadProtocol,
                                     head_timeout=catalog.server.body_timeout_seconds)
    options: dict[str, Any] = dict(
        host=host, port=port, loop="uvloop", http=bounded_http, log_config=None,
        access_log=False, timeout_graceful_shutdown=int(catalog.server.drain_timeout_seconds),
        server_header=False, date_header=False)
    if workers == 1:
        uvicorn.run(app_or_path, **options)
        return
    os.environ["PLATEFORME_CONFIG"] = os.path.abspath(config)
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # one exporter view over all workers
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="plateforme-prom-")
    from gateway.serve import run_workers

    run_workers(workers, **options)


# keys ---------------------------------------------------------------------------------
KEY_COLUMNS = ["id", "owner", "plan", "rpm", "tpm", "max_concurrent", "monthly_tokens",
               "models", "created_at", "expires_at", "revoked_at"]


@keys_app.command("create")
def keys_create(
    owner: str = typer.Option(..., help="Who the key is for (e.g. an email)."),
    plan: str = typer.Option(..., help="A plan from the gateway's config."),
    rpm: Optional[int] = typer.Option(None, help="Override: requests per minute."),
    tpm: Optional[int] = typer.Option(None, help="Override: tokens per minute."),
    max_concurrent: Optional[int] = typer.Option(None, help="Override: concurrent requests."),
    monthly_tokens: Optional[int] = typer.Option(None, help="Override: tokens per month."),
    models: Optional[str] = typer.Option(None, help="Override: allowed models, a,b."),
    moderation: Optional[str] = typer.Option(None, help="optional | always | never."),
    expires_in: Optional[str] = typer.Option(None, help="Expiry, e.g. 30d, 12h."),
    name: Optional[str] = typer.Option(None, help="A label for the key."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (with the key)."),
) -> None:
    """Issue a key. The secret is printed once: store it now."""
    with _admin() as admin:
        try:
            created = admin.create_key(
                owner, plan, rpm=rpm, tpm=tpm, max_concurrent=max_concurrent,
                monthly_tokens=monthly_tokens, moderation=moderation, name=name,
                models=[m.strip() for m in models.split(",") if m.strip()] if models else None,
                expires_in=parse_duration(expires_in) if expires_in else None)
        except AdminError as exc:
            fail(str(exc))
    if as_json:
        typer.echo(json.dumps(created))
        return
    typer.echo(f"id:    {created['id']}\nowner: {created['owner']}\nplan:  {created['plan']}")
    typer.echo(f"key:   {created['key']}")
    typer.echo("This is the only time the key is shown; store it now.", err=True)


@keys_app.command("list")
def keys_list(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List keys (never their secrets)."""
    with _admin() as admin:
        try:
            keys = admin.list_keys()
        except AdminError as exc:
            fail(str(exc))
    typer.echo(json.dumps(keys) if as_json else _table(keys, KEY_COLUMNS))


@keys_app.command("show")
def keys_show(key_id: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """Show one key."""
    with _admin() as admin:
        try:
            key = admin.get_key(key_id)
        except AdminError as exc:
            fail(str(exc))
    typer.echo(json.dumps(key) if as_json else
               "\n".join(f"{k}: {_cell(v)}" for k, v in key.items()))


@keys_app.command("update")
def keys_update(
    key_id: str,
    plan: Optional[str] = typer.Option(None), rpm: Optional[int] = typer.Option(None),
    tpm: Optional[int] = typer.Option(None), max_concurrent: Optional[int] = typer.Option(None),
    monthly_tokens: Optional[int] = typer.Option(None),
    models: Optional[str] = typer.Option(None, help="a,b"),
    moderation: Optional[str] = typer.Option(None),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Change a key's plan or limits; every gateway applies it within a second."""
    changes = {k: v for k, v in dict(plan=plan, rpm=rpm, tpm=tpm, max_concurrent=max_concurrent,
                                      monthly_tokens=monthly_tokens, moderation=moderation,
                                      models=models.split(",") if models else None).items()
               if v is not None}
    if not changes:
        fail("nothing to change: give at least one option")
    with _admin() as admin:
        try:
            key = admin.update_key(key_id, **changes)
        except AdminError as exc:
            fail(str(exc))
    typer.echo(json.dumps(key) if as_json else _table([key], KEY_COLUMNS))


@keys_app.command("revoke")
def keys_revoke(key_id: str) -> None:
    """Revoke a key; every gateway refuses it within a second."""
    with _admin() as admin:
        try:
            key = admin.revoke_key(key_id)
        except AdminError as exc:
            fail(str(exc))
    typer.echo(f"revoked {key['id']} ({key['owner']})")


# usage --------------------------------------------------------------------------------
@app.command("usage")
def usage(key: Optional[str] = typer.Option(None, "--key", help="A key id."),
          since: Optional[str] = typer.Option(None, help="From this UTC day, YYYY-MM-DD."),
          as_json: bool = typer.Option(False, "--json")) -> None:
    """Tokens and requests per key, model and day (the usage ledger)."""
    with _admin() as admin:
        try:
            rows = admin.usage(key_id=key, since=since)
        except AdminError as exc:
            fail(str(exc))
    columns = ["day", "key_id", "model", "requests", "prompt_tokens", "completion_tokens",
               "guardrail_tokens", "errors"]
    typer.echo(json.dumps(rows) if as_json else _table(rows, columns))


@app.command("up")
def up(
    config: Optional[str] = typer.Option(None, "--config", "-c",
                                         help="A config file (default: a generated one)."),
    port: int = typer.Option(8000, help="The gateway's port."),
    state_dir: str = typer.Option("~/.plateforme", envvar="PLATEFORME_STATE_DIR",
                                  help="Where state (SQLite store, dev key) lives."),
    engine: str = typer.Option("sim", help="sim (default) or vllm (the tiny CPU Mixtral)."),
    model_path: Optional[str] = typer.Option(
        None, help="With --engine vllm: weights for `small` (default: the tiny CPU Mixtral)."),
) -> None:
    """Start the whole platform on this machine: gateway on the embedded store, one local
    endpoint per model, a dev key printed. Ctrl-C stops everything it started."""
    from deploy.up import UpError, run_up

    try:
        run_up(config=config, port=port, state_dir=state_dir, engine=engine,
               model_path=model_path)
    except UpError as exc:
        fail(str(exc))


def main() -> None:
    app(prog_name="plateforme")


if __name__ == "__main__":
    main()
