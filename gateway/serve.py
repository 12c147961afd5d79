"""Process entry for uvicorn workers: build the app from the environment.

`plateforme gateway serve` validates the config first (clean errors, no traceback), then
points every worker here with `PLATEFORME_CONFIG` set, so each worker builds its own app.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import FastAPI

from gateway.app import create_app
from gateway.config import load_catalog, load_settings, parse_catalog
from gateway.errors import ConfigError
from gateway.logs import configure_logging

# uvicorn's supervisor pings each worker and kills one that has not answered within 5 s; a
# worker answers only once its interpreter has started and imported the CLI, which on a busy
# host (CI, a throttled container) takes longer, so workers were killed and respawned in a
# loop and the gateway never came up. uvicorn >= 0.37 has `timeout_worker_healthcheck` for
# this, but SkyPilot (the `sky` extra) pins uvicorn < 0.36.
WORKER_HEALTHCHECK_TIMEOUT_SECONDS = 30.0
HEALTHCHECK_POLL_SECONDS = 0.5


def app_from_env() -> FastAPI:
    settings = load_settings()
    configure_logging(settings.log_level, settings.log_format)
    if settings.config is None:
        catalog = parse_catalog({}, "<empty>")
    else:
        catalog = load_catalog(settings.config)
    return create_app(settings, catalog)


def run_workers(workers: int, **options: Any) -> None:
    """`uvicorn.run(..., workers=N)` with a patient supervisor; each worker builds its app
    through `app_from_env`."""
    from uvicorn import Config, Server
    from uvicorn.supervisors import Multiprocess

    answered: dict[int, float] = {}  # id(worker process) -> when it last answered a ping

    class PatientSupervisor(Multiprocess):
        """uvicorn's supervisor, giving a silent worker 30 s instead of 5 before replacing it.

        Each round still waits at most `HEALTHCHECK_POLL_SECONDS` per worker, so the loop
        stays responsive to SIGTERM/SIGINT (one long blocking ping would delay shutdown,
        and a supervisor killed meanwhile orphans its workers). A worker that exited is
        replaced at once; one that runs but has not answered for the whole grace is killed.
        """

        def keep_subprocess_alive(self) -> None:
            for index, process in enumerate(self.processes):
                if self.should_exit.is_set():
                    return
                now = time.monotonic()
                last = answered.setdefault(id(process), now)
                if process.is_alive(timeout=HEALTHCHECK_POLL_SECONDS):
                    answered[id(process)] = now
                    continue
                if process.process.is_alive() and (
                        now - last < WORKER_HEALTHCHECK_TIMEOUT_SECONDS):
                    continue  # slow (starting up on a busy host), not dead
                process.kill()  # dead, or silent for the whole grace: replace it
                process.join()
                answered.pop(id(process), None)
                if self.should_exit.is_set():
                    return
                self.processes[index] = type(process)(self.config, self.target, self.sockets)
                self.processes[index].start()

    config = Config("gateway.serve:app_from_env", factory=True, workers=workers, **options)
    server = Server(config=config)
    try:
        PatientSupervisor(config, target=server.run, sockets=[config.bind_socket()]).run()
    except KeyboardInterrupt:
        pass


__all__ = ["ConfigError", "app_from_env", "run_workers"]
