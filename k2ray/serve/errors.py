"""API errors: one exception type, rendered in the OpenAI or the Anthropic shape by the route's API.

Nothing here ever puts a stack trace or an exception's repr into a response body; unexpected
exceptions become a generic 500 and are logged on the replica.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fastapi.responses import JSONResponse
from pydantic import ValidationError

from k2ray.api.anthropic_protocol import AnthropicErrorDetail, AnthropicErrorResponse
from k2ray.api.openai_responses import ErrorDetail, ErrorResponse

ApiFlavor = Literal["openai", "anthropic"]

# HTTP status -> (OpenAI/Moonshot error type, Anthropic error type).
_ERROR_TYPES: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "invalid_request_error"),
    401: ("invalid_authentication_error", "authentication_error"),
    404: ("not_found_error", "not_found_error"),
    429: ("engine_overloaded_error", "rate_limit_error"),
    500: ("server_error", "api_error"),
    503: ("engine_overloaded_error", "overloaded_error"),
}
INTERNAL_ERROR_MESSAGE = "The server had an error while processing your request."


@dataclass
class ApiError(Exception):
    status: int
    message: str
    param: str | None = None
    code: str | None = None
    retry_after_s: int | None = None

    def __str__(self) -> str:
        return self.message


def invalid_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


def model_not_found(model: str) -> ApiError:
    return ApiError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")


def overloaded(retry_after_s: int) -> ApiError:
    return ApiError(429, "The engine is currently overloaded, please try again later",
                    retry_after_s=retry_after_s)


def internal_error() -> ApiError:
    return ApiError(500, INTERNAL_ERROR_MESSAGE)


def from_validation_error(exc: ValidationError) -> ApiError:
    first = exc.errors()[0] if exc.errors() else None
    if first is None:
        return invalid_request("Invalid request")
    if first.get("type") == "json_invalid":
        return invalid_request(f"Invalid JSON body: {first.get('msg', '')}")
    loc = ".".join(str(p) for p in first.get("loc", ()))
    # `msg` is pydantic's human text; `input` is left out so that request bodies are never echoed.
    return invalid_request(f"Invalid request: {loc}: {first.get('msg', 'invalid value')}", param=loc or None)


def error_response(err: ApiError, flavor: ApiFlavor) -> JSONResponse:
    openai_type, anthropic_type = _ERROR_TYPES.get(err.status, _ERROR_TYPES[500])
    headers = {"Retry-After": str(err.retry_after_s)} if err.retry_after_s is not None else None
    if flavor == "anthropic":
        body = AnthropicErrorResponse(error=AnthropicErrorDetail(type=anthropic_type, message=err.message))
    else:
        body = ErrorResponse(error=ErrorDetail(message=err.message, type=openai_type, param=err.param,
                                               code=err.code))
    return JSONResponse(body.model_dump(), status_code=err.status, headers=headers)


def error_payload(err: ApiError, flavor: ApiFlavor) -> dict:
    """The error body alone, for an error that happens after a stream has started (sent as an event)."""
    openai_type, anthropic_type = _ERROR_TYPES.get(err.status, _ERROR_TYPES[500])
    if flavor == "anthropic":
        return {"type": "error", "error": {"type": anthropic_type, "message": err.message}}
    return {"error": {"message": err.message, "type": openai_type, "param": err.param, "code": err.code}}
