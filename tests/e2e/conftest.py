from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import yaml

from deploy import vllm_local
from deploy.errors import DeployError
from deploy.local_launcher import LocalLauncher
from tests.fixtures.procs import ADMIN_TOKEN, Gateway, GatewayFactory, basic_config, stop

SPEC_PATH = vllm_local.REPO_ROOT / "sky" / "small.yaml"
BUILD_MODEL_SCRIPT = vllm_local.REPO_ROOT / "scripts" / "build_tiny_mixtral.py"
PLATEFORME = str(Path(sys.executable).with_name("plateforme"))
TIER = "small"
GATEWAY_MODEL = "mistral-small"
VLLM_API_KEY = "e2e-replica-key-0123456789abcdef"  # vLLM's --api-key, passed in its env
STARTUP_TIMEOUT_SECONDS = 240.0
CLI_GRACE_SECONDS = 60.0  # the deploy CLI's own start-up and registration, beyond vLLM's
BUILD_TIMEOUT_SECONDS = 300.0
LOG_TAIL_CHARS = 4000
DEFAULT_MAX_TOKENS = 64


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "runs_last: stops the session's shared vLLM server; ordered after the rest")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """``runs_last`` tests right after the last other ``vllm`` test: they stop the shared
    server, which then holds no memory while the rest of the suite runs."""
    last = [item for item in items if item.get_closest_marker("runs_last")]
    rest = [item for item in items if not item.get_closest_marker("runs_last")]
    after = [n + 1 for n, item in enumerate(rest) if item.get_closest_marker("vllm")]
    at = after[-1] if after else len(rest)
    items[:] = [*rest[:at], *last, *rest[at:]]


class VllmEndpoint(NamedTuple):
    base_url: str            # server root, e.g. http://127.0.0.1:40123 (append /v1/...)
    served_model_name: str   # the spec's MODEL_ID: what the gateway's upstream_model names


@dataclass(frozen=True)
class VllmServer:
    """What the session knows about the running server, for tests that look deeper."""

    endpoint: VllmEndpoint
    pid: int
    log_path: Path
    model_path: Path
    max_model_len: int       # the gateway's context_window for the model: the same number
    startup_seconds: float   # `deploy up` from launch to registered
    api_key: str = VLLM_API_KEY

    @property
    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.api_key}"}

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


@dataclass(frozen=True)
class VllmPlatform:
    """The gateway with the session's vLLM registered by `plateforme deploy up --local`."""

    server: VllmServer
    gateway: Gateway
    state_dir: Path

    def deploy(self, *args: str, timeout: float = CLI_GRACE_SECONDS
               ) -> subprocess.CompletedProcess[str]:
        """``plateforme deploy ARGS --gateway-url ... --state-dir ...``, as typed in a shell."""
        return run_deploy(args, self.gateway, self.state_dir, timeout)


def run_deploy(args: tuple[str, ...], gateway: Gateway, state_dir: Path, timeout: float
               ) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PLATEFORME_URL", "PLATEFORME_DEPLOY_STATE_DIR", "PLATEFORME_SKY_DIR")}
    env.update(PLATEFORME_ADMIN_TOKEN=ADMIN_TOKEN, VLLM_API_KEY=VLLM_API_KEY)
    return subprocess.run(
        [PLATEFORME, "deploy", *args, "--gateway-url", gateway.url, "--state-dir", str(state_dir)],
        env=env, capture_output=True, text=True, timeout=timeout, check=False,
        cwd=vllm_local.REPO_ROOT)


def _tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
    except OSError:
        return "(no log)"


def _vllm_python_or_fail() -> Path:
    """The venv's interpreter; a missing venv fails (never skips) with the command to build it."""
    try:
        return vllm_local.vllm_python()
    except vllm_local.VllmNotInstalled as exc:
        message = f"{exc}\nor run the whole test with `scripts/test-vllm.sh`"
    pytest.fail(message, pytrace=False)


def _build_tiny_model(python: Path) -> Path:
    """Run the (idempotent) model build with the vLLM venv's interpreter; return its dir."""
    result = subprocess.run(
        [str(python), str(BUILD_MODEL_SCRIPT), "--out", str(vllm_local.tiny_model_dir())],
        check=False, capture_output=True, text=True,
        timeout=BUILD_TIMEOUT_SECONDS, cwd=vllm_local.REPO_ROOT,
    )
    if result.returncode != 0:
        pytest.fail(f"building the tiny Mixtral failed:\n{result.stdout}\n{result.stderr}",
                    pytrace=False)
    return vllm_local.tiny_model_path()


def context_window(spec_envs: dict[str, str], model_path: Path) -> int:
    """vLLM's max_model_len for the tiny model: the spec's, capped at its position embeddings."""
    config = json.loads((model_path / "config.json").read_text())
    return min(int(spec_envs["MAX_MODEL_LEN"]), int(config["max_position_embeddings"]))


def gateway_config(served_model: str, window: int, store: str) -> dict[str, Any]:
    """`mistral-small` on the served name, counted with Mixtral's tokenizer, no static replica."""
    model = {"aliases": ["small", "open-mixtral-8x7b"], "upstream_model": served_model,
             "replicas": [], "context_window": window, "default_max_tokens": DEFAULT_MAX_TOKENS,
             "tokenizer": "mistral-v1", "replica_api_key_env": "VLLM_API_KEY"}
    return basic_config([], store, models={GATEWAY_MODEL: model})


@pytest.fixture(scope="session")
def vllm_platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmPlatform]:
    """A gateway, and a real vLLM (CPU) for ``small`` started and registered by `deploy up`."""
    python = _vllm_python_or_fail()
    model_path = _build_tiny_model(python)
    spec_envs = {k: str(v) for k, v in yaml.safe_load(SPEC_PATH.read_text())["envs"].items()}
    window = context_window(spec_envs, model_path)
    state_dir = tmp_path_factory.mktemp("vllm-deploy")
    gateways = GatewayFactory(tmp_path_factory.mktemp("vllm-gateway"))
    try:
        gateway = gateways(gateway_config(spec_envs["MODEL_ID"], window,
                                          f"sqlite:///{state_dir / 'gateway.db'}"),
                           env={"VLLM_API_KEY": VLLM_API_KEY})
        started = time.monotonic()
        up = run_deploy((("up", TIER, "--local", "--engine", "vllm",
                          "--wait-timeout", str(STARTUP_TIMEOUT_SECONDS))),
                        gateway, state_dir, STARTUP_TIMEOUT_SECONDS + CLI_GRACE_SECONDS)
        if up.returncode != 0:
            pytest.fail(f"`plateforme deploy up {TIER} --local --engine vllm` failed "
                        f"({up.returncode}):\n{up.stdout}\n{up.stderr}\nvLLM log tail:\n"
                        f"{_tail(state_dir / f'{TIER}.log')}", pytrace=False)
        state = json.loads((state_dir / f"{TIER}.json").read_text())
        server = VllmServer(
            endpoint=VllmEndpoint(state["url"], spec_envs["MODEL_ID"]), pid=state["pid"],
            log_path=Path(state["log"]), model_path=model_path, max_model_len=window,
            startup_seconds=time.monotonic() - started)
        print(f"\nvLLM up and registered at {server.endpoint.base_url} in "
              f"{server.startup_seconds:.1f} s (log {server.log_path})", file=sys.stderr)
        yield VllmPlatform(server, gateway, state_dir)
    finally:
        launcher = LocalLauncher(state_dir=state_dir, engine="vllm")
        if launcher.read_state(TIER) is not None:  # not already taken down by a test
            try:
                launcher.down(TIER)
            except DeployError as exc:
                print(f"stopping vLLM: {exc}", file=sys.stderr)
        for started_gateway in gateways.started:
            stop(started_gateway.proc)


@pytest.fixture(scope="session")
def vllm_server(vllm_platform: VllmPlatform) -> VllmServer:
    """The session's real vLLM server (CPU, tiny Mixtral under the small tier's model name)."""
    return vllm_platform.server


@pytest.fixture(scope="session")
def vllm_endpoint(vllm_server: VllmServer) -> VllmEndpoint:
    """``(base_url, served_model_name)`` of the session's real vLLM server."""
    return vllm_server.endpoint
