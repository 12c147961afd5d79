"""Typed request and response models (pydantic), tolerant of what a newer gateway adds.

Every model allows extra fields, and response fields a server may leave out have defaults, so
an older client keeps working against a newer gateway. Response objects carry the HTTP headers
they arrived with: `.request_id` (``x-request-id``) and `.rate_limit` (``x-ratelimit-*``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from ._ratelimit import RateLimit

__all__ = [
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatMessage",
    "Choice",
    "ChunkChoice",
    "Delta",
    "Model",
    "ModelList",
    "ModerationResponse",
    "ModerationResult",
    "Usage",
]


class _Wire(BaseModel):
    model_config = ConfigDict(extra="allow")


class _Response(_Wire):
    """A top-level response: remembers the headers it came with."""

    _headers: httpx.Headers = PrivateAttr(default_factory=httpx.Headers)

    def _set_headers(self, headers: httpx.Headers) -> None:
        self._headers = headers

    @property
    def response_headers(self) -> httpx.Headers:
        return self._headers

    @property
    def request_id(self) -> str | None:
        request_id: str | None = self._headers.get("x-request-id")
        return request_id

    @property
    def rate_limit(self) -> RateLimit | None:
        return RateLimit.from_headers(self._headers)


class ChatMessage(_Wire):
    """One message; `content` is text, or a list of parts for multimodal models."""

    role: str
    content: str | list[Any] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class Usage(_Wire):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class Choice(_Wire):
    index: int = 0
    message: ChatMessage = Field(default_factory=lambda: ChatMessage(role="assistant"))
    finish_reason: str | None = None


class ChatCompletion(_Response):
    id: str = ""
    object: str = "chat.completion"
    created: int = 0
    model: str = ""
    choices: list[Choice] = Field(default_factory=list)
    usage: Usage | None = None

    @property
    def text(self) -> str:
        """The first choice's text ("" if none): the common case in one attribute."""
        if not self.choices or not isinstance(self.choices[0].message.content, str):
            return ""
        return self.choices[0].message.content


class Delta(_Wire):
    role: str | None = None
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChunkChoice(_Wire):
    index: int = 0
    delta: Delta = Field(default_factory=Delta)
    finish_reason: str | None = None


class ChatCompletionChunk(_Wire):
    """One streamed event. The stream's final usage is on the stream object (`.usage`)."""

    id: str = ""
    object: str = "chat.completion.chunk"
    created: int = 0
    model: str = ""
    choices: list[ChunkChoice] = Field(default_factory=list)
    usage: Usage | None = None


class Model(_Wire):
    """A model this key may use; `id` is the canonical name, `aliases` its other names."""

    id: str
    object: str = "model"
    created: int | None = None
    owned_by: str | None = None
    aliases: list[str] = Field(default_factory=list)


class ModelList(_Response):
    """`list_models()`'s answer: a sequence of `Model` (iterate, index, len) with headers."""

    object: str = "list"
    data: list[Model] = Field(default_factory=list)

    def __iter__(self) -> Iterator[Model]:  # type: ignore[override]
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> Model:
        return self.data[index]

    @property
    def ids(self) -> list[str]:
        return [model.id for model in self.data]


class ModerationResult(_Wire):
    flagged: bool = False
    categories: dict[str, bool] = Field(default_factory=dict)
    category_scores: dict[str, float] = Field(default_factory=dict)


class ModerationResponse(_Response):
    id: str = ""
    model: str = ""
    results: list[ModerationResult] = Field(default_factory=list)
