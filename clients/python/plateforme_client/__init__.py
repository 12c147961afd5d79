"""plateforme_client: the Python client for Plateforme's gateway (sync `Client`, `AsyncClient`).

    from plateforme_client import Client
    with Client() as client:  # PLATEFORME_API_KEY, PLATEFORME_URL
        print(client.chat("small", [{"role": "user", "content": "Hi"}]).text)
"""

from ._async_client import AsyncClient
from ._base import DEFAULT_MAX_RETRIES, DEFAULT_TIMEOUT
from ._client import Client
from ._exceptions import (
    APIConnectionError,
    APIError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    NotFoundError,
    PermissionDeniedError,
    PlateformeError,
    RateLimitError,
    ServerError,
)
from ._models import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatMessage,
    Choice,
    ChunkChoice,
    Delta,
    Model,
    ModelList,
    ModerationResponse,
    ModerationResult,
    Usage,
)
from ._ratelimit import Pacer, RateLimit
from ._streaming import AsyncStream, Stream
from ._version import __version__

__all__ = [
    "DEFAULT_MAX_RETRIES",
    "DEFAULT_TIMEOUT",
    "APIConnectionError",
    "APIError",
    "APITimeoutError",
    "AsyncClient",
    "AsyncStream",
    "AuthenticationError",
    "BadRequestError",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatMessage",
    "Choice",
    "ChunkChoice",
    "Client",
    "Delta",
    "Model",
    "ModelList",
    "ModerationResponse",
    "ModerationResult",
    "NotFoundError",
    "Pacer",
    "PermissionDeniedError",
    "PlateformeError",
    "RateLimit",
    "RateLimitError",
    "ServerError",
    "Stream",
    "Usage",
    "__version__",
]
