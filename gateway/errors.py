"""The gateway's exception tree; each error knows its HTTP status and OpenAI error type/code.

    GatewayError
    ├── BadRequest            400 invalid_request_error
    │   └── ModerationBlocked 400 (input flagged by the classifier)
    ├── AuthenticationFailed  401 authentication_error
    ├── PermissionDenied      403 permission_error
    ├── NotFound              404 not_found_error
    ├── RequestTimeout        408 invalid_request_error (the body did not arrive in time)
    ├── PayloadTooLarge       413 invalid_request_error
    ├── HeadersTooLarge       431 invalid_request_error (request headers over 64 KiB)
    ├── Unprocessable         422 invalid_request_error
    ├── RateLimited           429 rate_limit_error  (carries Retry-After and the limit kind)
    ├── UpstreamError         502 upstream_error    (replicas answered badly after retries)
    │   └── ClassifierError   502 (the moderation classifier's answer was unusable)
    ├── ServiceUnavailable    503 service_unavailable (no healthy replica, store down)
    └── UpstreamTimeout       504 timeout           (upstream silent past the inter-chunk bound)

One handler in ``gateway.app`` renders every one of these as
``{"error": {"message", "type", "code", "param"}}`` so official SDKs raise the matching class.
"""

from __future__ import annotations

from typing import Any


class GatewayError(Exception):
    status: int = 500
    type: str = "api_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.param = param
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "code": self.code,
                "param": self.param,
            }
        }


class BadRequest(GatewayError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class ModerationBlocked(BadRequest):
    code = "content_flagged"


class AuthenticationFailed(GatewayError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class PermissionDenied(GatewayError):
    status = 403
    type = "permission_error"
    code = "model_not_allowed"


class NotFound(GatewayError):
    status = 404
    type = "not_found_error"
    code = "not_found"


class RequestTimeout(GatewayError):
    status = 408
    type = "invalid_request_error"
    code = "request_body_timeout"


class PayloadTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class HeadersTooLarge(GatewayError):
    status = 431
    type = "invalid_request_error"
    code = "request_headers_too_large"


class Unprocessable(GatewayError):
    status = 422
    type = "invalid_request_error"
    code = "invalid_value"


class RateLimited(GatewayError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, limit_kind: str, retry_after_seconds: float | None,
                 headers: dict[str, str] | None = None, code: str | None = None) -> None:
        merged = dict(headers or {})
        if retry_after_seconds is not None:  # None: the request can never be admitted
            merged["retry-after"] = str(max(1, int(retry_after_seconds + 0.999)))
        super().__init__(message, code=code, headers=merged)
        self.limit_kind = limit_kind
        self.retry_after_seconds = retry_after_seconds


class UpstreamError(GatewayError):
    status = 502
    type = "upstream_error"
    code = "bad_gateway"


class ClassifierError(UpstreamError):
    """The moderation classifier answered, but not with the expected JSON: the text is
    reported as unclassified, never as safe."""

    code = "classifier_error"


class ServiceUnavailable(GatewayError):
    status = 503
    type = "service_unavailable"
    code = "service_unavailable"


class UpstreamTimeout(GatewayError):
    status = 504
    type = "timeout"
    code = "upstream_timeout"


class StoreUnavailable(ServiceUnavailable):
    """The store could not be reached; raised by Store implementations on connection errors."""

    code = "store_unavailable"


class ConfigError(Exception):
    """The operator's config or environment is invalid; the message names the field."""
