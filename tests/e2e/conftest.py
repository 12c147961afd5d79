"""End-to-end fixtures: a real vLLM server on this machine's CPU serving the tiny Mixtral.

``vllm_endpoint`` is session-scoped: one vLLM start (~40–45 s, ~1.5 GB) serves every test that
asks for it. It is started exactly as the local launcher would, through
``deploy.vllm_local.build_command`` on the ``small`` tier's spec envs, so the test exercises the
same flags (tokenizer mode mistral, prefix caching, served model name) as production.

A missing vLLM virtualenv fails the tests with the command that builds it, never skips them:
CI builds it first (``scripts/test-vllm.sh``), and a silent skip would hide a broken CI.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import httpx
import pytest
import yaml

from deploy import vllm_local

SPEC_PATH = vllm_local.REPO_ROOT / "sky" / "small.yaml"
BUILD_MODEL_SCRIPT = vllm_local.REPO_ROOT / "scripts" / "build_tiny_mixtral.py"
STARTUP_TIMEOUT_SECONDS = 240.0
BUILD_TIMEOUT_SECONDS = 300.0
STOP_TIMEOUT_SECONDS = 20.0
POLL_INTERVAL_SECONDS = 0.5
LOG_TAIL_CHARS = 4000


class VllmEndpoint(NamedTuple):
    base_url: str            # server root, e.g. http://127.0.0.1:40123 (append /v1/...)
    served_model_name: str   # the spec's MODEL_ID: what the gateway's upstream_model names


@dataclass(frozen=True)
class VllmServer:
    """What the session knows about the running server, for tests that look deeper."""

    endpoint: VllmEndpoint
    process: subprocess.Popen[bytes]
    log_path: Path
    model_path: Path
    startup_seconds: float

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
    except OSError:
        return "(no log)"


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the server's process group, then SIGKILL if it lingers."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=STOP_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=STOP_TIMEOUT_SECONDS)


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


def _wait_ready(process: subprocess.Popen[bytes], base_url: str, log_path: Path) -> None:
    """Poll /v1/models until it answers 200; fail with the log if vLLM dies or is too slow."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    with httpx.Client(base_url=base_url, timeout=5.0) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                pytest.fail(f"vLLM exited with {process.returncode} during start-up; log tail:\n"
                            f"{_tail(log_path)}", pytrace=False)
            try:
                if client.get("/v1/models").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(POLL_INTERVAL_SECONDS)
    pytest.fail(f"vLLM not ready after {STARTUP_TIMEOUT_SECONDS:.0f} s; log tail:\n"
                f"{_tail(log_path)}", pytrace=False)


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServer]:
    """A real vLLM (CPU) serving the tiny Mixtral under the small tier's model name."""
    python = _vllm_python_or_fail()
    model_path = _build_tiny_model(python)

    spec_envs = {k: str(v) for k, v in yaml.safe_load(SPEC_PATH.read_text())["envs"].items()}
    port = _free_port()
    argv, extra_env = vllm_local.build_command(spec_envs, port, model_path=str(model_path))
    log_path = tmp_path_factory.mktemp("vllm") / "vllm.log"
    started = time.monotonic()
    with log_path.open("wb") as log:
        log.write(f"$ {vllm_local.launch_summary(argv, extra_env)}\n".encode())
        log.flush()
        process = subprocess.Popen(
            argv, env={**os.environ, **extra_env}, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True, cwd=vllm_local.REPO_ROOT,
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(process, base_url, log_path)
        server = VllmServer(
            endpoint=VllmEndpoint(base_url, spec_envs["MODEL_ID"]),
            process=process, log_path=log_path, model_path=model_path,
            startup_seconds=time.monotonic() - started,
        )
        print(f"\nvLLM ready at {base_url} in {server.startup_seconds:.1f} s (log {log_path})",
              file=sys.stderr)
        yield server
    finally:
        _stop(process)


@pytest.fixture(scope="session")
def vllm_endpoint(vllm_server: VllmServer) -> VllmEndpoint:
    """``(base_url, served_model_name)`` of the session's real vLLM server."""
    return vllm_server.endpoint
