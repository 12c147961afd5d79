"""gateway.logs: JSON lines, extra fields, levels, and that no key or token survives."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import orjson
import pytest

from gateway.errors import ConfigError
from gateway.keys import generate_key
from gateway.logs import (
    ACCESS_LOGGER,
    REDACTED,
    JsonFormatter,
    RedactionFilter,
    TextFormatter,
    configure_logging,
    redact,
    request_logger,
)


@pytest.fixture
def capture() -> Iterator[io.StringIO]:
    """A redacting JSON handler on a private logger tree, writing to a buffer."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RedactionFilter())
    logger = logging.getLogger("plateforme.test")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield stream
    logger.removeHandler(handler)
    logger.propagate = True


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in stream.getvalue().splitlines()]


def test_json_line_has_core_and_extra_fields(capture: io.StringIO) -> None:
    logging.getLogger("plateforme.test").info(
        "request done", extra={"request_id": "req-1", "model": "mistral-small",
                               "replica": "http://10.0.0.5:8000", "status": 200,
                               "prompt_tokens": 12, "completion_tokens": 34, "latency_ms": 56.7})
    [line] = lines(capture)
    assert line["level"] == "INFO"
    assert line["logger"] == "plateforme.test"
    assert line["msg"] == "request done"
    assert isinstance(line["ts"], str) and line["ts"].endswith("Z")
    assert line["request_id"] == "req-1"
    assert line["replica"] == "http://10.0.0.5:8000"
    assert (line["status"], line["prompt_tokens"], line["completion_tokens"]) == (200, 12, 34)
    assert line["latency_ms"] == 56.7


def test_unserializable_extra_is_stringified(capture: io.StringIO) -> None:
    logging.getLogger("plateforme.test").info("x", extra={"thing": object()})
    [line] = lines(capture)
    assert str(line["thing"]).startswith("<object object")


def test_key_in_message_and_args_is_redacted(capture: io.StringIO) -> None:
    new = generate_key()
    log = logging.getLogger("plateforme.test")
    log.warning("key %s rejected", new.key)
    log.warning(f"inline {new.key} and Authorization: Bearer {new.key}")
    text = capture.getvalue()
    assert new.key not in text
    secret = new.key.split("_", 2)[2]
    assert secret not in text
    first, second = lines(capture)
    assert first["msg"] == f"key plf_{new.id}_{REDACTED} rejected"
    assert "Bearer [REDACTED]" in str(second["msg"])


def test_forbidden_and_secret_extras_are_redacted(capture: io.StringIO) -> None:
    new = generate_key()
    logging.getLogger("plateforme.test").info("x", extra={
        "headers": {"authorization": f"Bearer {new.key}"},
        "body": '{"messages": [{"role": "user", "content": "my secret prompt"}]}',
        "note": f"saw {new.key}",
    })
    text = capture.getvalue()
    assert new.key not in text and "my secret prompt" not in text
    [line] = lines(capture)
    assert line["headers"] == REDACTED and line["body"] == REDACTED
    assert line["note"] == f"saw plf_{new.id}_{REDACTED}"


def test_exception_text_is_redacted(capture: io.StringIO) -> None:
    new = generate_key()
    try:
        raise ValueError(f"bad key {new.key}")
    except ValueError:
        logging.getLogger("plateforme.test").exception("failed")
    [line] = lines(capture)
    assert new.key not in capture.getvalue()
    assert "ValueError: bad key plf_" in str(line["exc"])


@pytest.mark.parametrize(("text", "expected"), [
    ("Authorization: Bearer abc.def-ghi", "Authorization: Bearer [REDACTED]"),
    ("authorization=sk-123456", "authorization=[REDACTED]"),
    ('{"api_key": "sk-abcdef"}', '{"api_key": "[REDACTED]"}'),
    ("admin_token=0123456789abcdef0123456789", "admin_token=[REDACTED]"),
    ("prefix plf_deadbeef is truncated", "prefix [REDACTED] is truncated"),
    ("prompt_tokens=12 completion_tokens=3", "prompt_tokens=12 completion_tokens=3"),
    ("model mistral-small on http://10.0.0.5:8000", "model mistral-small on http://10.0.0.5:8000"),
])
def test_redact(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_text_formatter() -> None:
    record = logging.LogRecord("plateforme.x", logging.INFO, __file__, 1, "hello %s", ("you",),
                               None)
    record.model = "m"
    assert RedactionFilter().filter(record)
    out = TextFormatter().format(record)
    assert out.endswith("INFO    plateforme.x hello you model=m")


def test_request_logger_name() -> None:
    assert request_logger().name == ACCESS_LOGGER == "plateforme.access"


@pytest.fixture
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


@pytest.mark.usefixtures("restore_root")
def test_configure_logging_is_idempotent_and_sets_level(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("debug", "json")
    configure_logging("warning", "json")
    root = logging.getLogger()
    ours = [h for h in root.handlers if isinstance(h.formatter, JsonFormatter)]
    assert len(ours) == 1
    assert root.level == logging.WARNING
    new = generate_key()
    request_logger().info("dropped at WARNING")
    request_logger().warning("kept", extra={"request_id": "r", "key_seen": new.key})
    err = capsys.readouterr().err
    assert "dropped" not in err and new.key not in err
    [line] = [orjson.loads(x) for x in err.splitlines()]
    assert line["logger"] == "plateforme.access" and line["request_id"] == "r"


@pytest.mark.usefixtures("restore_root")
def test_configure_logging_text_and_uvicorn_routed(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO", "text")
    logging.getLogger("uvicorn.error").info(
        "Started server process", extra={"color_message": "Started \x1b[36mserver\x1b[0m"})
    logging.getLogger("uvicorn.access").info("GET / 200")  # replaced by plateforme.access
    err = capsys.readouterr().err
    assert "uvicorn.error Started server process" in err and "\x1b" not in err
    assert "GET / 200" not in err


@pytest.mark.parametrize(("level", "fmt"), [("LOUD", "json"), ("INFO", "xml")])
def test_configure_logging_rejects_bad_values(level: str, fmt: str) -> None:
    with pytest.raises(ConfigError, match="PLATEFORME_LOG_"):
        configure_logging(level, fmt)  # type: ignore[arg-type]
