"""The operator's config: each kind of error stops start-up with the field named."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import (
    ConfigError,
    check_admin_token,
    load_catalog,
    parse_catalog,
)

GOOD: dict[str, Any] = {
    "store": "sqlite:////tmp/x.db",
    "models": {"mistral-small": {"aliases": ["small"], "upstream_model": "m",
                                 "replicas": ["http://10.0.0.5:8000"]}},
    "plans": {"beta": {"rpm": 60, "models": ["mistral-small"], "moderation": "optional"}},
}


def with_change(path: list[str], value: Any) -> dict[str, Any]:
    import copy
    data = copy.deepcopy(GOOD)
    node = data
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return data


def test_good_config_parses() -> None:
    catalog = parse_catalog(GOOD)
    assert catalog.resolve_name("small") == "mistral-small"
    assert catalog.models["mistral-small"].default_max_tokens == 1024
    assert catalog.plans["beta"].rpm == 60


@pytest.mark.parametrize("data, field, value", [
    (with_change(["models", "mistral-small", "colour"], "red"), "models.mistral-small.colour",
     "unknown field"),
    (with_change(["plans", "beta", "models"], ["mistral-large"]), "plans.beta.models",
     "mistral-large"),
    (with_change(["models", "other"], {"aliases": ["small"], "upstream_model": "x"}),
     "aliases", "small"),
    (with_change(["models", "mistral-small", "replicas"], ["ftp://nope"]),
     "models.mistral-small.replicas", "ftp://nope"),
    (with_change(["models", "mistral-small", "replicas"], ["http://host:99999"]),
     "models.mistral-small.replicas", "99999"),
    (with_change(["plans", "beta", "moderation"], "sometimes"), "plans.beta.moderation",
     "sometimes"),
    (with_change(["store"], "mysql://db"), "store", "mysql://db"),
    (with_change(["plans", "beta", "rpm"], -1), "plans.beta.rpm", "-1"),
    ({**GOOD, "extra_top": 1}, "extra_top", "unknown field"),
])
def test_each_error_names_the_field(data: dict[str, Any], field: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_catalog(data)
    message = str(info.value)
    assert field in message and value in message, message


def test_yaml_errors_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_catalog(bad)
    with pytest.raises(ConfigError, match="cannot read config"):
        load_catalog(tmp_path / "missing.yaml")


def test_admin_token_must_be_long() -> None:
    with pytest.raises(ConfigError, match="too short"):
        check_admin_token("short")
    with pytest.raises(ConfigError, match="not set"):
        check_admin_token("")
    assert check_admin_token("x" * 32) == "x" * 32


def test_gateway_check_command_fails_fast_without_traceback(tmp_path: Path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(with_change(["plans", "beta", "models"], ["nope"])))
    result = subprocess.run([sys.executable, "-m", "deploy.cli", "gateway", "check",
                             "--config", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "plans.beta.models" in result.stderr and "nope" in result.stderr
    assert "Traceback" not in result.stderr
    path.write_text(yaml.safe_dump(GOOD))
    ok = subprocess.run([sys.executable, "-m", "deploy.cli", "gateway", "check",
                         "--config", str(path)], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert "OK" in ok.stdout


def test_serve_refuses_a_short_admin_token(tmp_path: Path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(GOOD))
    import os
    env = {**os.environ, "PLATEFORME_ADMIN_TOKEN": "short"}
    result = subprocess.run([sys.executable, "-m", "deploy.cli", "gateway", "serve",
                             "--config", str(path), "--port", "1"], capture_output=True,
                            text=True, timeout=60, env=env)
    assert result.returncode == 2
    assert "PLATEFORME_ADMIN_TOKEN is too short" in result.stderr
    assert "Traceback" not in result.stderr
