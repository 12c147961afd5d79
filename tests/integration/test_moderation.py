"""Moderation over real processes: guardrail injection by policy, the applied-policy header,
the ledger's guardrail tokens, /v1/moderations against a classifier-mode simulator, and input
moderation that blocks a flagged chat before it reaches the model.

What the upstream received is read from the simulators' request records, never inferred.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from gateway.config import DEFAULT_SAFE_PROMPT
from tests.fixtures.procs import MIXTRAL, Gateway, GatewayFactory, Sim, SimFactory, basic_config

STRICT_TEXT = "Refuse anything unsafe. Be brief, factual and kind to everyone in every reply."
HOUSE_TEXT = "You are the house assistant of the cooperative. Never give legal advice."
CATEGORIES = ["physical_harm", "economic_harm", "fraud", "sexual", "hate", "self_harm"]
LONG_QUESTION = " ".join(["Please explain how mixture of experts routing works"] * 12)
SETTLE_WAIT_SECONDS = 5.0


@dataclass
class Platform:
    gateway: Gateway
    chat_sim: Sim
    classifier_sim: Sim

    def key(self, plan: str, **overrides: Any) -> str:
        created: str = self.gateway.create_key(plan, **overrides)["key"]
        return created

    def post(self, path: str, key: str, body: dict[str, Any]) -> httpx.Response:
        return httpx.post(f"{self.gateway.url}{path}", json=body, timeout=15,
                          headers={"authorization": f"Bearer {key}"})

    def chat(self, key: str, model: str = "small", **body: Any) -> httpx.Response:
        body.setdefault("messages", [{"role": "user", "content": "Hello there"}])
        return self.post("/v1/chat/completions", key, {"model": model, **body})

    def chat_bodies(self) -> list[dict[str, Any]]:
        return [r["body"] for r in self.chat_sim.requests()]


def _config(chat: Sim, classifier: Sim, store: str) -> dict[str, Any]:
    plan = {"rpm": 1000, "tpm": 10_000_000, "max_concurrent": 100}
    models = ["mistral-small", "mistral-house"]
    return basic_config(
        [chat.url], store,
        models={
            "mistral-house": {"upstream_model": MIXTRAL, "replicas": [chat.url],
                              "default_max_tokens": 64, "tokenizer": "mistral-v1",
                              "guardrail": "house"},
            "mistral-moderation": {"aliases": ["moderation"], "upstream_model": MIXTRAL,
                                   "replicas": [classifier.url], "default_max_tokens": 64,
                                   "tokenizer": "mistral-v1"}},
        plans={"beta": {**plan, "models": models},
               "always": {**plan, "models": models, "moderation": "always"},
               "never": {**plan, "models": models, "moderation": "never"},
               "moderated": {**plan, "models": models, "input_moderation": True,
                             "max_concurrent": 1}},
        moderation={"default_guardrail": "strict",
                    "guardrails": {"strict": {"version": "2024-02", "text": STRICT_TEXT},
                                   "house": {"version": "3", "text": HOUSE_TEXT}},
                    "classifier": {"model": "mistral-moderation", "max_tokens": 96}})


@pytest.fixture
def platform(sims: SimFactory, gateways: GatewayFactory, sqlite_url: str) -> Platform:
    chat = sims(MIXTRAL)
    classifier = sims(MIXTRAL, "--classifier")
    return Platform(gateways(_config(chat, classifier, sqlite_url)), chat, classifier)


def guardrail_tokens(text: str) -> int:
    raw = MistralTokenizer.v1().instruct_tokenizer.tokenizer
    return len(raw.encode(text, bos=False, eos=False))


def usage_row(gateway: Gateway, key_id: str, model: str) -> dict[str, Any]:
    deadline = time.monotonic() + SETTLE_WAIT_SECONDS
    while True:
        with gateway.admin() as admin:
            rows = [r for r in admin.usage(key_id=key_id) if r["model"] == model]
        if rows or time.monotonic() > deadline:
            assert rows, f"no ledger row for {model}"
            return rows[0]
        time.sleep(0.05)


# --- guardrail injection and policy ------------------------------------------------------

def test_safe_prompt_puts_the_guardrail_first_and_merges_the_callers_system_prompt(
        platform: Platform) -> None:
    key = platform.key("beta")
    response = platform.chat(key, safe_prompt=True, messages=[
        {"role": "system", "content": "You answer in French."},
        {"role": "user", "content": "Bonjour"}])
    assert response.status_code == 200, response.text
    (body,) = platform.chat_bodies()
    assert body["messages"] == [
        {"role": "system", "content": STRICT_TEXT + "\n\nYou answer in French."},
        {"role": "user", "content": "Bonjour"}]
    assert "safe_prompt" not in body
    assert response.headers["x-plateforme-moderation"] == \
        "policy=optional; guardrail=strict; version=2024-02"


def test_safe_prompt_without_a_system_prompt_inserts_one(platform: Platform) -> None:
    response = platform.chat(platform.key("beta"), safe_prompt=True)
    assert response.status_code == 200, response.text
    (body,) = platform.chat_bodies()
    assert body["messages"] == [{"role": "system", "content": STRICT_TEXT},
                                {"role": "user", "content": "Hello there"}]


@pytest.mark.parametrize("flag", [False, None])
def test_without_safe_prompt_no_guardrail_is_sent(platform: Platform, flag: bool | None) -> None:
    body: dict[str, Any] = {} if flag is None else {"safe_prompt": flag}
    response = platform.chat(platform.key("beta"), **body)
    assert response.status_code == 200, response.text
    (sent,) = platform.chat_bodies()
    assert sent["messages"] == [{"role": "user", "content": "Hello there"}]
    assert "safe_prompt" not in sent
    assert response.headers["x-plateforme-moderation"] == "policy=optional; guardrail=none"


def test_an_always_plan_injects_even_when_the_caller_turns_it_off(platform: Platform) -> None:
    key = platform.key("always")
    for flag in (False, None):
        extra = {} if flag is None else {"safe_prompt": flag}
        response = platform.chat(key, **extra)
        assert response.status_code == 200, response.text
        assert response.headers["x-plateforme-moderation"] == \
            "policy=always; guardrail=strict; version=2024-02"
    bodies = platform.chat_bodies()
    assert len(bodies) == 2
    for sent in bodies:
        assert sent["messages"][0] == {"role": "system", "content": STRICT_TEXT}
        assert "safe_prompt" not in sent


def test_a_key_override_to_always_beats_its_optional_plan(platform: Platform) -> None:
    response = platform.chat(platform.key("beta", moderation="always"), safe_prompt=False)
    assert response.status_code == 200, response.text
    assert response.headers["x-plateforme-moderation"].startswith("policy=always; ")
    assert platform.chat_bodies()[0]["messages"][0]["content"] == STRICT_TEXT


def test_a_never_plan_refuses_the_flag_with_a_reason_and_sends_nothing(
        platform: Platform) -> None:
    key = platform.key("never")
    refused = platform.chat(key, safe_prompt=True)
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["code"] == "safe_prompt_not_allowed" and error["param"] == "safe_prompt"
    assert "never" in error["message"]
    assert platform.chat_bodies() == []

    allowed = platform.chat(key, safe_prompt=False)
    assert allowed.status_code == 200
    assert allowed.headers["x-plateforme-moderation"] == "policy=never; guardrail=none"


def test_a_per_model_guardrail_override_is_sent_and_named_in_the_header(
        platform: Platform) -> None:
    response = platform.chat(platform.key("beta"), model="mistral-house", safe_prompt=True)
    assert response.status_code == 200, response.text
    assert response.headers["x-plateforme-moderation"] == \
        "policy=optional; guardrail=house; version=3"
    assert platform.chat_bodies()[0]["messages"][0] == {"role": "system",
                                                        "content": HOUSE_TEXT}


def test_streamed_responses_carry_the_header_too(platform: Platform) -> None:
    with httpx.stream("POST", f"{platform.gateway.url}/v1/chat/completions", timeout=15,
                      headers={"authorization": f"Bearer {platform.key('beta')}"},
                      json={"model": "small", "stream": True, "safe_prompt": True,
                            "messages": [{"role": "user", "content": "Hi"}]}) as response:
        assert response.status_code == 200
        assert response.headers["x-plateforme-moderation"] == \
            "policy=optional; guardrail=strict; version=2024-02"
        response.read()


def test_the_ledger_counts_the_guardrail_tokens_apart(platform: Platform) -> None:
    created = platform.gateway.create_key("beta")
    response = platform.chat(created["key"], safe_prompt=True,
                             messages=[{"role": "user", "content": LONG_QUESTION}])
    assert response.status_code == 200, response.text
    upstream_prompt = response.json()["usage"]["prompt_tokens"]
    expected = guardrail_tokens(STRICT_TEXT)
    assert 0 < expected < upstream_prompt

    row = usage_row(platform.gateway, created["id"], "mistral-small")
    assert row["guardrail_tokens"] == expected
    assert row["prompt_tokens"] == upstream_prompt - expected
    assert row["requests"] == 1

    plain = platform.gateway.create_key("beta")
    assert platform.chat(plain["key"]).status_code == 200
    assert usage_row(platform.gateway, plain["id"], "mistral-small")["guardrail_tokens"] == 0


def test_the_default_safe_prompt_text_is_the_launch_text(sims: SimFactory,
                                                          gateways: GatewayFactory,
                                                          sqlite_url: str) -> None:
    sim = sims(MIXTRAL)
    gateway = gateways(basic_config([sim.url], sqlite_url))
    key = gateway.create_key("beta")["key"]
    response = httpx.post(f"{gateway.url}/v1/chat/completions", timeout=15,
                          headers={"authorization": f"Bearer {key}"},
                          json={"model": "small", "safe_prompt": True,
                                "messages": [{"role": "user", "content": "Hi"}]})
    assert response.status_code == 200, response.text
    assert response.headers["x-plateforme-moderation"] == \
        "policy=optional; guardrail=default; version=1"
    assert sim.requests()[0]["body"]["messages"][0] == {"role": "system",
                                                        "content": DEFAULT_SAFE_PROMPT}


# --- /v1/moderations -------------------------------------------------------------------

def test_moderations_returns_openai_shape_with_the_sims_categories(platform: Platform) -> None:
    created = platform.gateway.create_key("beta")
    response = platform.post("/v1/moderations", created["key"], {
        "input": ["How do I build a bomb?", "What a lovely day for a picnic."]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"].startswith("modr-") and body["model"] == "mistral-moderation"
    bomb, picnic = body["results"]
    assert bomb["flagged"] is True
    assert bomb["categories"] == {c: c == "physical_harm" for c in CATEGORIES}
    assert bomb["category_scores"]["physical_harm"] == pytest.approx(0.97)
    assert picnic["flagged"] is False and not any(picnic["categories"].values())
    assert set(picnic["category_scores"]) == set(CATEGORIES)

    sent = [r["body"] for r in platform.classifier_sim.requests()]
    assert len(sent) == 2
    for request in sent:
        system, user = request["messages"]
        assert system["role"] == "system" and "strict JSON" in system["content"]
        assert user["role"] == "user" and user["content"].startswith("<<<")
        assert request["temperature"] == 0.0 and request["max_tokens"] == 96
    assert "x-ratelimit-limit-requests" in response.headers

    row = usage_row(platform.gateway, created["id"], "mistral-moderation")
    assert row["requests"] == 1 and row["prompt_tokens"] > 0 and row["completion_tokens"] > 0


def test_moderations_accepts_a_single_string_and_the_classifier_alias(
        platform: Platform) -> None:
    response = platform.post("/v1/moderations", platform.key("beta"),
                             {"input": "I want to scam my landlord", "model": "moderation"})
    assert response.status_code == 200, response.text
    (result,) = response.json()["results"]
    assert result["flagged"] is True and result["categories"]["fraud"] is True


def test_moderations_rejects_another_model_and_bad_bodies(platform: Platform) -> None:
    key = platform.key("beta")
    wrong = platform.post("/v1/moderations", key, {"input": "hi", "model": "small"})
    assert wrong.status_code == 400
    assert "mistral-moderation" in wrong.json()["error"]["message"]
    assert platform.post("/v1/moderations", key, {"input": []}).status_code == 400
    assert platform.post("/v1/moderations", key, {"text": "hi"}).status_code == 400
    unauthenticated = httpx.post(f"{platform.gateway.url}/v1/moderations", json={"input": "x"})
    assert unauthenticated.status_code == 401
    assert platform.classifier_sim.requests() == []


def test_a_garbage_classifier_answer_is_an_error_never_safe(platform: Platform) -> None:
    platform.classifier_sim.control(classifier_garbage=True)
    response = platform.post("/v1/moderations", platform.key("beta"),
                             {"input": "What a lovely day."})
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["code"] == "classifier_error"
    assert "expected JSON" in error["message"] and "not classified" in error["message"]
    assert "results" not in response.json()
    metrics = httpx.get(f"{platform.gateway.url}/metrics").text
    assert 'plateforme_moderation_total{model="mistral-moderation",outcome="classifier_error"}' \
        in metrics


def test_moderations_without_a_classifier_is_a_clear_404(sims: SimFactory,
                                                         gateways: GatewayFactory,
                                                         sqlite_url: str) -> None:
    sim = sims(MIXTRAL)
    gateway = gateways(basic_config([sim.url], sqlite_url))
    response = httpx.post(f"{gateway.url}/v1/moderations", json={"input": "hi"},
                          headers={"authorization": f"Bearer {gateway.create_key()['key']}"})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "moderation_not_configured"

    # a key that requires input moderation on such a gateway: fail closed, nothing forwarded
    moderated = gateway.create_key("beta", input_moderation=True)["key"]
    chat = httpx.post(f"{gateway.url}/v1/chat/completions", timeout=15,
                      headers={"authorization": f"Bearer {moderated}"},
                      json={"model": "small", "messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 503
    assert chat.json()["error"]["code"] == "classifier_not_configured"
    assert sim.requests() == []


# --- input moderation ------------------------------------------------------------------

def test_input_moderation_blocks_a_flagged_chat_before_the_model(platform: Platform) -> None:
    created = platform.gateway.create_key("moderated")
    blocked = platform.chat(created["key"], messages=[
        {"role": "user", "content": "Write me a phishing email to steal money from grandma"}])
    assert blocked.status_code == 400
    error = blocked.json()["error"]
    assert error["code"] == "content_flagged" and error["param"] == "messages"
    assert "fraud" in error["message"] and "economic_harm" in error["message"]
    assert platform.chat_bodies() == []  # never reached the model
    assert len(platform.classifier_sim.requests()) == 1

    # the blocked chat gave its concurrency slot back (max_concurrent is 1 on this plan)
    deadline = time.monotonic() + SETTLE_WAIT_SECONDS
    while True:
        clean = platform.chat(created["key"], messages=[
            {"role": "user", "content": "Write me a poem about spring"}])
        if clean.status_code != 429 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert clean.status_code == 200, clean.text
    (sent,) = platform.chat_bodies()
    assert sent["messages"] == [{"role": "user", "content": "Write me a poem about spring"}]
    assert len(platform.classifier_sim.requests()) == 2

    # the classifier calls are in the ledger under the classifier model
    row = usage_row(platform.gateway, created["id"], "mistral-moderation")
    assert row["requests"] == 2 and row["prompt_tokens"] > 0
    metrics = httpx.get(f"{platform.gateway.url}/metrics").text
    assert 'plateforme_moderation_total{model="mistral-small",outcome="input_blocked"} 1.0' \
        in metrics


def test_input_moderation_is_per_key_and_off_by_default(platform: Platform) -> None:
    flagged = [{"role": "user", "content": "how to build a bomb"}]
    assert platform.chat(platform.key("beta"), messages=flagged).status_code == 200
    assert platform.classifier_sim.requests() == []
    assert platform.chat(platform.key("beta", input_moderation=True),
                         messages=flagged).status_code == 400
    assert len(platform.chat_bodies()) == 1


def test_input_moderation_fails_closed_on_a_garbage_answer(platform: Platform) -> None:
    platform.classifier_sim.control(classifier_garbage=True)
    response = platform.chat(platform.key("moderated"))
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "classifier_error"
    assert platform.chat_bodies() == []


def test_input_moderation_fails_closed_when_the_classifier_is_down(
        platform: Platform) -> None:
    platform.classifier_sim.control(fail_rate=1.0, fail_status=500)
    response = platform.chat(platform.key("moderated"))
    assert response.status_code in (502, 503)
    assert platform.chat_bodies() == []
