"""The operator's config: the YAML catalog (models, plans, moderation, policies) and the
environment (`PLATEFORME_*`), validated once at start into frozen objects.

`os.environ` is read here and nowhere else in the gateway. Every error names the field and
the offending value (`load_config` raises `ConfigError`, never a traceback for the operator).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from gateway.errors import ConfigError

ModerationPolicy = Literal["optional", "always", "never"]
StoreFailurePolicy = Literal["fail_closed", "fail_open_local"]

DEFAULT_SAFE_PROMPT = (
    "Always assist with care, respect, and truth. Respond with utmost utility yet securely. "
    "Avoid harmful, unethical, prejudiced, or negative content. "
    "Ensure replies promote fairness and positivity."
)
DEFAULT_STATE_DIR = "~/.plateforme"
MIN_ADMIN_TOKEN_CHARS = 24
DEFAULT_MODERATION_CATEGORIES = (
    "physical_harm", "economic_harm", "fraud", "sexual", "hate", "self_harm",
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {value!r}")
    try:
        parts.port
    except ValueError as exc:
        raise ValueError(f"bad port in URL: {value!r}") from exc
    return value.rstrip("/")


class ModelConfig(_Strict):
    """One served model: its public names and where it runs."""

    aliases: tuple[str, ...] = ()
    upstream_model: str
    replicas: tuple[str, ...] = ()
    context_window: int = Field(32768, gt=0)
    default_max_tokens: int = Field(1024, gt=0)
    tokenizer: str | None = None  # mistral-common tokenizer name, e.g. "mistral-v1"
    guardrail: str | None = None  # name of a guardrail in moderation.guardrails
    replica_api_key_env: str | None = None  # env var holding the replicas' vLLM --api-key

    @field_validator("replicas")
    @classmethod
    def _urls(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_check_http_url(v) for v in value)

    @model_validator(mode="after")
    def _max_tokens_fit(self) -> ModelConfig:
        if self.default_max_tokens > self.context_window:
            raise ValueError(
                f"default_max_tokens ({self.default_max_tokens}) exceeds context_window "
                f"({self.context_window})"
            )
        return self


class PlanConfig(_Strict):
    """Limits and permissions shared by every key on the plan. `None` means unlimited."""

    rpm: int | None = Field(None, ge=0)
    tpm: int | None = Field(None, ge=0)
    max_concurrent: int | None = Field(None, ge=0)
    monthly_tokens: int | None = Field(None, ge=0)
    models: tuple[str, ...] = ("*",)  # "*" allows every model
    moderation: ModerationPolicy = "optional"
    input_moderation: bool = False  # classify every chat input; block when flagged


class Guardrail(_Strict):
    """A named, versioned guardrail system prompt."""

    version: str = "1"
    text: str = Field(min_length=1)


class ClassifierConfig(_Strict):
    """Self-reflection moderation: a served model classifies text into categories."""

    model: str
    categories: tuple[str, ...] = DEFAULT_MODERATION_CATEGORIES
    max_tokens: int = Field(256, gt=0)  # the JSON answer: ~105 tokens compact, ~160 indented


class ModerationConfig(_Strict):
    safe_prompt: str = DEFAULT_SAFE_PROMPT  # text of the "default" guardrail when not listed
    default_guardrail: str = "default"
    guardrails: dict[str, Guardrail] = Field(default_factory=dict)
    classifier: ClassifierConfig | None = None

    def guardrail(self, name: str) -> tuple[str, Guardrail]:
        if name in self.guardrails:
            return name, self.guardrails[name]
        return "default", Guardrail(version="1", text=self.safe_prompt)


class LimitsConfig(_Strict):
    store_failure: StoreFailurePolicy = "fail_closed"
    lease_seconds: float = Field(300.0, gt=0)  # a concurrency slot's lease; freed if not settled
    gateway_replicas: int = Field(1, ge=1)  # divides limits under fail_open_local


class RoutingConfig(_Strict):
    policy: Literal["least_load", "round_robin", "prefix_affinity"] = "least_load"
    max_failures: int = Field(3, ge=1, le=3)  # consecutive failures before ejection
    cooldown_seconds: float = Field(15.0, gt=0)
    probe_interval_seconds: float = Field(2.0, gt=0)
    refresh_seconds: float = Field(1.0, gt=0)  # how often registered replicas are re-read
    max_attempts: int = Field(3, ge=1)  # replicas tried before the first byte
    metrics_scrape: bool = True  # read vLLM's /metrics for queue depth and KV-cache use


class ServerConfig(_Strict):
    max_body_bytes: int = Field(8 * 1024 * 1024, gt=0)
    body_timeout_seconds: float = Field(30.0, gt=0)  # whole request body must arrive by then
    connect_timeout_seconds: float = Field(3.0, gt=0)
    read_timeout_seconds: float = Field(60.0, gt=0)  # max silence between upstream chunks
    request_timeout_seconds: float = Field(600.0, gt=0)  # a whole non-streaming completion
    drain_timeout_seconds: float = Field(30.0, ge=0)
    key_cache_seconds: float = Field(30.0, ge=0)  # verified keys; invalidated by version poll
    key_version_poll_seconds: float = Field(0.25, gt=0)


class Catalog(_Strict):
    """The whole YAML file."""

    store: str = f"sqlite:///{DEFAULT_STATE_DIR}/state.db"
    models: dict[str, ModelConfig] = Field(default_factory=dict)
    plans: dict[str, PlanConfig] = Field(default_factory=dict)
    moderation: ModerationConfig = Field(default_factory=ModerationConfig)
    limits: LimitsConfig = LimitsConfig()  # frozen: one shared default is safe
    routing: RoutingConfig = RoutingConfig()
    server: ServerConfig = ServerConfig()

    @field_validator("store")
    @classmethod
    def _store_url(cls, value: str) -> str:
        scheme = urlsplit(value).scheme
        if scheme not in ("sqlite", "redis", "rediss", "unix"):
            raise ValueError(f"store must be sqlite:///PATH or redis://HOST:PORT/DB, got {value!r}")
        return value

    @model_validator(mode="after")
    def _cross_references(self) -> Catalog:
        names: dict[str, str] = {}
        for model_name, model in self.models.items():
            for name in (model_name, *model.aliases):
                if name in names:
                    raise ValueError(
                        f"models.{model_name}.aliases: name {name!r} is already used by "
                        f"model {names[name]!r}"
                    )
                names[name] = model_name
            if model.guardrail and model.guardrail not in self.moderation.guardrails:
                raise ValueError(
                    f"models.{model_name}.guardrail: unknown guardrail {model.guardrail!r}"
                )
        for plan_name, plan in self.plans.items():
            for model_name in plan.models:
                if model_name != "*" and model_name not in self.models:
                    raise ValueError(
                        f"plans.{plan_name}.models: unknown model {model_name!r}"
                    )
        classifier = self.moderation.classifier
        if classifier and classifier.model not in names:
            raise ValueError(f"moderation.classifier.model: unknown model {classifier.model!r}")
        for plan_name, plan in self.plans.items():
            if plan.input_moderation and classifier is None:
                raise ValueError(f"plans.{plan_name}.input_moderation: needs a "
                                 "moderation.classifier to classify with")
        if self.moderation.default_guardrail != "default" and \
                self.moderation.default_guardrail not in self.moderation.guardrails:
            raise ValueError(
                "moderation.default_guardrail: unknown guardrail "
                f"{self.moderation.default_guardrail!r}"
            )
        return self

    def resolve_name(self, name: str) -> str | None:
        """Canonical model name for a name or alias."""
        if name in self.models:
            return name
        for model_name, model in self.models.items():
            if name in model.aliases:
                return model_name
        return None


class Settings(BaseSettings):
    """Process settings from the environment. Secrets live here, never in the YAML file."""

    model_config = SettingsConfigDict(env_prefix="PLATEFORME_", extra="ignore", frozen=True)

    config: str | None = None  # path to the YAML catalog
    admin_token: str | None = None
    store: str | None = None  # overrides the catalog's store URL
    log_level: str = "INFO"
    log_format: Literal["json", "text"] = "json"
    state_dir: str = DEFAULT_STATE_DIR


def _format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if p not in ("function-after",))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        value = err.get("input")
        shown = "" if isinstance(value, dict) or value is None else f" (got {value!r})"
        lines.append(f"  {loc or '(top level)'}: {msg}{shown}")
    return "\n".join(lines)


def parse_catalog(data: Any, source: str = "<config>") -> Catalog:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config {source}: the top level must be a mapping")
    try:
        return Catalog.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None


def load_catalog(path: str | os.PathLike[str]) -> Catalog:
    """Read and validate the YAML catalog; raise ConfigError naming the field."""
    file = Path(path).expanduser()
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config {file}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML in {file}: {exc}") from None
    return parse_catalog(data, str(file))


def load_settings(**overrides: Any) -> Settings:
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, "environment PLATEFORME_*")) from None


def check_admin_token(token: str | None) -> str:
    """The admin API refuses to start without a long enough token."""
    if not token:
        raise ConfigError("PLATEFORME_ADMIN_TOKEN is not set: the admin API needs a token")
    if len(token) < MIN_ADMIN_TOKEN_CHARS:
        raise ConfigError(
            f"PLATEFORME_ADMIN_TOKEN is too short ({len(token)} chars; at least "
            f"{MIN_ADMIN_TOKEN_CHARS} required)"
        )
    return token


def store_url(catalog: Catalog, settings: Settings) -> str:
    return settings.store or catalog.store


def env(name: str, default: str | None = None) -> str | None:
    """The one door to os.environ for values not in Settings (e.g. replica API key env vars)."""
    return os.environ.get(name, default)
