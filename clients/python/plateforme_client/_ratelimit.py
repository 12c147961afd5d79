"""Rate-limit headers as a value (`RateLimit`) and the `Pacer` that acts on them.

The gateway sends ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` on every response.
Reset values are OpenAI-style durations ("1s", "6m0s", "0.5s", "20ms") or plain seconds
("1.5"); both parse to float seconds.

The pacer turns those headers into a decision made *before* sending: if the last headers (minus
what this client sent since) leave no request or not enough tokens and the reset has not yet
come, wait until it does. It never does I/O itself: it takes the time from the caller and
answers "wait this many seconds", so the sync and async clients share it and tests drive it
with a controlled clock.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict

__all__ = ["Pacer", "RateLimit", "parse_duration"]

# While a probe request is in flight and nothing is known, re-check this often.
PROBE_POLL_SECONDS = 0.05

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|us|µs|ns|h|m|s)")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def parse_duration(value: str | None) -> float | None:
    """Seconds from "6m0s" / "1s" / "0.5s" / "20ms" / "1.5"; None if absent or unparsable."""
    if value is None:
        return None
    text = value.strip().lower()
    if not text:
        return None
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    total, position = 0.0, 0
    for match in _DURATION_PART.finditer(text):
        if match.start() != position:
            return None
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        position = match.end()
    return total if position == len(text) and position > 0 else None


def _parse_int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(float(value.strip()))
    except ValueError:
        return None


class RateLimit(BaseModel):
    """The rate-limit state one response reported. Absent headers are None; resets in seconds."""

    model_config = ConfigDict(extra="allow", frozen=True)

    limit_requests: int | None = None
    remaining_requests: int | None = None
    reset_requests: float | None = None
    limit_tokens: int | None = None
    remaining_tokens: int | None = None
    reset_tokens: float | None = None

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> RateLimit | None:
        """Parse ``x-ratelimit-*`` headers (case-insensitive mapping); None if there are none."""
        lower = {k.lower(): v for k, v in headers.items() if k.lower().startswith("x-ratelimit-")}
        if not lower:
            return None
        return cls(
            limit_requests=_parse_int(lower.get("x-ratelimit-limit-requests")),
            remaining_requests=_parse_int(lower.get("x-ratelimit-remaining-requests")),
            reset_requests=parse_duration(lower.get("x-ratelimit-reset-requests")),
            limit_tokens=_parse_int(lower.get("x-ratelimit-limit-tokens")),
            remaining_tokens=_parse_int(lower.get("x-ratelimit-remaining-tokens")),
            reset_tokens=parse_duration(lower.get("x-ratelimit-reset-tokens")),
        )


@dataclass
class _Budget:
    """One dimension (requests or tokens) as this client believes it stands."""

    refill_to_limit: bool  # tokens refill fully at reset; requests may free only one slot
    remaining: int | None = None  # None: unknown, nothing holds us back
    limit: int | None = None
    reset_at: float | None = None  # clock time; None: unknown
    in_flight: int = 0  # units reserved by requests whose response has not arrived

    def roll(self, now: float) -> None:
        if self.reset_at is None or now < self.reset_at:
            return
        self.reset_at = None
        if self.refill_to_limit:
            self.remaining = self.limit
        elif self.remaining is not None:
            self.remaining = max(self.remaining, 1)  # at least one request fits: a probe

    def wait(self, now: float, need: int) -> float:
        if self.remaining is None or self.remaining >= need:
            return 0.0
        if self.reset_at is not None:
            return self.reset_at - now
        # Nothing fits and no reset known: wait for an in-flight response to tell us more.
        return PROBE_POLL_SECONDS if self.in_flight > 0 else 0.0

    def observe(self, limit: int | None, remaining: int | None, reset: float | None,
                now: float) -> None:
        if remaining is None:
            return
        # Requests sent after this one may not be counted in its headers yet: stay conservative.
        self.remaining = max(0, remaining - self.in_flight)
        self.limit = limit
        self.reset_at = now + reset if reset is not None else None


@dataclass
class Pacer:
    """Waits before a request the last rate-limit headers say would be refused.

    Protocol, per attempt: ``delay = pacer.reserve(now, tokens)``; while delay > 0 sleep it
    and ask again; then send; then ``pacer.complete(rate_limit_or_None, now, tokens)``. Safe to
    share between threads (a lock) and between tasks of one event loop (no await inside).
    """

    _requests: _Budget = field(default_factory=lambda: _Budget(refill_to_limit=False))
    _tokens: _Budget = field(default_factory=lambda: _Budget(refill_to_limit=True))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def reserve(self, now: float, tokens: int = 1) -> float:
        """Seconds to wait before asking again, or 0.0 with one request and `tokens` reserved."""
        need_tokens = max(1, tokens)
        with self._lock:
            self._requests.roll(now)
            self._tokens.roll(now)
            delay = max(self._requests.wait(now, 1), self._tokens.wait(now, need_tokens))
            if delay > 0:
                return delay
            for budget, need in ((self._requests, 1), (self._tokens, need_tokens)):
                budget.in_flight += need
                if budget.remaining is not None:
                    budget.remaining -= need
            return 0.0

    def complete(self, rate_limit: RateLimit | None, now: float, tokens: int = 1) -> None:
        """Release a reservation; learn from the response's headers if there was a response."""
        need_tokens = max(1, tokens)
        with self._lock:
            for budget, need in ((self._requests, 1), (self._tokens, need_tokens)):
                budget.in_flight = max(0, budget.in_flight - need)
                if rate_limit is None and budget.remaining is not None:
                    budget.remaining += need  # never reached the server: give it back
            if rate_limit is not None:
                self._requests.observe(rate_limit.limit_requests, rate_limit.remaining_requests,
                                       rate_limit.reset_requests, now)
                self._tokens.observe(rate_limit.limit_tokens, rate_limit.remaining_tokens,
                                     rate_limit.reset_tokens, now)
