"""Process entry for uvicorn workers: build the app from the environment.

`plateforme gateway serve` validates the config first (clean errors, no traceback), then
points every worker here with `PLATEFORME_CONFIG` set, so each worker builds its own app.
"""

from __future__ import annotations

from fastapi import FastAPI

from gateway.app import create_app
from gateway.config import ConfigError, load_catalog, load_settings, parse_catalog
from gateway.logs import configure_logging


def app_from_env() -> FastAPI:
    settings = load_settings()
    configure_logging(settings.log_level, settings.log_format)
    if settings.config is None:
        catalog = parse_catalog({}, "<empty>")
    else:
        catalog = load_catalog(settings.config)
    return create_app(settings, catalog)


__all__ = ["app_from_env", "ConfigError"]
