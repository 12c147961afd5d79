"""Keys and the admin API over real gateway processes: CLI, propagation, durability, secrecy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import pytest

from tests.fixtures.procs import ADMIN_TOKEN, Gateway, GatewayFactory, SimFactory, basic_config

REVOCATION_BOUND_SECONDS = 1.0


def cli(gateway: Gateway, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PLATEFORME_URL": gateway.url, "PLATEFORME_ADMIN_TOKEN": ADMIN_TOKEN}
    return subprocess.run([sys.executable, "-m", "deploy.cli", *args], capture_output=True,
                          text=True, timeout=60, env=env)


def models_status(gateway: Gateway, key: str) -> int:
    return httpx.get(f"{gateway.url}/v1/models", headers={"authorization": f"Bearer {key}"},
                     timeout=5).status_code


def test_cli_key_works_on_a_second_gateway_and_revocation_reaches_it_within_1s(
        sims: SimFactory, gateways: GatewayFactory, redis_store_url: str) -> None:
    sim = sims()
    config = basic_config([sim.url], redis_store_url)
    first, second = gateways(config), gateways(config)

    created = cli(first, "keys", "create", "--owner", "alice@example.com", "--plan", "beta",
                  "--json")
    assert created.returncode == 0, created.stderr
    key = json.loads(created.stdout)
    assert key["key"].startswith("plf_") and key["owner"] == "alice@example.com"

    assert models_status(second, key["key"]) == 200
    chat = httpx.post(f"{second.url}/v1/chat/completions",
                      headers={"authorization": f"Bearer {key['key']}"}, timeout=10,
                      json={"model": "small", "messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 200, chat.text

    revoked = cli(first, "keys", "revoke", key["id"])
    assert revoked.returncode == 0, revoked.stderr
    revoked_at = time.monotonic()
    while models_status(second, key["key"]) != 401:
        assert time.monotonic() - revoked_at < REVOCATION_BOUND_SECONDS, "revocation too slow"
        time.sleep(0.02)
    assert models_status(first, key["key"]) == 401


@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_keys_and_replicas_survive_a_gateway_restart(
        store: str, sims: SimFactory, gateways: GatewayFactory, redis_store_url: str,
        sqlite_url: str) -> None:
    sim = sims()
    config = basic_config([], sqlite_url if store == "sqlite" else redis_store_url)
    gateway = gateways(config)
    key = gateway.create_key()
    with gateway.admin() as admin:
        admin.register_replica("mistral-small", sim.url)
    gateway.proc.terminate()
    gateway.proc.wait(timeout=15)

    again = gateways(config, port=gateway.port)
    assert models_status(again, key["key"]) == 200
    with again.admin() as admin:
        assert admin.list_replicas("mistral-small") == [sim.url]
    chat = httpx.post(f"{again.url}/v1/chat/completions",
                      headers={"authorization": f"Bearer {key['key']}"}, timeout=10,
                      json={"model": "small", "messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 200, chat.text


def test_admin_api_refuses_bad_tokens_and_never_shows_secrets(
        sims: SimFactory, gateways: GatewayFactory, sqlite_url: str) -> None:
    sim = sims()
    gateway = gateways(basic_config([sim.url], sqlite_url))
    key = gateway.create_key(rpm=5)
    keys_url = f"{gateway.url}/admin/v1/keys"
    for headers in ({}, {"authorization": "Bearer wrong-token-wrong-token-wrong"},
                    {"authorization": f"Bearer {key['key']}"}, {"authorization": ADMIN_TOKEN},
                    {"authorization": "Basic " + ADMIN_TOKEN}):
        response = httpx.get(keys_url, headers=headers, timeout=5)
        assert response.status_code == 401, headers
        error = response.json()["error"]
        assert error["type"] == "authentication_error" and error["message"]
    # the admin token is not an API key either
    assert models_status(gateway, ADMIN_TOKEN) == 401

    admin = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    listing = httpx.get(keys_url, headers=admin, timeout=5).json()["data"]
    shown = httpx.get(f"{keys_url}/{key['id']}", headers=admin, timeout=5).json()
    text = json.dumps(listing) + json.dumps(shown)
    assert key["key"] not in text and "hash" not in text
    assert [k["id"] for k in listing] == [key["id"]] and shown["rpm"] == 5

    changed = httpx.patch(f"{keys_url}/{key['id']}", headers=admin, json={"rpm": 7}, timeout=5)
    assert changed.status_code == 200 and changed.json()["rpm"] == 7
    bad = httpx.patch(f"{keys_url}/{key['id']}", headers=admin, json={"hash": "x"}, timeout=5)
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    unknown_plan = httpx.post(keys_url, headers=admin, json={"owner": "o", "plan": "nope"},
                              timeout=5)
    assert unknown_plan.status_code == 400 and "nope" in unknown_plan.json()["error"]["message"]
    assert httpx.get(f"{keys_url}/0123456789abcdef", headers=admin, timeout=5).status_code == 404

    # one real request so the access log has lines with the key's id
    httpx.post(f"{gateway.url}/v1/chat/completions", timeout=10,
               headers={"authorization": f"Bearer {key['key']}"},
               json={"model": "small", "messages": [{"role": "user", "content": "secret?"}]})
    gateway.proc.terminate()
    gateway.proc.wait(timeout=15)
    logs = gateway.logs()
    assert key["id"] in logs  # the public id may be logged ...
    assert key["key"] not in logs and ADMIN_TOKEN not in logs  # ... never the secret
    assert key["key"].split("_", 2)[2] not in logs and "secret?" not in logs


def test_expired_keys_are_refused(sims: SimFactory, gateways: GatewayFactory,
                                  sqlite_url: str) -> None:
    gateway = gateways(basic_config([sims().url], sqlite_url))
    key = gateway.create_key(expires_in=1)
    assert models_status(gateway, key["key"]) == 200
    time.sleep(1.2)
    response = httpx.get(f"{gateway.url}/v1/models", timeout=5,
                         headers={"authorization": f"Bearer {key['key']}"})
    assert response.status_code == 401 and "expired" in response.json()["error"]["message"]
