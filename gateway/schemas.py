"""Wire models: validation of what users send. Bodies are validated, then forwarded as the
caller's own dict (never re-serialised through pydantic), so unknown vLLM/OpenAI parameters
pass through untouched."""

from __future__ import annotations

from typing import Any, Literal, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gateway.errors import BadRequest

M = TypeVar("M", bound=BaseModel)


def parse_body(raw: bytes) -> dict[str, Any]:
    """A request body as a JSON object, or a 400 that says what is wrong with it."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"The request body is not valid JSON: {exc.msg}.",
                         code="invalid_json") from None
    if not isinstance(data, dict):
        raise BadRequest("The request body must be a JSON object.", code="invalid_json")
    return data


def validate(model: type[M], data: dict[str, Any]) -> M:
    """`data` as `model`, or a 400 naming the first invalid field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise BadRequest(f"Invalid request: {loc or 'body'}: {first['msg']}.",
                         param=loc or None) from None

Role = Literal["system", "user", "assistant", "tool", "developer"]
MAX_MESSAGES = 4096
MAX_N = 8


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Role
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class ChatRequest(BaseModel):
    """POST /v1/chat/completions: OpenAI's fields with Mistral's extensions."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, max_length=256)
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1, le=10_000_000)
    max_completion_tokens: int | None = Field(None, ge=1, le=10_000_000)
    n: int | None = Field(None, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    random_seed: int | None = Field(None, ge=0, le=2**63 - 1)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    safe_prompt: bool | None = None
    user: str | None = Field(None, max_length=512)
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None

    @model_validator(mode="after")
    def _seeds_agree(self) -> ChatRequest:
        if self.random_seed is not None and self.seed is not None \
                and self.random_seed != self.seed:
            raise ValueError("random_seed and seed are both set and differ; send one of them")
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise ValueError("max_tokens and max_completion_tokens differ; send one of them")
        return self

    def wants_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))


class ModerationRequest(BaseModel):
    """POST /v1/moderations (OpenAI's shape)."""

    model_config = ConfigDict(extra="forbid")

    input: str | list[str] = Field(min_length=1)
    model: str | None = Field(None, max_length=256)


class _KeySettings(BaseModel):
    """What an operator may set on a key, at creation or later; `None`: the plan's value."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, max_length=256)
    rpm: int | None = Field(None, ge=0)
    tpm: int | None = Field(None, ge=0)
    max_concurrent: int | None = Field(None, ge=0)
    monthly_tokens: int | None = Field(None, ge=0)
    models: list[str] | None = None
    moderation: Literal["optional", "always", "never"] | None = None
    input_moderation: bool | None = None
    expires_at: float | None = Field(None, gt=0)  # Unix seconds


class KeyCreate(_KeySettings):
    owner: str = Field(min_length=1, max_length=256)
    plan: str = Field(min_length=1, max_length=128)
    expires_in: float | None = Field(None, gt=0)  # seconds from now; or expires_at


class KeyUpdate(_KeySettings):
    owner: str | None = Field(None, min_length=1, max_length=256)
    plan: str | None = Field(None, min_length=1, max_length=128)


class ReplicaRegistration(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=1, max_length=2048)


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            return _inline(defs[ref.removeprefix("#/$defs/")], defs)
        return {k: _inline(v, defs) for k, v in node.items() if k != "$defs"}
    if isinstance(node, list):
        return [_inline(v, defs) for v in node]
    return node


def openapi_body(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` declaring `model` as a route's JSON body, for routes that read and
    validate their body themselves (to keep the caller's dict or answer in OpenAI's error
    shape). Nested models are inlined: pydantic's `$defs` would dangle inside OpenAPI's
    document, and fuzzers and SDK generators read this schema."""
    schema = model.model_json_schema()
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": _inline(schema, schema.get("$defs", {}))}}}}
