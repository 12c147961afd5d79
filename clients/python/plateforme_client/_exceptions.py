"""The client's exception tree: every failure a caller can see is one of these.

    PlateformeError                      anything raised by this package (also bad configuration)
    ├── APIError                         the server answered with an error
    │   ├── BadRequestError              400, 413, 422: the request itself is wrong
    │   ├── AuthenticationError          401: missing, unknown, revoked or expired key
    │   ├── PermissionDeniedError        403: this key may not use this model
    │   ├── NotFoundError                404: unknown model or path
    │   ├── RateLimitError               429: rate limited or quota spent (.retry_after)
    │   └── ServerError                  5xx (502 upstream error, 503 unavailable, 504 timeout)
    └── APIConnectionError               no HTTP answer: refused, reset, DNS, broken stream
        └── APITimeoutError              a connect/read/write/pool timeout

`APIError` carries what the gateway's OpenAI-style envelope
``{"error": {"message", "type", "code", "param"}}`` says, plus the HTTP status, the
``x-request-id`` to quote in a bug report, and the rate-limit headers. A body that is not JSON
(a proxy's HTML page) still yields an `APIError` whose message is the start of that text.
An error event inside a stream that already started is raised as a plain `APIError`
carrying the stream's HTTP status (200).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._ratelimit import RateLimit

__all__ = [
    "APIConnectionError",
    "APIError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "NotFoundError",
    "PermissionDeniedError",
    "PlateformeError",
    "RateLimitError",
    "ServerError",
]


class PlateformeError(Exception):
    """Base of everything this package raises."""


class APIError(PlateformeError):
    """The server answered with an error status (or an error event inside a stream)."""

    def __init__(
        self,
        message: str,
        *,
        status: int,
        request_id: str | None = None,
        code: str | None = None,
        type: str | None = None,
        param: str | None = None,
        body: Any = None,
        rate_limit: RateLimit | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.request_id = request_id
        self.code = code
        self.type = type
        self.param = param
        self.body = body
        self.rate_limit = rate_limit
        self.retry_after = retry_after  # seconds, from Retry-After; None when absent

    @property
    def status_code(self) -> int:
        """Alias of `status`, the name httpx and the openai SDK use."""
        return self.status

    def __str__(self) -> str:
        suffix = f" (request id {self.request_id})" if self.request_id else ""
        return f"{self.status}: {self.message}{suffix}"


class BadRequestError(APIError):
    """400 invalid body, 413 body too large, 422 invalid value: fix the request, don't retry."""


class AuthenticationError(APIError):
    """401: the API key is missing, unknown, revoked or expired."""


class PermissionDeniedError(APIError):
    """403: the key is valid but may not use this model."""


class NotFoundError(APIError):
    """404: unknown model (or path)."""


class RateLimitError(APIError):
    """429: a per-minute limit or the monthly quota is spent.

    `.retry_after` (seconds) says when to try again; `.rate_limit` holds the limit, remaining
    and reset values the gateway reported.
    """


class ServerError(APIError):
    """5xx: 502 the upstream answered badly, 503 no healthy replica, 504 the upstream timed out."""


class APIConnectionError(PlateformeError):
    """No HTTP answer: the connection failed, was reset, or a stream broke off mid-way."""


class APITimeoutError(APIConnectionError):
    """A connect, read (inter-chunk), write or pool timeout elapsed."""


_BY_STATUS: dict[int, type[APIError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    413: BadRequestError,
    422: BadRequestError,
    429: RateLimitError,
}


def error_class_for(status: int) -> type[APIError]:
    """The exception class for an HTTP error status (other 4xx map to `APIError` itself)."""
    if status >= 500:
        return ServerError
    return _BY_STATUS.get(status, APIError)
