"""`/metrics` after real traffic through real gateway processes, and no secret in metrics or logs.

Each test drives a known mix of requests (successes, streams, client errors, rate limits, a
failing replica) through a gateway over loopback, scrapes `/metrics`, parses it with
prometheus-client's own parser, and checks the exact counts: what the operator's dashboard
shows must be what happened. With `--workers 2` the merged exposition (multiprocess mode) must
count every request once, whichever worker served it.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from prometheus_client import CollectorRegistry, generate_latest, multiprocess
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tests.fixtures.procs import ADMIN_TOKEN, Gateway, GatewayFactory, Sim, SimFactory, basic_config

MODEL = "mistral-small"
BROKEN = "mistral-tiny"  # served only by a replica that always answers 503
SETTLE_TIMEOUT_SECONDS = 10.0  # settlement (token counters) runs in a background task
WORKER_RESTART_TIMEOUT_SECONDS = 10.0
WORKERS_START_TIMEOUT_SECONDS = 90.0  # two interpreters importing the gateway on two cores
MESSAGES = [{"role": "user", "content": "Count the experts of a sparse mixture."}]


@pytest.fixture(scope="module")
def good_sim(module_sims: SimFactory) -> Sim:
    # a small inter-token gap so a stream's chunks arrive apart (inter-token latency is observed)
    return module_sims("mistralai/Mixtral-8x7B-Instruct-v0.1", "--itl", "0.01")


@pytest.fixture(scope="module")
def broken_sim(module_sims: SimFactory) -> Sim:
    return module_sims("mistral-7b", "--fail-rate", "1", "--fail-status", "503")


def config_for(good: Sim, broken: Sim, tmp: Path) -> dict[str, Any]:
    config = basic_config([good.url], f"sqlite:///{tmp / 'state.db'}",
                          routing={"cooldown_seconds": 60.0})  # an ejected replica stays out
    config["models"][BROKEN] = {"aliases": ["tiny"], "upstream_model": "mistral-7b",
                                "replicas": [broken.url]}
    config["plans"]["beta"]["models"] = [MODEL, BROKEN]
    return config


# --- reading the exposition ------------------------------------------------------------------
class Scrape:
    """Every sample of one `/metrics` answer, looked up by sample name and a label subset."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: list[Sample] = [
            s for family in text_string_to_metric_families(text) for s in family.samples]

    def matching(self, name: str, **labels: str) -> list[Sample]:
        return [s for s in self.samples if s.name == name
                and all(s.labels.get(k) == v for k, v in labels.items())]

    def value(self, name: str, **labels: str) -> float:
        """The sum over every sample of `name` whose labels include `labels` (0 if none)."""
        return sum(s.value for s in self.matching(name, **labels))


def scrape(gateway: Gateway) -> Scrape:
    response = httpx.get(f"{gateway.url}/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return Scrape(response.text)


def scrape_until(gateway: Gateway, ready: Any, timeout: float = SETTLE_TIMEOUT_SECONDS) -> Scrape:
    """Scrape until `ready(scrape)` holds (background settlement, health probes) or time out;
    the last scrape is returned either way so the assertions show what was there."""
    deadline = time.monotonic() + timeout
    while True:
        result = scrape(gateway)
        if ready(result) or time.monotonic() > deadline:
            return result
        time.sleep(0.1)


def worker_scrape(prom_dir: Path, pid: str) -> Scrape:
    """One worker's own values: its multiprocess files alone, merged by prometheus-client."""
    alone = prom_dir / f"worker-{pid}"
    alone.mkdir()
    for path in prom_dir.glob(f"*_{pid}.db"):
        shutil.copy(path, alone / path.name)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(alone))
    return Scrape(generate_latest(registry).decode())


# --- driving traffic -------------------------------------------------------------------------
@dataclass
class Usage:
    prompt: int = 0
    completion: int = 0
    answers: list[int] = field(default_factory=list)

    def add(self, usage: dict[str, Any]) -> None:
        self.prompt += int(usage["prompt_tokens"])
        self.completion += int(usage["completion_tokens"])


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def chat(gateway: Gateway, key: str, usage: Usage | None = None, *, model: str = "small",
         max_tokens: int = 5, headers: dict[str, str] | None = None,
         **extra: Any) -> httpx.Response:
    response = httpx.post(f"{gateway.url}/v1/chat/completions",
                          headers={**auth(key), **(headers or {})}, timeout=30,
                          json={"model": model, "messages": MESSAGES, "max_tokens": max_tokens,
                                **extra})
    if usage is not None and response.status_code == 200:
        usage.add(response.json()["usage"])
    return response


def stream(gateway: Gateway, key: str, usage: Usage, *, max_tokens: int = 6) -> int:
    """One streamed chat with `include_usage`; adds the final usage chunk to `usage`."""
    body = {"model": "small", "messages": MESSAGES, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}}
    seen: dict[str, Any] | None = None
    with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", headers=auth(key),
                      json=body, timeout=30) as response:
        assert response.status_code == 200, response.read()
        done = False
        for line in response.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                chunk = orjson.loads(line[6:])
                seen = chunk.get("usage") or seen
        assert done
    assert seen is not None, "the usage chunk the client asked for never came"
    usage.add(seen)
    return 200


def wait_until_refused(gateway: Gateway, key: str) -> None:
    """Revocation takes effect within seconds (the auth cache): poll until the key gets 401."""
    deadline = time.monotonic() + 15
    while chat(gateway, key).status_code != 401:
        assert time.monotonic() < deadline, "revoked key still accepted after 15 s"
        time.sleep(0.2)


# --- tests -----------------------------------------------------------------------------------
def test_counters_and_histograms_match_the_traffic(
        gateways: GatewayFactory, good_sim: Sim, broken_sim: Sim, tmp_path: Path) -> None:
    gateway = gateways(config_for(good_sim, broken_sim, tmp_path))
    key = gateway.create_key()["key"]
    limited = gateway.create_key(rpm=2)["key"]
    usage = Usage()

    unary = [chat(gateway, key, usage, max_tokens=n) for n in (3, 5, 8, 13)]
    streams = [stream(gateway, key, usage, max_tokens=n) for n in (4, 6, 9)]
    within_rpm = [chat(gateway, limited, usage) for _ in range(2)]
    # the guardrail system prompt: the upstream counts it in prompt_tokens, the gateway apart
    guarded = Usage()
    assert chat(gateway, key, guarded, safe_prompt=True).status_code == 200
    over_rpm = [chat(gateway, limited) for _ in range(3)]
    assert [r.status_code for r in unary + within_rpm] == [200] * 6
    assert [r.status_code for r in over_rpm] == [429] * 3
    assert len(streams) == 3
    # client errors the gateway refuses before it knows the model: no model label
    unresolved = [
        chat(gateway, "plf_0123456789abcdef_" + "x" * 43),            # unknown key: 401
        chat(gateway, "not-even-a-key"),                               # malformed: 401
        chat(gateway, key, model="no-such-model"),                     # 404
        httpx.post(f"{gateway.url}/v1/chat/completions", headers=auth(key),
                   content=b"{not json", timeout=10),                  # 400
    ]
    assert [r.status_code for r in unresolved] == [401, 401, 404, 400]
    # a model whose only replica answers 503: 502 three times, then ejected (503, no attempt)
    broken = [chat(gateway, key, model="tiny") for _ in range(4)]
    assert [r.status_code for r in broken] == [502, 502, 502, 503]
    assert httpx.get(f"{gateway.url}/v1/models", headers=auth(key), timeout=10).status_code == 200

    def settled(s: Scrape) -> bool:
        return (s.value("plateforme_tokens_total", model=MODEL, kind="completion")
                == usage.completion + guarded.completion
                and s.value("plateforme_replica_healthy", model=BROKEN) == 0
                and s.value("plateforme_replica_healthy", model=MODEL) == 1)

    s = scrape_until(gateway, settled)
    requests = "plateforme_requests_total"
    assert s.value(requests, route="chat", model=MODEL, status_class="2xx") == 4 + 3 + 2 + 1
    assert s.value(requests, route="chat", model=MODEL, status_class="4xx") == 3
    assert s.value(requests, route="chat", model=MODEL, status_class="5xx") == 0
    assert s.value(requests, route="chat", model="", status_class="4xx") == 4
    assert s.value(requests, route="chat", model=BROKEN, status_class="5xx") == 4
    assert s.value(requests, route="models", status_class="2xx") == 1

    duration = "plateforme_request_duration_seconds_count"
    assert s.value(duration, model=MODEL, stream="false") == 4 + 2 + 1 + 3  # 429s took time too
    assert s.value(duration, model=MODEL, stream="true") == 3
    assert s.value("plateforme_request_duration_seconds_bucket", model=MODEL, stream="true",
                   le="+Inf") == 3
    assert s.value("plateforme_request_duration_seconds_sum", model=MODEL) > 0
    assert s.value("plateforme_time_to_first_token_seconds_count", model=MODEL) == 3
    assert s.value("plateforme_inter_token_latency_seconds_count", model=MODEL) == 3
    assert s.value("plateforme_time_to_first_token_seconds_count", model=BROKEN) == 0

    assert usage.prompt > 0 and usage.completion == 3 + 5 + 8 + 13 + 4 + 6 + 9 + 5 + 5
    tokens = "plateforme_tokens_total"
    guardrail = s.value(tokens, model=MODEL, kind="guardrail")
    # (the simulator counts prompt tokens more crudely than the gateway's Mistral tokenizer,
    # so here the guardrail's share may be the whole of that request's prompt)
    assert 0 < guardrail <= guarded.prompt
    assert (s.value(tokens, model=MODEL, kind="prompt") + guardrail
            == usage.prompt + guarded.prompt)
    assert (s.value(tokens, model=MODEL, kind="completion")
            == usage.completion + guarded.completion)
    assert s.value("plateforme_moderation_total", model=MODEL, outcome="guardrail") == 1
    assert s.value("plateforme_tokens_total", model=BROKEN) == 0

    assert s.value("plateforme_rate_limited_total", model=MODEL, limit="requests") == 3
    assert s.value("plateforme_rate_limited_total", limit="tokens") == 0

    errors = "plateforme_upstream_errors_total"
    assert s.value(errors, model=BROKEN, replica=broken_sim.url, kind="status_5xx") == 3
    assert s.value(errors, model=MODEL) == 0
    assert s.value("plateforme_upstream_retries_total") == 0  # one replica: nothing to retry on
    assert s.value("plateforme_replica_healthy", model=MODEL, replica=good_sim.url) == 1
    assert s.value("plateforme_replica_healthy", model=BROKEN, replica=broken_sim.url) == 0
    assert s.value("plateforme_store_up") == 1
    assert s.value("plateforme_store_latency_seconds_count", op="admit") == 4 + 3 + 2 + 1 + 3 + 4


def test_two_workers_merge_into_one_exposition(
        gateways: GatewayFactory, good_sim: Sim, broken_sim: Sim, tmp_path: Path) -> None:
    prom_dir = tmp_path / "prometheus"
    prom_dir.mkdir()
    gateway = gateways(config_for(good_sim, broken_sim, tmp_path), workers=2,
                       env={"PROMETHEUS_MULTIPROC_DIR": str(prom_dir)},
                       start_timeout=WORKERS_START_TIMEOUT_SECONDS)
    key = gateway.create_key()["key"]
    usage = Usage()
    unary, streamed, refused = 24, 6, 4

    # new connections from several threads, so the kernel spreads them over both workers
    with ThreadPoolExecutor(max_workers=8) as pool:
        codes = list(pool.map(lambda n: chat(gateway, key, usage, max_tokens=2 + n % 5)
                              .status_code, range(unary)))
        codes += list(pool.map(lambda _: stream(gateway, key, usage), range(streamed)))
        codes += list(pool.map(lambda _: chat(gateway, "plf_0123456789abcdef_" + "y" * 43)
                               .status_code, range(refused)))
    assert codes == [200] * (unary + streamed) + [401] * refused

    def settled(s: Scrape) -> bool:
        return (s.value("plateforme_tokens_total", model=MODEL, kind="completion")
                == usage.completion)

    s = scrape_until(gateway, settled)
    requests = "plateforme_requests_total"
    assert s.value(requests, route="chat", model=MODEL, status_class="2xx") == unary + streamed
    assert s.value(requests, route="chat", model="", status_class="4xx") == refused
    assert s.value("plateforme_request_duration_seconds_count", model=MODEL,
                   stream="false") == unary
    assert s.value("plateforme_request_duration_seconds_count", model=MODEL,
                   stream="true") == streamed
    assert s.value("plateforme_time_to_first_token_seconds_count", model=MODEL) == streamed
    assert s.value("plateforme_tokens_total", model=MODEL, kind="prompt") == usage.prompt
    assert s.value("plateforme_tokens_total", model=MODEL, kind="completion") == usage.completion
    # multiprocess mode is really on: the per-worker gauges carry the pid of each live worker,
    # and both workers served part of the traffic the merged counters add up
    pids = {sample.labels["pid"] for sample in s.matching("plateforme_replica_healthy",
                                                          model=MODEL)}
    assert len(pids) == 2
    served = {pid: worker_scrape(prom_dir, pid).value(
        requests, route="chat", model=MODEL, status_class="2xx") for pid in pids}
    assert all(served.values()), served
    assert sum(served.values()) == unary + streamed

    # a worker killed outright (as uvicorn's supervisor kills one that misses a health check):
    # its counts stay in the totals, its gauges (replica health, store up) leave with it
    killed = int(next(iter(pids)))
    os.kill(killed, signal.SIGKILL)

    def exported_pids(s: Scrape) -> set[int]:
        return {int(x.labels["pid"]) for x in s.matching("plateforme_replica_healthy")}

    s = scrape_until(gateway, lambda s: killed not in exported_pids(s),
                     timeout=WORKER_RESTART_TIMEOUT_SECONDS)
    assert killed not in exported_pids(s), "a dead worker's gauges are still exported"
    assert s.value(requests, route="chat", model=MODEL, status_class="2xx") == unary + streamed
    assert s.value("plateforme_tokens_total", model=MODEL, kind="completion") == usage.completion


def test_no_secret_in_metrics_or_logs(
        gateways: GatewayFactory, sims: SimFactory, good_sim: Sim, broken_sim: Sim,
        tmp_path: Path) -> None:
    # replicas guarded by a vLLM --api-key: the gateway's own upstream secret must not leak
    # either, not even when a replica refuses it
    replica_key, wrong_replica_key = "vllm-replica-secret-" + "k" * 24, "wrong-replica-" + "w" * 24
    keyed = sims("keyed-model", "--api-key", replica_key)
    config = config_for(good_sim, broken_sim, tmp_path)
    for name, env_name in (("keyed", "TEST_REPLICA_KEY"), ("miskeyed", "TEST_WRONG_KEY")):
        config["models"][name] = {"upstream_model": "keyed-model", "replicas": [keyed.url],
                                  "replica_api_key_env": env_name}
        config["plans"]["beta"]["models"].append(name)
    gateway = gateways(config, env={"TEST_REPLICA_KEY": replica_key,
                                    "TEST_WRONG_KEY": wrong_replica_key})
    created = [gateway.create_key() for _ in range(2)]
    revoked = gateway.create_key(rpm=1)
    key, other = (c["key"] for c in created)
    usage = Usage()
    unknown = "plf_0123456789abcdef_" + "z" * 43
    truncated = key[:-10]

    assert chat(gateway, key, usage).status_code == 200
    stream(gateway, other, usage)
    assert chat(gateway, revoked["key"], usage).status_code == 200
    assert chat(gateway, revoked["key"]).status_code == 429                   # rate limited
    # error paths: a key sent where keys do not belong, unknown, truncated, revoked keys
    assert chat(gateway, key, usage, headers={"x-request-id": key}).status_code == 200
    assert chat(gateway, key, model=key).status_code == 404
    assert chat(gateway, unknown).status_code == 401
    assert chat(gateway, truncated).status_code == 401
    assert chat(gateway, key, model="tiny").status_code == 502               # upstream error
    assert chat(gateway, key, usage, model="keyed").status_code == 200
    assert chat(gateway, key, model="miskeyed").status_code == 502   # replica refuses its key
    httpx.post(f"{gateway.url}/v1/chat/completions", timeout=10,
               headers={"Authorization": key, "Content-Type": "application/json"},
               content=b'{"model": "small", "messages": [{"role": "user", "content": "' +
               key.encode() + b'"}]}')                                        # no "Bearer"
    httpx.get(f"{gateway.url}/v1/models", headers=auth(unknown), timeout=10)
    with gateway.admin() as admin:
        admin.revoke_key(revoked["id"])
    wait_until_refused(gateway, revoked["key"])
    wrong_admin = httpx.get(f"{gateway.url}/admin/v1/keys", headers=auth(key), timeout=10)
    assert wrong_admin.status_code in (401, 403)
    httpx.get(f"{gateway.url}/admin/v1/keys", headers=auth(ADMIN_TOKEN), timeout=10)

    scraped = scrape_until(gateway, lambda s: s.value(
        "plateforme_tokens_total", kind="completion") == usage.completion)
    time.sleep(0.3)  # let the last access-log lines reach the file
    logs = gateway.logs()
    access = [orjson.loads(line) for line in logs.splitlines()
              if line.startswith("{") and '"plateforme.access"' in line]
    assert len(access) >= 12, logs[-2000:]  # the traffic above was logged, one line each
    assert {line["status"] for line in access} >= {200, 401, 404, 429, 502}
    served = [line for line in access if line["route"] == "chat" and line["status"] == 200]
    assert len(served) == 5 and sum(bool(line.get("stream")) for line in served) == 1
    for line in served:  # what the operator needs from one line, streams included
        assert line["replica"] == (keyed.url if line["model"] == "keyed" else good_sim.url)
        assert line["completion_tokens"] > 0 and line["prompt_tokens"] > 0, line
        assert line["request_id"] and line["latency_ms"] > 0, line
    assert sum(line["completion_tokens"] for line in served) == usage.completion

    secrets = {key, other, revoked["key"], unknown, truncated, ADMIN_TOKEN, replica_key,
               wrong_replica_key}
    secrets |= {k.split("_", 2)[2] for k in (key, other, revoked["key"])}  # the secret parts
    for secret in secrets:
        assert secret not in scraped.text, "a secret appears in /metrics"
        assert secret not in logs, f"a secret appears in the gateway's log: {secret[:8]}..."
    # per-key usage belongs in the ledger, not in metric labels: no key id either
    for key_id in {c["id"] for c in created} | {revoked["id"]}:
        assert key_id not in scraped.text
    assert not any("key" in name.lower() for s in scraped.samples for name in s.labels)

