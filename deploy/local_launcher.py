"""The local launcher: runs a tier's server on this machine, so `deploy up --local` works (and is
tested) without a cloud.

Engine "sim" runs `python -m deploy.sim` with the spec's MODEL_ID; engine "vllm" runs the command
`deploy.vllm_local.build_command(spec_envs, port)` gives (the same `vllm serve` flags as the
spec, CPU overrides). The pid, port and log path go to a state file
(<state_dir>/<tier>.json) so `status`, `down` and `logs` work from another CLI invocation.
Readiness is GET /health and then a real GET /v1/models: a health check alone proves nothing.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import httpx

from deploy.errors import LaunchError, NotDeployed, ReadinessTimeout
from deploy.launcher import Endpoint, ReplicaStatus, TierSpec, UpOptions

Engine = Literal["sim", "vllm"]
STOP_GRACE_SECONDS = 10.0  # SIGTERM, then SIGKILL after this long
PROBE_TIMEOUT = httpx.Timeout(5.0, connect=1.0)
POLL_INTERVAL_SECONDS = 0.2
API_KEY_SECRET = "VLLM_API_KEY"


def default_state_dir() -> Path:
    return Path.home() / ".plateforme" / "deploy"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True)
class LocalState:
    """What a later CLI invocation needs to find the server again."""

    tier: str
    engine: str
    pid: int
    port: int
    url: str
    model: str
    log: str
    api_key: bool  # whether probes must send VLLM_API_KEY


def _cmdline(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return None


class LocalLauncher:
    """`Launcher` that runs one server process per tier on loopback."""

    def __init__(self, state_dir: Path | None = None, engine: Engine = "sim",
                 host: str = "127.0.0.1", port: int | None = None,
                 python: str = sys.executable, sim_args: tuple[str, ...] = (),
                 model_path: str | None = None) -> None:
        self.state_dir = state_dir or default_state_dir()
        self.engine: Engine = engine
        self.host = host
        self.port = port
        self.python = python
        self.sim_args = sim_args
        self.model_path = model_path  # weights for engine "vllm" (a dir or a hub id)
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    # state file --------------------------------------------------------------------------
    def _state_path(self, tier: str) -> Path:
        return self.state_dir / f"{tier}.json"

    def read_state(self, tier: str) -> LocalState | None:
        try:
            return LocalState(**json.loads(self._state_path(tier).read_text("utf-8")))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as exc:
            raise LaunchError(f"corrupt state file {self._state_path(tier)}: {exc}") from exc

    def _write_state(self, state: LocalState) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self._state_path(state.tier).with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(state), indent=2), "utf-8")
        tmp.replace(self._state_path(state.tier))  # atomic: never a half-written state file

    def alive(self, state: LocalState) -> bool:
        """Our process still runs: same pid, and its command line still names our port (a
        recycled pid belongs to someone else and must never be signalled)."""
        child = self._children.get(state.pid)
        if child is not None:
            return child.poll() is None
        cmdline = _cmdline(state.pid)
        return cmdline is not None and str(state.port) in cmdline

    # launcher ----------------------------------------------------------------------------
    def _command(self, spec: TierSpec, port: int, api_key: str | None
                 ) -> tuple[list[str], dict[str, str]]:
        env = {k: v for k, v in os.environ.items() if k != "PLATEFORME_SIM_API_KEY"}
        if self.engine == "vllm":
            # Lazily: only with --engine vllm. Without --model-path, the tiny CI Mixtral.
            from deploy.vllm_local import VllmLocalError, build_command, tiny_model_path

            envs = {**spec.envs, **({API_KEY_SECRET: api_key} if api_key else {})}
            try:
                model_path = self.model_path or str(tiny_model_path())
                command, extra_env = build_command(envs, port, model_path=model_path,
                                                   host=self.host)
            except VllmLocalError as exc:
                raise LaunchError(str(exc)) from exc
            env.update(extra_env)
            return list(command), env
        command = [self.python, "-m", "deploy.sim", "--port", str(port), "--host", self.host,
                   "--model", spec.model_id or spec.tier, *self.sim_args]
        if spec.envs.get("MAX_MODEL_LEN"):
            command += ["--max-model-len", spec.envs["MAX_MODEL_LEN"]]
        if api_key:
            env["PLATEFORME_SIM_API_KEY"] = api_key
        return command, env

    def up(self, tier: str, spec: TierSpec, options: UpOptions) -> Endpoint:
        state = self.read_state(tier)
        api_key = options.secrets.get(API_KEY_SECRET) or None
        if state is not None and self.alive(state):
            options.progress(f"{tier} already runs locally (pid {state.pid}, {state.url})")
            self._wait_ready(state, options, api_key)
            return Endpoint(tier=tier, name="local", url=state.url, replica_urls=(state.url,))
        port = self.port or free_port(self.host)
        command, env = self._command(spec, port, api_key)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.state_dir / f"{tier}.log"
        with log_path.open("ab") as log:
            try:
                child = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
            except OSError as exc:
                raise LaunchError(f"cannot start {command[0]}: {exc}") from exc
        self._children[child.pid] = child
        url = f"http://{self.host}:{port}"
        state = LocalState(tier=tier, engine=self.engine, pid=child.pid, port=port, url=url,
                           model=spec.model_id, log=str(log_path), api_key=bool(api_key))
        self._write_state(state)
        options.progress(f"started {self.engine} for {tier} (pid {child.pid}) on {url}")
        try:
            self._wait_ready(state, options, api_key)
        except LaunchError:
            self._stop(state)
            raise
        return Endpoint(tier=tier, name="local", url=url, replica_urls=(url,))

    def _probe(self, state: LocalState, api_key: str | None, models: bool = True) -> bool:
        """/health, then (unless `models` is False) an authenticated GET /v1/models."""
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        try:
            with httpx.Client(base_url=state.url, timeout=PROBE_TIMEOUT) as http:
                if http.get("/health").status_code != 200:
                    return False
                return not models or http.get("/v1/models", headers=headers).status_code == 200
        except httpx.HTTPError:
            return False

    def _wait_ready(self, state: LocalState, options: UpOptions, api_key: str | None) -> None:
        deadline = time.monotonic() + options.wait_timeout_seconds
        while not self._probe(state, api_key):
            if not self.alive(state):
                raise LaunchError(f"the {state.engine} server for {state.tier} exited; last "
                                  f"log lines:\n{self._tail(Path(state.log), 20)}")
            if time.monotonic() >= deadline:
                raise ReadinessTimeout(f"{state.tier} not ready on {state.url} after "
                                       f"{options.wait_timeout_seconds:.0f} s")
            time.sleep(POLL_INTERVAL_SECONDS)
        options.progress(f"{state.tier} is READY on {state.url}")

    def status(self, tier: str) -> list[ReplicaStatus]:
        state = self.read_state(tier)
        if state is None:
            raise NotDeployed(f"{tier} does not run locally (no {self._state_path(tier)})")
        if not self.alive(state):
            status = "STOPPED"
        else:  # /health needs no key, and this invocation may not have it
            status = "READY" if self._probe(state, None, models=False) else "NOT_READY"
        return [ReplicaStatus(replica_id=str(state.pid), status=status, url=state.url)]

    def down(self, tier: str) -> None:
        state = self.read_state(tier)
        if state is None:
            raise NotDeployed(f"{tier} does not run locally (no {self._state_path(tier)})")
        self._stop(state)

    def _stop(self, state: LocalState) -> None:
        """SIGTERM the server's process group (it was started in its own session), then
        SIGKILL after a grace period; forget the state file either way."""
        if self.alive(state):
            self._signal(state.pid, signal.SIGTERM)
            deadline = time.monotonic() + STOP_GRACE_SECONDS
            while self.alive(state) and time.monotonic() < deadline:
                time.sleep(0.1)
            if self.alive(state):
                self._signal(state.pid, signal.SIGKILL)
        child = self._children.pop(state.pid, None)
        if child is not None:
            child.wait(timeout=STOP_GRACE_SECONDS)
        self._state_path(state.tier).unlink(missing_ok=True)

    @staticmethod
    def _signal(pid: int, sig: signal.Signals) -> None:
        try:
            if os.getpgid(pid) == pid:  # its own group leader: take its children along
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)
        except ProcessLookupError:
            pass  # already gone: the goal of stopping it is met

    @staticmethod
    def _tail(path: Path, lines: int) -> str:
        try:
            return "\n".join(path.read_text("utf-8", errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def logs(self, tier: str, tail: int = 100) -> str:
        state = self.read_state(tier)
        if state is None:
            raise NotDeployed(f"{tier} does not run locally (no {self._state_path(tier)})")
        return self._tail(Path(state.log), tail)


def local_env_secrets(environ: Mapping[str, str]) -> dict[str, str]:
    """The replica API key for a local server, when the operator set one."""
    return {API_KEY_SECRET: environ[API_KEY_SECRET]} if environ.get(API_KEY_SECRET) else {}
