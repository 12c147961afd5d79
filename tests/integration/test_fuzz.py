"""Property-based fuzzing of every route, generated from the gateway's own OpenAPI schema.

Schemathesis turns `/openapi.json` of a real gateway process (over loopback, a real simulator
behind it) into Hypothesis strategies, valid (positive) and schema-violating (negative), and
each case is sent with the right credential for its route. The properties: no 5xx, ever; every
error is OpenAI's envelope `{"error": {"message", "type", "code", "param"}}`; every response
carries `x-request-id`.

CI runs `PLATEFORME_FUZZ_EXAMPLES` (default 40) cases per route and generation mode; the long
form is e.g. `PLATEFORME_FUZZ_EXAMPLES=2000 .venv/bin/pytest tests/integration/test_fuzz.py`
(`make fuzz`). Hypothesis runs derandomized, so a CI failure reproduces.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from gateway.config import _check_http_url
from tests.fixtures.procs import (
    ADMIN_TOKEN,
    MIXTRAL,
    Gateway,
    GatewayFactory,
    SimFactory,
    basic_config,
)

EXAMPLES = int(os.environ.get("PLATEFORME_FUZZ_EXAMPLES", "40"))
REGISTRY_MODEL = "registry-target"  # replicas fuzzed here never serve the chat key's model
ROUTES = [
    ("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("POST", "/v1/moderations"),
    ("GET", "/health"), ("GET", "/ready"), ("GET", "/metrics"),
    ("GET", "/admin/v1/keys"), ("POST", "/admin/v1/keys"),
    ("GET", "/admin/v1/keys/{key_id}"), ("PATCH", "/admin/v1/keys/{key_id}"),
    ("DELETE", "/admin/v1/keys/{key_id}"), ("GET", "/admin/v1/usage"),
    ("GET", "/admin/v1/models/{name}/replicas"), ("POST", "/admin/v1/models/{name}/replicas"),
    ("DELETE", "/admin/v1/models/{name}/replicas"),
]
# Routes with a JSON body: the ones negative (schema-violating) cases can target; free-text
# path and query parameters have no invalid value (positive cases already send any string).
INPUTS_TO_BREAK = {(method, path) for method, path in ROUTES if method in ("POST", "PATCH")}
pytestmark = pytest.mark.timeout(max(600, EXAMPLES))


class Target:
    def __init__(self, gateway: Gateway, api_key: str, patch_key_id: str) -> None:
        self.gateway = gateway
        self.api_key = api_key
        self.patch_key_id = patch_key_id
        self.schema = schemathesis.openapi.from_dict(
            httpx.get(f"{gateway.url}/openapi.json", timeout=10).json())
        self.session = requests.Session()


@pytest.fixture(scope="module")
def target(module_sims: SimFactory, module_gateways: GatewayFactory,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    sim = module_sims()
    store = f"sqlite:///{tmp_path_factory.mktemp('fuzz') / 'state.db'}"
    config = basic_config([sim.url], store, plans={"open": {"models": ["mistral-small"]}})
    config["models"][REGISTRY_MODEL] = {"upstream_model": MIXTRAL, "replicas": [sim.url]}
    gateway = module_gateways(config)
    target = Target(gateway, gateway.create_key("open")["key"],
                    gateway.create_key("open")["id"])
    yield target
    target.session.close()


def credential(path: str, target: Target) -> dict[str, str]:
    if path.startswith("/admin/"):
        return {"authorization": f"Bearer {ADMIN_TOKEN}"}
    if path.startswith("/v1/"):
        return {"authorization": f"Bearer {target.api_key}"}
    return {}


def keep_on_loopback(case: Any) -> None:
    """A fuzzed replica URL that validates would make the gateway probe an outside host:
    register it only as a closed loopback port, on a model no test key uses."""
    case.path_parameters = {**(case.path_parameters or {}), "name": REGISTRY_MODEL}
    body = case.body
    if isinstance(body, dict) and isinstance(body.get("url"), str):
        try:
            _check_http_url(body["url"])
        except ValueError:
            return
        case.body = {**body, "url": "http://127.0.0.1:9/"}


def assert_well_formed(response: requests.Response, label: str) -> None:
    assert response.status_code < 500, (label, response.status_code, response.text[:500])
    assert response.headers.get("x-request-id"), (label, dict(response.headers))
    if response.status_code >= 400:
        assert response.headers["content-type"].startswith("application/json"), label
        error = response.json()["error"]
        assert set(error) == {"message", "type", "code", "param"}, (label, error)
        assert isinstance(error["message"], str) and error["message"], (label, error)
        assert isinstance(error["type"], str), (label, error)


def test_every_route_in_the_schema_is_fuzzed(target: Target) -> None:
    paths = target.schema.raw_schema["paths"]
    declared = {(method.upper(), path) for path, ops in paths.items() for method in ops}
    assert declared == set(ROUTES)
    for method, path in [("POST", "/v1/chat/completions"), ("POST", "/admin/v1/keys"),
                         ("PATCH", "/admin/v1/keys/{key_id}"),
                         ("POST", "/admin/v1/models/{name}/replicas")]:
        body = paths[path][method.lower()]["requestBody"]["content"]["application/json"]
        assert "$ref" not in str(body), (method, path)  # every body fully declared, inline
        assert body["schema"]["properties"], (method, path)


CASES = [(method, path, mode) for method, path in ROUTES
         for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
         if mode is GenerationMode.POSITIVE or (method, path) in INPUTS_TO_BREAK]


@pytest.mark.parametrize(("method", "path", "mode"), CASES,
                         ids=[f"{m} {p} {mode.value}" for m, p, mode in CASES])
def test_route_never_answers_5xx_and_errors_are_openai_shaped(
        target: Target, method: str, path: str, mode: GenerationMode) -> None:
    operation = target.schema[path][method]
    strategy = operation.as_strategy(generation_mode=mode)
    label = f"{mode.value} {method} {path}"

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck), print_blob=True)
    @given(case=strategy)
    def run(case: Any) -> None:
        if path == "/admin/v1/models/{name}/replicas" and method == "POST":
            keep_on_loopback(case)
        if path == "/admin/v1/keys/{key_id}" and method == "PATCH":
            case.path_parameters = {"key_id": target.patch_key_id}
        kwargs = case.as_transport_kwargs(base_url=target.gateway.url,
                                          headers=credential(path, target))
        response = target.session.request(**kwargs, timeout=30)
        assert_well_formed(response, f"{label}: {case.as_curl_command()}")

    run()

