"""Process-wide logging: JSON lines (or text) on stderr, with secrets redacted on the way out.

The gateway logs one line per request on the ``plateforme.access`` logger, with the request id,
model, replica, status, token counts and latency passed as ``extra`` fields. Code must never log
headers, keys, prompts or bodies; the `RedactionFilter` is defence in depth for the day someone
does: anything shaped like a Plateforme key or a bearer token is obscured, and extra fields whose
*name* says they carry a header, body or prompt are replaced wholesale.

`configure_logging` is called once, at the edge (the CLI), with the level and format read from
`PLATEFORME_LOG_LEVEL` / `PLATEFORME_LOG_FORMAT` by `gateway.config.Settings`; importing this
module configures nothing. Uvicorn's own loggers are routed through the same handler so a
deployment emits one format; pass ``log_config=None`` to uvicorn so it does not install its own.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from typing import Any, Literal, TypedDict

import orjson

from gateway.errors import ConfigError

ACCESS_LOGGER = "plateforme.access"
REDACTED = "[REDACTED]"
LogFormat = Literal["json", "text"]

# A full key keeps its public id (shown in listings and usage anyway) and loses its secret; any
# other `plf_…` token (truncated, mangled) is obscured whole.
_KEY_RE = re.compile(r"\bplf_([0-9a-f]{16})_[A-Za-z0-9_\-]+")
_LOOSE_KEY_RE = re.compile(r"\bplf_(?![0-9a-f]{16}_\[REDACTED\])[A-Za-z0-9_\-]{6,}")
_BEARER_RE = re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=\-]{4,}")
_SECRET_ASSIGN_RE = re.compile(
    r"(?i)\b((?:authorization|api[_-]?key|admin[_-]?token|x-api-key|token|password|secret)"
    r"[\"']?\s*[:=]\s*[\"']?)(?!bearer\s)(?!\[REDACTED\])[^\s\"',;}]+"
)
# Extra fields whose name alone says they must not be logged.
_FORBIDDEN_FIELDS = frozenset({
    "authorization", "headers", "body", "content", "prompt", "messages", "key", "api_key",
    "admin_token", "token", "password", "secret", "cookie",
})
# Attributes every LogRecord has; anything else on a record came from `extra`.
# uvicorn's `color_message` (the message with ANSI colours) is ignored as well.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName", "color_message",
}
_HANDLER_MARK = "_plateforme_handler"
_UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")


class AccessFields(TypedDict, total=False):
    """The `extra` of one access-log line (all optional; never a key, header or body)."""

    request_id: str
    route: str
    model: str
    replica: str
    status: int
    stream: bool
    attempts: int
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float
    ttft_ms: float
    error_code: str


def redact(text: str) -> str:
    """Obscure anything that looks like a Plateforme key, a bearer token or a secret assignment."""
    if "plf_" in text:
        text = _KEY_RE.sub(lambda m: f"plf_{m.group(1)}_{REDACTED}", text)
        text = _LOOSE_KEY_RE.sub(REDACTED, text)
    # Neither pattern below can match without ':'/'=' or the word "bearer": skipping them for
    # such text (most access-log fields) keeps the access line cheap without weakening them.
    if ":" not in text and "=" not in text and "bearer" not in text.lower():
        return text
    text = _BEARER_RE.sub(lambda m: f"{m.group(1)}{REDACTED}", text)
    return _SECRET_ASSIGN_RE.sub(lambda m: f"{m.group(1)}{REDACTED}", text)


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, (int, float, bool)) or value is None:
        return value
    return redact(str(value))


class RedactionFilter(logging.Filter):
    """Rewrites a record in place so no handler after it can see a secret.

    The message is rendered (``msg % args``) before redaction, because a key passed as an
    argument would otherwise slip past a check of the format string alone.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a broken format string: keep the raw text
            message = str(record.msg)
        record.msg = redact(message)
        record.args = None
        for name in _extra_names(record):
            value = record.__dict__[name]
            if name.lower() in _FORBIDDEN_FIELDS:
                record.__dict__[name] = REDACTED
            else:
                record.__dict__[name] = _redact_value(value)
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        record.exc_info = None  # formatted (and redacted) above; never re-render the raw one
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def _extra_names(record: logging.LogRecord) -> list[str]:
    return [name for name in record.__dict__ if name not in _RECORD_ATTRS]


def _timestamp(record: logging.LogRecord) -> str:
    seconds = int(record.created)
    millis = int((record.created - seconds) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, then every `extra` field."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name in _extra_names(record):
            if name not in line:
                line[name] = record.__dict__[name]
        if record.exc_text:
            line["exc"] = record.exc_text
        if record.stack_info:
            line["stack"] = record.stack_info
        return orjson.dumps(line, default=str).decode("utf-8")


class TextFormatter(logging.Formatter):
    """Human-readable: ``ts LEVEL logger msg key=value ...`` for a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(
            f"{name}={record.__dict__[name]}" for name in _extra_names(record)
        )
        line = f"{_timestamp(record)} {record.levelname:<7} {record.name} {record.getMessage()}"
        if fields:
            line = f"{line} {fields}"
        if record.exc_text:
            line = f"{line}\n{record.exc_text}"
        return line


def _parse_level(level: str) -> int:
    value = logging.getLevelName(level.strip().upper())
    if not isinstance(value, int):
        raise ConfigError(
            f"PLATEFORME_LOG_LEVEL: unknown level {level!r} "
            "(expected DEBUG, INFO, WARNING, ERROR or CRITICAL)"
        )
    return value


def configure_logging(level: str = "INFO", fmt: LogFormat = "json") -> None:
    """Install one redacting stderr handler on the root logger; idempotent.

    Calling it again replaces the handler it installed before (so tests and `plateforme up`
    can reconfigure) and leaves handlers installed by others (pytest's caplog) alone.
    """
    if fmt not in ("json", "text"):
        raise ConfigError(f"PLATEFORME_LOG_FORMAT: unknown format {fmt!r} (expected json or text)")
    numeric = _parse_level(level)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RedactionFilter())
    setattr(handler, _HANDLER_MARK, True)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(numeric)
    for name in _UVICORN_LOGGERS:
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers.clear()
        uvicorn_logger.propagate = True
    # Our access line replaces uvicorn's (which has no model, tokens or request id).
    logging.getLogger("uvicorn.access").setLevel(max(numeric, logging.WARNING))


def request_logger() -> logging.Logger:
    """The access logger: one INFO line per answered request, fields as `AccessFields`."""
    return logging.getLogger(ACCESS_LOGGER)
