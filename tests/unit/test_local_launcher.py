"""The local launcher for real: the simulator as a subprocess on loopback, its state file, and
`status`/`down`/`logs` from a second launcher (as a second CLI invocation would)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from deploy import specs
from deploy.deploy_cli import deploy_app, drift
from deploy.errors import LaunchError, NotDeployed
from deploy.launcher import ReplicaStatus, TierSpec, UpOptions
from deploy.local_launcher import LocalLauncher

pytestmark = pytest.mark.skipif(
    not (Path(__file__).resolve().parents[2] / "deploy" / "sim.py").exists(),
    reason="deploy/sim.py not written yet")


def test_up_status_down_across_launchers(tmp_path: Path) -> None:
    spec = specs.load_spec("small")
    first = LocalLauncher(state_dir=tmp_path)
    endpoint = first.up("small", spec, UpOptions(wait_timeout_seconds=30))
    try:
        models = httpx.get(f"{endpoint.url}/v1/models").json()
        assert models["data"][0]["id"] == "mistralai/Mixtral-8x7B-Instruct-v0.1"
        state = json.loads((tmp_path / "small.json").read_text())
        assert state["url"] == endpoint.url and state["engine"] == "sim"

        second = LocalLauncher(state_dir=tmp_path)  # another CLI invocation
        assert second.up("small", spec, UpOptions()).url == endpoint.url  # idempotent
        assert [r.status for r in second.status("small")] == ["READY"]
        assert "simulator" in second.logs("small")
        second.down("small")
    finally:
        if (tmp_path / "small.json").exists():
            first.down("small")
    assert not (tmp_path / "small.json").exists()
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{endpoint.url}/health", timeout=2)
    with pytest.raises(NotDeployed):
        first.status("small")


def test_server_that_exits_is_a_launch_error(tmp_path: Path) -> None:
    launcher = LocalLauncher(state_dir=tmp_path, sim_args=("--ttft", "-1"))
    spec = TierSpec(tier="bad", config={"envs": {"MODEL_ID": "m"}}, source="test")
    with pytest.raises(LaunchError, match="exited"):
        launcher.up("bad", spec, UpOptions(wait_timeout_seconds=30))
    assert not (tmp_path / "bad.json").exists()


def test_dead_pid_in_state_file_is_not_alive(tmp_path: Path) -> None:
    (tmp_path / "small.json").write_text(json.dumps({
        "tier": "small", "engine": "sim", "pid": 2**22 + 1, "port": 1, "url": "http://x",
        "model": "m", "log": str(tmp_path / "small.log"), "api_key": False}))
    launcher = LocalLauncher(state_dir=tmp_path)
    assert [r.status for r in launcher.status("small")] == ["STOPPED"]
    launcher.down("small")  # signals nothing, forgets the state
    assert not (tmp_path / "small.json").exists()


def test_cli_up_status_down_local(tmp_path: Path) -> None:
    runner = CliRunner()
    env = {"PLATEFORME_DEPLOY_STATE_DIR": str(tmp_path), "PLATEFORME_ADMIN_TOKEN": ""}
    up = runner.invoke(deploy_app, ["up", "tiny", "--local", "--no-register",
                                    "--wait-timeout", "30"], env=env)
    assert up.exit_code == 0, up.output
    assert "tiny READY at http://127.0.0.1:" in up.output
    try:
        status = runner.invoke(deploy_app, ["status", "tiny", "--local", "--json"], env=env)
        assert status.exit_code == 0, status.output
        assert '"status": "READY"' in status.output
    finally:
        down = runner.invoke(deploy_app, ["down", "tiny", "--local", "--force"], env=env)
    assert down.exit_code == 0, down.output
    again = runner.invoke(deploy_app, ["down", "tiny", "--local", "--force"], env=env)
    assert again.exit_code == 1 and "does not run locally" in again.output


def test_drift_warnings() -> None:
    replicas = [ReplicaStatus("1", "READY", "http://a"), ReplicaStatus("2", "STARTING", "http://b"),
                ReplicaStatus("3", "READY", "http://c")]
    warnings = drift(replicas, ["http://a", "http://b", "http://gone"])
    assert "registered with the gateway but not READY: http://b" in warnings
    assert "registered with the gateway but gone: http://gone" in warnings
    assert "READY but not registered with the gateway: http://c" in warnings
    assert len(warnings) == 3
