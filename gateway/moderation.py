"""Guardrail system prompts: the policy decision and the pure rewrite of `messages`.

Merge rule (deterministic, and valid for chat templates that accept a single system turn):
the guardrail becomes the FIRST system content. If the caller's conversation starts with a
system message, the two are merged into one system message, guardrail first, a blank line,
then the caller's text (as Mistral's API does); otherwise a system message holding only the
guardrail is inserted at position 0.

How the system turn reaches Mixtral, whose template has no system role (the original Jinja
chat template of Mixtral-8x7B-Instruct-v0.1 refuses a system message, so vLLM must serve it
with `--tokenizer-mode mistral`, i.e. mistral-common): the v1 tokenizer (Mixtral 8x7B,
Mistral 7B v0.1) renders the system text, then a blank line, at the start of the FIRST user
turn, `<s>[INST] {guardrail}\n\n{caller system}\n\n{user} [/INST]`; v2/v3 tokenizers put it at
the start of the LAST user turn; v7 has a real `[SYSTEM_PROMPT]` turn. In every case the
guardrail precedes the caller's words (tests/unit/test_moderation.py renders it with
`MistralTokenizer.v1()` to prove it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.auth import Principal
from gateway.config import Guardrail, ModerationConfig
from gateway.errors import BadRequest

GUARDRAIL_SEPARATOR = "\n\n"


@dataclass(frozen=True, slots=True)
class GuardrailChoice:
    name: str
    version: str
    text: str
    tokens: int  # counted once at start-up with the model's tokenizer


@dataclass(frozen=True, slots=True)
class Applied:
    """What moderation did to a request: the messages to send and the header to return."""

    messages: list[dict[str, Any]]
    guardrail: GuardrailChoice | None
    policy: str

    @property
    def guardrail_tokens(self) -> int:
        return self.guardrail.tokens if self.guardrail else 0

    def header(self) -> str:
        if self.guardrail is None:
            return f"policy={self.policy}; guardrail=none"
        return (f"policy={self.policy}; guardrail={self.guardrail.name}; "
                f"version={self.guardrail.version}")


def guardrail_for(config: ModerationConfig, model_guardrail: str | None) -> tuple[str, Guardrail]:
    return config.guardrail(model_guardrail or config.default_guardrail)


def decide(principal: Principal, safe_prompt: bool | None) -> bool:
    """Whether to inject the guardrail; a `never` policy refuses the flag outright."""
    if principal.moderation == "always":
        return True
    if principal.moderation == "never":
        if safe_prompt:
            raise BadRequest(
                "safe_prompt is not available for this API key: its plan's moderation policy "
                "is 'never'. Remove safe_prompt or ask the operator for another plan.",
                param="safe_prompt", code="safe_prompt_not_allowed")
        return False
    return bool(safe_prompt)


def merge(messages: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    """The merge rule above, as a pure function (the caller's list is not mutated)."""
    if messages and messages[0].get("role") == "system":
        first = messages[0]
        content = first.get("content")
        if isinstance(content, list):
            merged_content: Any = [{"type": "text", "text": text + GUARDRAIL_SEPARATOR},
                                   *content]
        else:
            merged_content = text + GUARDRAIL_SEPARATOR + (content or "")
        return [{**first, "content": merged_content}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def apply(messages: list[dict[str, Any]], principal: Principal, safe_prompt: bool | None,
          guardrail: GuardrailChoice) -> Applied:
    if decide(principal, safe_prompt):
        return Applied(merge(messages, guardrail.text), guardrail, principal.moderation)
    return Applied(messages, None, principal.moderation)
