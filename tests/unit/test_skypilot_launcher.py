"""The SkyPilot launcher at the SDK boundary: a fake SDK with the same plain functions (request
ids are strings), so no API server, no cloud and no `sky` import."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import pytest

from deploy.errors import LaunchError, NotDeployed, ReadinessTimeout, SpecError
from deploy.launcher import TierSpec, UpOptions
from deploy.skypilot_launcher import SkyPilotLauncher, service_name, to_deploy_error

SPEC = TierSpec(tier="small", config={"envs": {"MODEL_ID": "m"}}, source="sky/small.yaml")


def record(status: str, replicas: Sequence[tuple[int, str]] = ()) -> dict[str, Any]:
    return {"name": "plateforme-small", "status": status, "endpoint": "1.2.3.4:30001",
            "replica_info": [{"replica_id": rid, "status": st, "endpoint": f"10.0.0.{rid}:8000"}
                             for rid, st in replicas]}


class FakeSky:
    """Scripted SkyServe: each status call pops the next list of records (the last repeats)."""

    def __init__(self, statuses: list[list[dict[str, Any]]]) -> None:
        self.statuses = statuses
        self.calls: list[str] = []
        self.results: dict[str, Any] = {}
        self.fail_with: Exception | None = None

    def _request(self, name: str, result: Any) -> str:
        request_id = f"req-{len(self.calls)}"
        self.calls.append(name)
        self.results[request_id] = result
        return request_id

    def task_from_yaml_config(self, config: dict[str, Any],
                              secrets: Sequence[tuple[str, str]]) -> Any:
        if "bad" in config:
            raise ValueError("Invalid task YAML: bad")
        return ("task", dict(secrets))

    def serve_up(self, task: Any, service_name: str) -> str:
        return self._request("up", (service_name, "1.2.3.4:30001"))

    def serve_status(self, service_names: list[str] | None) -> str:
        current = self.statuses[0] if len(self.statuses) == 1 else self.statuses.pop(0)
        return self._request("status", current)

    def serve_down(self, service_names: list[str]) -> str:
        return self._request("down", None)

    def serve_tail_logs(self, service_name: str, replica_id: int, tail: int,
                        output_stream: io.StringIO) -> None:
        output_stream.write(f"log of replica {replica_id}, last {tail}\n")

    def get(self, request_id: str) -> Any:
        assert isinstance(request_id, str)
        if self.fail_with is not None:
            raise self.fail_with
        return self.results[request_id]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def make(statuses: list[list[dict[str, Any]]]) -> tuple[SkyPilotLauncher, FakeSky, Clock]:
    fake, clock = FakeSky(statuses), Clock()
    return SkyPilotLauncher(fake, sleep=clock.sleep, clock=clock), fake, clock


def test_up_waits_for_ready_with_progress() -> None:
    launcher, fake, _ = make([
        [],  # not there yet: create it
        [record("CONTROLLER_INIT")],
        [record("REPLICA_INIT", [(1, "PROVISIONING")])],
        [record("REPLICA_INIT", [(1, "STARTING")])],
        [record("READY", [(1, "READY"), (2, "STARTING")])],
    ])
    seen: list[str] = []
    endpoint = launcher.up("small", SPEC, UpOptions(progress=seen.append,
                                                    secrets={"VLLM_API_KEY": "k"}))
    assert fake.calls.count("up") == 1
    assert endpoint.url == "http://1.2.3.4:30001"
    assert endpoint.replica_urls == ("http://10.0.0.1:8000",)
    assert any("1 PROVISIONING" in line for line in seen)
    assert any("1 READY" in line for line in seen)


def test_second_up_does_not_create_a_second_service() -> None:
    launcher, fake, _ = make([[record("READY", [(1, "READY")])]])
    launcher.up("small", SPEC, UpOptions())
    launcher.up("small", SPEC, UpOptions())
    assert "up" not in fake.calls


def test_ready_service_without_ready_replica_keeps_waiting() -> None:
    launcher, _, clock = make([[], [record("READY", [(1, "NOT_READY")])],
                               [record("READY", [(1, "READY")])]])
    launcher.up("small", SPEC, UpOptions(poll_interval_seconds=5))
    assert clock.now == 5


def test_timeout_raises_readiness_timeout() -> None:
    launcher, _, clock = make([[], [record("REPLICA_INIT", [(1, "STARTING")])]])
    with pytest.raises(ReadinessTimeout, match="not READY after 60 s"):
        launcher.up("small", SPEC, UpOptions(wait_timeout_seconds=60, poll_interval_seconds=10))
    assert clock.now == 60


def test_failed_service_is_a_launch_error() -> None:
    launcher, _, _ = make([[], [record("FAILED", [(1, "FAILED_INITIAL_DELAY")])]])
    with pytest.raises(LaunchError, match="FAILED_INITIAL_DELAY"):
        launcher.up("small", SPEC, UpOptions())


def test_existing_failed_service_must_be_torn_down_first() -> None:
    launcher, fake, _ = make([[record("CONTROLLER_FAILED")]])
    with pytest.raises(LaunchError, match="deploy down small"):
        launcher.up("small", SPEC, UpOptions())
    assert "up" not in fake.calls


def test_invalid_spec_is_a_spec_error() -> None:
    launcher, _, _ = make([[]])
    bad = TierSpec(tier="small", config={"bad": True}, source="x.yaml")
    with pytest.raises(SpecError, match="x.yaml"):
        launcher.up("small", bad, UpOptions())


def test_sdk_errors_are_mapped() -> None:
    launcher, fake, _ = make([[]])
    fake.fail_with = RuntimeError("Could not connect to SkyPilot API server")
    with pytest.raises(LaunchError, match="API server"):
        launcher.status("small")

    class ClusterNotUpError(Exception):  # SkyPilot's class name, matched along the MRO
        pass

    assert isinstance(to_deploy_error(ClusterNotUpError("no controller"), "status"), NotDeployed)


def test_status_down_logs() -> None:
    launcher, fake, _ = make([[record("READY", [(1, "READY"), (2, "STARTING")])]])
    statuses = launcher.status("small")
    assert [(r.replica_id, r.status, r.ready) for r in statuses] == [
        ("1", "READY", True), ("2", "STARTING", False)]
    assert "replica 1, last 50" in launcher.logs("small", tail=50)
    launcher.down("small")
    assert fake.calls[-1] == "down"


def test_status_and_down_of_missing_service() -> None:
    launcher, fake, _ = make([[]])
    with pytest.raises(NotDeployed, match=service_name("small")):
        launcher.status("small")
    with pytest.raises(NotDeployed):
        launcher.down("small")
    assert "down" not in fake.calls
