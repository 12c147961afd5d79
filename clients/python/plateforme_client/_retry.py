"""The retry decision: which failures are retried, and after how long. No I/O, no loop.

The loop lives once in each client shell (`Client._retrying`, `AsyncClient._retrying`); it
asks `RetryPolicy.delay(error, attempt)` after every failed attempt and either sleeps that many
seconds and sends the very same request again, or re-raises.
"""

from __future__ import annotations

import email.utils
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ._exceptions import APIConnectionError, APIError, PlateformeError

__all__ = ["RETRYABLE_STATUSES", "RetryPolicy", "parse_retry_after"]

# 429 rate limited; 502 bad upstream answer; 503 no healthy replica; 504 upstream timed out.
RETRYABLE_STATUSES = frozenset({429, 502, 503, 504})
BACKOFF_BASE_SECONDS = 0.5
BACKOFF_CAP_SECONDS = 8.0
# A server asking for a longer wait than this (a spent monthly quota) is not waited for inside
# one call: the error is raised at once, with `.retry_after` for the caller to decide.
MAX_RETRY_AFTER_SECONDS = 60.0


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header: delta-seconds ("2", "1.5") or an HTTP date."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    wall = time.time() if now is None else now
    return max(0.0, when.timestamp() - wall)


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter, raised to Retry-After when the server asks more."""

    max_retries: int = 2
    base_seconds: float = BACKOFF_BASE_SECONDS
    cap_seconds: float = BACKOFF_CAP_SECONDS
    max_retry_after_seconds: float = MAX_RETRY_AFTER_SECONDS
    jitter: Callable[[], float] = field(default=random.random, repr=False)  # in [0, 1)

    def delay(self, error: PlateformeError, attempt: int) -> float | None:
        """Seconds to wait before attempt `attempt + 1` (0-based), or None to give up."""
        if attempt >= self.max_retries:
            return None
        retry_after: float | None = None
        if isinstance(error, APIError):
            if error.status not in RETRYABLE_STATUSES:
                return None
            retry_after = error.retry_after
        elif not isinstance(error, APIConnectionError):
            return None
        if retry_after is not None and retry_after > self.max_retry_after_seconds:
            return None
        backoff = self.jitter() * min(self.cap_seconds, self.base_seconds * 2.0**attempt)
        return max(backoff, retry_after or 0.0)
