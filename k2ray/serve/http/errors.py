"""API errors: one exception type, rendered in the OpenAI or the Anthropic shape by the route's API.

Nothing here ever puts a stack trace or an exception's repr into a response body; unexpected
exceptions become a generic 500 and are logged on the replica.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from fastapi.responses import JSONResponse

from k2ray.api.anthropic_protocol import AnthropicErrorDetail, AnthropicErrorResponse
from k2ray.api.openai_responses import ErrorDetail, ErrorResponse

ApiFlavor = Literal["openai", "anthropic"]

# HTTP status -> (OpenAI/Moonshot error type, Anthropic error type).
_ERROR_TYPES: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "invalid_request_error"),
    401: ("invalid_authentication_error", "authentication_error"),
    402: ("insufficient_quota", "billing_error"),
    404: ("not_found_error", "not_found_error"),
    405: ("invalid_request_error", "invalid_request_error"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("engine_overloaded_error", "rate_limit_error"),
    500: ("server_error", "api_error"),
    503: ("engine_overloaded_error", "overloaded_error"),
}
INTERNAL_ERROR_MESSAGE = "The server had an error while processing your request."
ANTHROPIC_PATH = "/v1/messages"
# Native libraries (xgrammar) prefix their messages with `[12:00:00] /project/cpp/file.cc:94: `.
_NATIVE_SOURCE_PREFIX = re.compile(r"\[[\d:]+\] \S+?\.(?:cc|cpp|cxx|c|h|hpp):\d+: ")


def flavor_of(path: str) -> ApiFlavor:
    """The API a request path belongs to, for errors raised before (or outside) its route's handler."""
    return "anthropic" if ANTHROPIC_PATH in path else "openai"


@dataclass
class ApiError(Exception):
    status: int
    message: str
    param: str | None = None
    code: str | None = None
    retry_after_s: int | None = None
    headers: dict[str, str] | None = None  # extra response headers (x-ratelimit-*)
    error_type: str | None = None  # the OpenAI `type` when it is not the status's default

    def __str__(self) -> str:
        return self.message


def invalid_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


def model_not_found(model: str) -> ApiError:
    return ApiError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")


def overloaded(retry_after_s: int) -> ApiError:
    return ApiError(429, "The engine is currently overloaded, please try again later",
                    retry_after_s=retry_after_s)


def request_too_large(max_bytes: int) -> ApiError:
    return ApiError(413, f"Request body too large: at most {max_bytes} bytes are accepted.",
                    code="request_too_large")


def unavailable(message: str) -> ApiError:
    return ApiError(503, message)


def internal_error() -> ApiError:
    return ApiError(500, INTERNAL_ERROR_MESSAGE)


def without_native_sources(message: str) -> str:
    """A rejection message from the engine (grammar compiler included) without native source locations."""
    return _NATIVE_SOURCE_PREFIX.sub("", message).strip()


def error_response(err: ApiError, flavor: ApiFlavor) -> JSONResponse:
    openai_type, anthropic_type = _ERROR_TYPES.get(err.status, _ERROR_TYPES[500])
    openai_type = err.error_type or openai_type
    headers = dict(err.headers or {})
    if err.retry_after_s is not None:
        headers["Retry-After"] = str(err.retry_after_s)
    if flavor == "anthropic":
        body = AnthropicErrorResponse(error=AnthropicErrorDetail(type=anthropic_type, message=err.message))
    else:
        body = ErrorResponse(error=ErrorDetail(message=err.message, type=openai_type, param=err.param,
                                               code=err.code))
    return JSONResponse(body.model_dump(), status_code=err.status, headers=headers or None)


def error_payload(err: ApiError, flavor: ApiFlavor) -> dict:
    """The error body alone, for an error that happens after a stream has started (sent as an event)."""
    openai_type, anthropic_type = _ERROR_TYPES.get(err.status, _ERROR_TYPES[500])
    if flavor == "anthropic":
        return {"type": "error", "error": {"type": anthropic_type, "message": err.message}}
    return {"error": {"message": err.message, "type": openai_type, "param": err.param, "code": err.code}}
