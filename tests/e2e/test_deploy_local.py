"""`plateforme deploy up|status|down --local small` as an operator runs it, against a real gateway.

The CLI runs as a subprocess (the installed `plateforme` script), exactly as typed in a shell,
with the admin token in its environment. The gateway's `mistral-small` model starts with no
replica at all, so the only way a chat can succeed is through the endpoint `deploy up`
started and registered; `deploy down` must deregister it before stopping its process.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from plateforme_client import Client

from tests.fixtures.procs import ADMIN_TOKEN, MIXTRAL, Gateway, GatewayFactory, basic_config

MODEL = "mistral-small"
CLI_TIMEOUT_SECONDS = 90.0
PLATEFORME = str(Path(sys.executable).with_name("plateforme"))


def plateforme(*args: str, state_dir: Path, gateway: Gateway) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLATEFORME_")}
    env["PLATEFORME_ADMIN_TOKEN"] = ADMIN_TOKEN
    return subprocess.run(
        [PLATEFORME, "deploy", *args, "--gateway-url", gateway.url, "--state-dir", str(state_dir)],
        env=env, capture_output=True, text=True, timeout=CLI_TIMEOUT_SECONDS, check=False)


def process_gone(pid: int) -> bool:
    """No such process, or only a zombie waiting for a reaper (it runs no code any more)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def wait_for(condition: Callable[[], bool], timeout: float = 15.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.fixture
def gateway(gateways: GatewayFactory, sqlite_url: str) -> Gateway:
    config = basic_config([], sqlite_url)  # mistral-small has no static replica
    return gateways(config)


def test_deploy_up_registers_serves_and_down_deregisters(gateway: Gateway, tmp_path: Path) -> None:
    state_dir = tmp_path / "deploy-state"
    admin = gateway.admin()
    key = gateway.create_key()["key"]
    assert admin.list_replicas(MODEL) == []
    client = Client(api_key=key, base_url=gateway.url, max_retries=0)
    pid: int | None = None
    try:
        up = plateforme("up", "--local", "small", "--wait-timeout", "60",
                        state_dir=state_dir, gateway=gateway)
        assert up.returncode == 0, up.stdout + up.stderr
        match = re.search(r"^small READY at (http://127\.0\.0\.1:\d+)$", up.stdout,
                          re.MULTILINE)
        assert match, up.stdout
        url = match.group(1)
        assert f"registered {url} as a replica of {MODEL}" in up.stdout
        pid = json.loads((state_dir / "small.json").read_text())["pid"]

        # the gateway lists it, and routes a chat with a user's key to it
        assert admin.list_replicas(MODEL) == [url]
        before = httpx.get(f"{url}/sim/stats", timeout=5).json()
        wait_for(lambda: httpx.get(f"{gateway.url}/ready", timeout=5).status_code == 200,
                 what="the gateway to pick the registered replica up")
        reply = client.chat(model="small", messages=[{"role": "user", "content": "Hello!"}],
                            max_tokens=8)
        assert "[plateforme-sim]" in (reply.choices[0].message.content or "")
        seen = httpx.get(f"{url}/sim/requests", timeout=5).json()
        seen = seen if isinstance(seen, list) else seen.get("data", seen.get("requests", []))
        assert seen and seen[-1]["body"]["model"] == MIXTRAL  # it reached the local endpoint
        assert httpx.get(f"{url}/sim/stats", timeout=5).json() != before

        # idempotent: a second `up` finds the running endpoint, registers nothing new
        again = plateforme("up", "--local", "small", "--wait-timeout", "60",
                           state_dir=state_dir, gateway=gateway)
        assert again.returncode == 0, again.stdout + again.stderr
        assert f"small READY at {url}" in again.stdout
        assert admin.list_replicas(MODEL) == [url]
        assert json.loads((state_dir / "small.json").read_text())["pid"] == pid

        # status: the launcher's view and the gateway's, side by side, no drift warning
        status = plateforme("status", "small", "--local", state_dir=state_dir, gateway=gateway)
        assert status.returncode == 0, status.stdout + status.stderr
        assert "small (local):" in status.stdout
        assert re.search(rf"replica {pid}\s+READY\s+{re.escape(url)}", status.stdout)
        assert f"gateway model {MODEL}: {url}" in status.stdout
        assert "warning" not in status.stderr
        as_json = plateforme("status", "small", "--local", "--json", state_dir=state_dir,
                             gateway=gateway)
        view = json.loads(as_json.stdout)
        assert view["registered"] == [url] and view["warnings"] == []
        assert view["replicas"] == [{"id": str(pid), "status": "READY", "url": url}]

        # down: deregistered from the gateway first, then the process is stopped
        down = plateforme("down", "--local", "small", state_dir=state_dir, gateway=gateway)
        assert down.returncode == 0, down.stdout + down.stderr
        lines = down.stdout.splitlines()
        assert lines.index(f"deregistered {url} from {MODEL}") < lines.index("small is down")
        assert admin.list_replicas(MODEL) == []
        wait_for(lambda: process_gone(pid), what=f"the endpoint's process {pid} to exit")
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/health", timeout=2)
        assert not (state_dir / "small.json").exists()
        # and the gateway stops sending traffic there: no healthy replica left for the model
        wait_for(lambda: httpx.post(
            f"{gateway.url}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
            json={"model": "small", "messages": [{"role": "user", "content": "Hi"}]},
            timeout=10).status_code == 503, what="the gateway to drop the replica")
    finally:
        client.close()
        admin.close()
        if pid is not None and not process_gone(pid):  # the test failed half-way: clean up
            plateforme("down", "--local", "small", "--force", state_dir=state_dir,
                       gateway=gateway)
