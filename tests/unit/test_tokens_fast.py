"""The v1 fast count equals mistral-common's full chat template count, on varied
conversations, including the shapes that must fall back to the full path."""

from __future__ import annotations

import random

import pytest

from gateway.tokens import TokenCounter, _count_v1_plain, _plain

pytest.importorskip("mistral_common")

WORDS = ["Bonjour", "le", "monde", "croissant", " ", "  ", "\n", "\n\n", "[INST]", "</s>",
         "é", "日本語", "🙂", "42", "def f(x):", "\t", "a.b", "Hello,", "world!", "—", "[/INST]"]


@pytest.fixture(scope="module")
def counter() -> TokenCounter:
    return TokenCounter("mistral-v1")


def _full(counter: TokenCounter, messages: list[dict[str, str]]) -> int:
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    tokenizer = MistralTokenizer.v1()
    request = ChatCompletionRequest.model_validate({"messages": messages})
    return len(tokenizer.encode_chat_completion(request).tokens)


def _text(rng: random.Random) -> str:
    return "".join(rng.choice(WORDS) + rng.choice(["", " "]) for _ in range(rng.randint(1, 12)))


def _conversation(rng: random.Random) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": _text(rng)} for _ in range(rng.randint(0, 2))]
    for n in range(rng.randint(0, 3) * 2 + 1):
        messages.append({"role": "user" if n % 2 == 0 else "assistant", "content": _text(rng)})
    if rng.random() < 0.25:  # break the plain shape now and then: the full path must answer
        messages.insert(rng.randint(0, len(messages)),
                        {"role": rng.choice(["user", "assistant", "system"]),
                         "content": rng.choice(["", " ", _text(rng)])})
    return messages


def test_fast_count_matches_the_template_on_random_conversations(counter: TokenCounter) -> None:
    rng = random.Random(1234)
    fast_used = 0
    for _ in range(300):
        messages = _conversation(rng)
        if _count_v1_plain(_plain(messages), counter.count_text) is not None:
            fast_used += 1
            expected = _full(counter, _plain(messages))  # raises if the template refuses
            assert counter.count_chat(messages) == expected, messages
    assert fast_used > 150  # the fast path is really exercised


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "A"}, {"role": "system", "content": "B"},
     {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
     {"role": "user", "content": "  spaced  out  "}],
    [{"role": "user", "content": [{"type": "text", "text": "parts "}, {"type": "text",
                                                                        "text": "joined"}]}],
])
def test_fast_count_matches_known_shapes(counter: TokenCounter,
                                         messages: list[dict[str, object]]) -> None:
    assert counter.count_chat(messages) == _full(counter, _plain(messages))  # type: ignore[arg-type]


def test_unusual_shapes_take_the_full_path(counter: TokenCounter) -> None:
    ends_on_assistant = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "A"}]
    two_users = [{"role": "user", "content": "Hi"}, {"role": "user", "content": "again"}]
    for messages in (ends_on_assistant, two_users):
        assert _count_v1_plain(messages, counter.count_text) is None
