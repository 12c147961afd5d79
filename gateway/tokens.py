"""Prompt token counting with the model's real tokenizer (mistral-common), for admission.

The count is what the model's chat template renders, so a reservation is an honest upper
bound of what the upstream will report. Tokenizers load once at start-up (~50 ms each).
When mistral-common cannot render a conversation (e.g. a message order its template
forbids), the count falls back to encoding each message's text plus a per-message overhead:
still the real tokenizer, no longer the exact template. Models without a configured
tokenizer use a cheap estimate (4 characters per token), documented in the README.

For the v1 tokenizer (Mixtral 8x7B, Mistral 7B v0.1) a plain conversation — system turns
first, then user and assistant strictly alternating, ending on a user turn, all non-empty
text — is counted by encoding the exact strings the v1 template renders, skipping
mistral-common's request validation, normalisation and the decode it does for its `text`
(~70% of the counting cost). The count is identical (tests/unit/test_tokens_fast.py checks it
against `encode_chat_completion` on random conversations); anything else takes the full path.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from gateway.errors import ConfigError

log = logging.getLogger(__name__)

CHARS_PER_TOKEN_ESTIMATE = 4
PER_MESSAGE_OVERHEAD_TOKENS = 4
TOKENIZER_FACTORIES = ("mistral-v1", "mistral-v2", "mistral-v3", "mistral-v7", "tekken")

Messages = list[dict[str, Any]]


def _text_of(content: Any) -> str:
    """The text of an OpenAI message content: a string or a list of typed parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def estimate_tokens(messages: Messages) -> int:
    chars = sum(len(_text_of(m.get("content"))) for m in messages)
    return chars // CHARS_PER_TOKEN_ESTIMATE + PER_MESSAGE_OVERHEAD_TOKENS * len(messages)


class TokenCounter:
    """Counts a chat request's prompt tokens for one tokenizer name (or estimates)."""

    def __init__(self, name: str | None) -> None:
        self.name = name
        self._encode_chat: Callable[[Messages], int] | None = None
        self._encode_text: Callable[[str], int] | None = None
        if name is not None:
            self._load(name)

    def _load(self, name: str) -> None:
        if name not in TOKENIZER_FACTORIES:
            raise ConfigError(
                f"unknown tokenizer {name!r}; known: {', '.join(TOKENIZER_FACTORIES)}")
        from mistral_common.protocol.instruct.request import ChatCompletionRequest
        from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

        factory = {"mistral-v1": MistralTokenizer.v1, "mistral-v2": MistralTokenizer.v2,
                   "mistral-v3": MistralTokenizer.v3, "mistral-v7": MistralTokenizer.v7,
                   "tekken": lambda: MistralTokenizer.v3(is_tekken=True)}[name]
        tokenizer = factory()  # type: ignore[no-untyped-call]
        raw = tokenizer.instruct_tokenizer.tokenizer

        def encode_chat(messages: Messages) -> int:
            request: Any = ChatCompletionRequest.model_validate({"messages": messages})
            return len(tokenizer.encode_chat_completion(request).tokens)

        def encode_text(text: str) -> int:
            return len(raw.encode(text, bos=False, eos=False))

        if name == "mistral-v1":
            full_chat = encode_chat

            def encode_chat(messages: Messages) -> int:
                count = _count_v1_plain(messages, encode_text)
                return full_chat(messages) if count is None else count

        self._encode_chat = encode_chat
        self._encode_text = encode_text

    def count_text(self, text: str) -> int:
        if self._encode_text is None:
            return len(text) // CHARS_PER_TOKEN_ESTIMATE + 1
        return self._encode_text(text)

    def count_chat(self, messages: Messages) -> int:
        if self._encode_chat is None or self._encode_text is None:
            return estimate_tokens(messages)
        try:
            return self._encode_chat(_plain(messages))
        except Exception as exc:  # mistral-common raises several validation error types
            log.debug("chat template could not render (%s); counting per message",
                      type(exc).__name__)
            return sum(self._encode_text(_text_of(m.get("content"))) +
                       PER_MESSAGE_OVERHEAD_TOKENS for m in messages) + 1


def _count_v1_plain(messages: Messages, encode_text: Callable[[str], int]) -> int | None:
    """The v1 template's exact count for a plain conversation, else None (take the full path).

    v1 renders `<s>[INST] {system}\n\n{user} [/INST]{assistant}</s>[INST] {user} [/INST]`:
    system texts are joined by a blank line and prefixed to the first user turn, each user
    turn is encoded as one string with its markers, each assistant turn as its text plus EOS.
    """
    system: list[str] = []
    i = 0
    while i < len(messages) and messages[i]["role"] == "system":
        text = messages[i]["content"]
        if not text.strip():
            return None
        system.append(text)
        i += 1
    turns = messages[i:]
    if not turns or len(turns) % 2 == 0:
        return None  # must alternate user/assistant and end on a user turn
    count = 1  # BOS
    for n, message in enumerate(turns):
        text = message["content"]
        if message["role"] != ("user" if n % 2 == 0 else "assistant") or not text.strip():
            return None
        if n % 2:
            count += encode_text(text) + 1  # EOS closes an assistant turn
        else:
            if n == 0 and system:
                text = "\n\n".join(system) + "\n\n" + text
            count += encode_text(f"[INST] {text} [/INST]")
    return count


def _plain(messages: Messages) -> Messages:
    """Only what the template needs: role and text (tool calls and names count as text)."""
    out: Messages = []
    for m in messages:
        role = m.get("role")
        text = _text_of(m.get("content"))
        if role == "tool":
            out.append({"role": "tool", "content": text,
                        "tool_call_id": str(m.get("tool_call_id") or "000000000")[:9]})
        else:
            out.append({"role": role, "content": text})
    return out
