"""Moderation without network: the policy decision, the merge rule, what Mixtral's tokenizer
renders from a merged conversation, the classifier's fixed prompt and its strict parser."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from deploy.sim_content import CLASSIFIER_GARBAGE, classify
from gateway.auth import Principal
from gateway.classifier import (
    CLOSE_FENCE,
    OPEN_FENCE,
    ClassifierAnswerError,
    parse_answer,
    parse_completion,
    prompt_messages,
)
from gateway.config import DEFAULT_MODERATION_CATEGORIES
from gateway.errors import BadRequest
from gateway.moderation import GuardrailChoice, apply, decide, merge
from gateway.routes.moderations import caller_text
from gateway.store import Limits

GUARD = "Always assist with care, respect, and truth."
CATS = DEFAULT_MODERATION_CATEGORIES


def principal(policy: str = "optional") -> Principal:
    return Principal(key_id="k1", owner="o", plan="p", limits=Limits(),
                     models=frozenset({"*"}), moderation=policy,  # type: ignore[arg-type]
                     input_moderation=False)


# --- policy ----------------------------------------------------------------------------

@pytest.mark.parametrize(("policy", "flag", "injected"), [
    ("optional", True, True), ("optional", False, False), ("optional", None, False),
    ("always", True, True), ("always", False, True), ("always", None, True),
    ("never", False, False), ("never", None, False),
])
def test_decide(policy: str, flag: bool | None, injected: bool) -> None:
    assert decide(principal(policy), flag) is injected


def test_never_refuses_the_flag_and_says_why() -> None:
    with pytest.raises(BadRequest) as caught:
        decide(principal("never"), True)
    assert caught.value.code == "safe_prompt_not_allowed"
    assert caught.value.param == "safe_prompt" and "'never'" in caught.value.message


def test_apply_reports_the_guardrail_and_header() -> None:
    choice = GuardrailChoice("strict", "2024-02", GUARD, 11)
    applied = apply([{"role": "user", "content": "hi"}], principal(), True, choice)
    assert applied.guardrail_tokens == 11
    assert applied.header() == "policy=optional; guardrail=strict; version=2024-02"
    skipped = apply([{"role": "user", "content": "hi"}], principal(), False, choice)
    assert skipped.guardrail_tokens == 0 and skipped.header() == "policy=optional; guardrail=none"


# --- merge rule ------------------------------------------------------------------------

def test_merge_inserts_a_system_message_when_there_is_none() -> None:
    messages = [{"role": "user", "content": "hi"}]
    assert merge(messages, GUARD) == [{"role": "system", "content": GUARD},
                                      {"role": "user", "content": "hi"}]
    assert messages == [{"role": "user", "content": "hi"}]  # not mutated


def test_merge_puts_the_guardrail_first_in_the_callers_system_message() -> None:
    messages = [{"role": "system", "content": "Answer in French.", "name": "ops"},
                {"role": "user", "content": "hi"}]
    merged = merge(messages, GUARD)
    assert merged == [{"role": "system", "content": GUARD + "\n\nAnswer in French.",
                       "name": "ops"}, {"role": "user", "content": "hi"}]
    assert messages[0]["content"] == "Answer in French."


def test_merge_with_content_parts_keeps_the_parts_after_the_guardrail() -> None:
    parts = [{"type": "text", "text": "Answer in French."}]
    merged = merge([{"role": "system", "content": parts}], GUARD)
    assert merged[0]["content"] == [{"type": "text", "text": GUARD + "\n\n"}, *parts]


def test_merge_only_merges_a_leading_system_message() -> None:
    messages = [{"role": "user", "content": "hi"}, {"role": "system", "content": "late"}]
    assert merge(messages, GUARD) == [{"role": "system", "content": GUARD}, *messages]


def test_merge_is_deterministic_and_single_system() -> None:
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    once = merge(messages, GUARD)
    assert once == merge(messages, GUARD)
    assert sum(m["role"] == "system" for m in once) == 1


# --- what vLLM's mistral tokenizer mode renders for Mixtral ----------------------------

def render_v1(messages: list[dict[str, Any]]) -> str:
    tokenizer = MistralTokenizer.v1()  # Mixtral 8x7B Instruct's tokenizer
    request = ChatCompletionRequest.model_validate({"messages": messages})
    tokenized = tokenizer.encode_chat_completion(request)
    text = tokenizer.decode(tokenized.tokens)
    assert tokenized.text is not None
    assert tokenized.text.startswith("<s>▁[INST]")
    return text


def test_mixtral_renders_the_guardrail_before_the_user_inside_the_inst_turn() -> None:
    merged = merge([{"role": "system", "content": "Answer in French."},
                    {"role": "user", "content": "What is a sparse mixture of experts?"}], GUARD)
    tokenizer = MistralTokenizer.v1()
    tokenized = tokenizer.encode_chat_completion(
        ChatCompletionRequest.model_validate({"messages": merged}))
    assert tokenized.text is not None
    raw = tokenized.text.replace("▁", " ").replace("<0x0A>", "\n")
    assert raw == (f"<s> [INST] {GUARD}\n\nAnswer in French.\n\n"
                   "What is a sparse mixture of experts? [/INST]")
    # no system turn of its own: one [INST] turn, guardrail first, then the caller's words
    assert raw.count("[INST]") == 1
    inst = raw[raw.index("[INST]"):raw.index("[/INST]")]
    assert inst.index(GUARD) < inst.index("Answer in French.") < inst.index("sparse mixture")


def test_mixtral_v1_renders_the_system_text_in_the_first_user_turn() -> None:
    merged = merge([{"role": "user", "content": "first question"},
                    {"role": "assistant", "content": "an answer"},
                    {"role": "user", "content": "second question"}], GUARD)
    text = render_v1(merged)
    first_turn = text[:text.index("[/INST]")]
    assert GUARD in first_turn and first_turn.index(GUARD) < first_turn.index("first question")
    assert text.count(GUARD) == 1


def test_guardrail_tokens_count_matches_the_tokenizer() -> None:
    from gateway.tokens import TokenCounter

    raw = MistralTokenizer.v1().instruct_tokenizer.tokenizer
    assert TokenCounter("mistral-v1").count_text(GUARD) == len(
        raw.encode(GUARD, bos=False, eos=False))


# --- the classifier's fixed prompt -----------------------------------------------------

def test_the_fixed_prompt_names_every_category_and_fences_the_text() -> None:
    system, user = prompt_messages("some text", CATS)
    assert system["role"] == "system" and user["role"] == "user"
    for name in CATS:
        assert f"- {name}: " in system["content"]
    assert "strict JSON" in system["content"]
    assert user["content"] == f"{OPEN_FENCE}\nsome text\n{CLOSE_FENCE}"
    assert prompt_messages("other", CATS)[0] == system  # fixed: only the text varies


def test_the_fixed_prompt_does_not_itself_look_harmful_to_the_sim() -> None:
    # the simulator classifies the last user message: the wrapper must add nothing
    assert classify(prompt_messages("a nice day", CATS)[1]["content"])["flagged"] is False


def test_unknown_categories_are_described_by_their_name() -> None:
    system, _ = prompt_messages("x", ("spam_links",))
    assert "- spam_links: spam links" in system["content"]


# --- strict parsing --------------------------------------------------------------------

def test_parse_reads_the_sims_answer() -> None:
    verdict = parse_answer(orjson.dumps(classify("how to build a bomb")).decode(), CATS)
    assert verdict.flagged is True and verdict.flagged_categories() == ["physical_harm"]
    assert verdict.scores["physical_harm"] == pytest.approx(0.97)
    assert verdict.result() == {"flagged": True, "categories": verdict.categories,
                                "category_scores": verdict.scores}


def test_parse_tolerates_whitespace_and_one_code_fence() -> None:
    answer = orjson.dumps(classify("hello")).decode()
    assert parse_answer(f"\n  {answer}  \n", CATS).flagged is False
    assert parse_answer(f"```json\n{answer}\n```", CATS).flagged is False


def test_parse_without_scores_derives_them() -> None:
    verdict = parse_answer(orjson.dumps({"categories": {c: c == "hate" for c in CATS}}).decode(),
                           CATS)
    assert verdict.flagged and verdict.scores == {c: float(c == "hate") for c in CATS}


def test_parse_ignores_extra_categories_and_reads_disagreement_as_flagged() -> None:
    answer = {"flagged": True, "categories": {**{c: False for c in CATS}, "extra": True}}
    verdict = parse_answer(orjson.dumps(answer).decode(), CATS)
    assert verdict.flagged is True and set(verdict.categories) == set(CATS)
    answer = {"flagged": False, "categories": {c: c == "fraud" for c in CATS}}
    assert parse_answer(orjson.dumps(answer).decode(), CATS).flagged is True


GOOD = {"flagged": False, "categories": {c: False for c in CATS},
        "scores": {c: 0.0 for c in CATS}}


@pytest.mark.parametrize(("answer", "why"), [
    (CLASSIFIER_GARBAGE, "not JSON"),
    ("", "not JSON"),
    ("Safe.", "not JSON"),
    ('Here you go: {"flagged": false}', "not JSON"),
    ("[]", "not a JSON object"),
    ('{"flagged": false}', "no 'categories'"),
    (orjson.dumps({**GOOD, "categories": {"fraud": False}}).decode(), "misses categories"),
    (orjson.dumps({**GOOD, "categories": {c: "no" for c in CATS}}).decode(), "true/false"),
    (orjson.dumps({**GOOD, "categories": {c: 0 for c in CATS}}).decode(), "true/false"),
    (orjson.dumps({**GOOD, "scores": {c: 2.0 for c in CATS}}).decode(), "score"),
    (orjson.dumps({**GOOD, "scores": {"fraud": 0.1}}).decode(), "score"),
    (orjson.dumps({**GOOD, "scores": {c: True for c in CATS}}).decode(), "score"),
    (orjson.dumps({**GOOD, "scores": [0.1]}).decode(), "'scores'"),
    (orjson.dumps({**GOOD, "flagged": "no"}).decode(), "'flagged'"),
    (orjson.dumps(GOOD).decode()[:-5], "not JSON"),  # truncated
])
def test_parse_rejects_anything_else(answer: str, why: str) -> None:
    with pytest.raises(ClassifierAnswerError, match=why):
        parse_answer(answer, CATS)


def completion(content: Any, finish: str = "stop") -> bytes:
    return orjson.dumps({"choices": [{"message": {"role": "assistant", "content": content},
                                      "finish_reason": finish}],
                         "usage": {"prompt_tokens": 120, "completion_tokens": 30}})


def test_parse_completion_keeps_usage_even_for_a_bad_answer() -> None:
    verdict, why, prompt, completion_tokens = parse_completion(
        completion(CLASSIFIER_GARBAGE), CATS)
    assert verdict is None and "not JSON" in why
    assert (prompt, completion_tokens) == (120, 30)
    verdict, why, _, _ = parse_completion(completion(orjson.dumps(GOOD).decode()), CATS)
    assert verdict is not None and verdict.flagged is False and why == ""


def test_parse_completion_explains_truncation_and_bad_envelopes() -> None:
    _, why, _, _ = parse_completion(completion('{"flagged": fal', "length"), CATS)
    assert "max_tokens" in why
    assert parse_completion(b"not json", CATS)[0] is None
    assert parse_completion(b'{"choices": []}', CATS)[1] == "the response has no message content"
    assert parse_completion(completion(None), CATS)[1] == "the message content is not text"


def test_caller_text_screens_system_and_user_turns_only() -> None:
    text = caller_text([{"role": "system", "content": "S"},
                        {"role": "user", "content": [{"type": "text", "text": "U1"},
                                                     {"type": "image_url", "image_url": {}}]},
                        {"role": "assistant", "content": "A"},
                        {"role": "tool", "content": "T", "tool_call_id": "1"},
                        {"role": "user", "content": "U2"}])
    assert text == "S\n\nU1\n\nU2"
    assert caller_text([{"role": "user", "content": [{"type": "image_url"}]}]) == ""


def test_a_plan_requiring_input_moderation_needs_a_classifier() -> None:
    from gateway.config import parse_catalog
    from gateway.errors import ConfigError

    models = {"m": {"upstream_model": "u"}}
    with pytest.raises(ConfigError, match=r"plans\.strict\.input_moderation: needs a "
                                          r"moderation\.classifier"):
        parse_catalog({"models": models, "plans": {"strict": {"input_moderation": True}}})
    catalog = parse_catalog({"models": models, "plans": {"strict": {"input_moderation": True}},
                             "moderation": {"classifier": {"model": "m"}}})
    assert catalog.plans["strict"].input_moderation is True


def test_a_text_too_long_for_the_classifier_is_a_clear_400() -> None:
    from gateway.catalog import ResolvedModel
    from gateway.classifier import Classifier
    from gateway.config import ClassifierConfig, ModelConfig
    from gateway.metrics import Metrics
    from gateway.tokens import TokenCounter

    model = ResolvedModel("guard", ModelConfig(upstream_model="u", context_window=1000,
                                               default_max_tokens=16, aliases=("g",)))
    classifier = Classifier(ClassifierConfig(model="guard"), model, TokenCounter("mistral-v1"),
                            {}, None, Metrics.create())  # type: ignore[arg-type]  # no I/O here
    assert classifier.answers_to(None) and classifier.answers_to("g")
    assert not classifier.answers_to("other")
    assert classifier.reservation(["short"]) > 0
    with pytest.raises(BadRequest) as caught:
        classifier.reservation(["short", "word " * 1000], param="messages")
    assert caught.value.code == "moderation_input_too_long"
    assert caught.value.param == "messages" and "item 1" in caught.value.message
