"""Engine failures, as the step loop raises them to its callers (LLM, AsyncLLMEngine, the engine core)."""

from __future__ import annotations

from k2ray.engine.scheduler import RequestRejected


class EngineError(RuntimeError):
    """The engine failed while serving a request; the request is finished and its blocks freed."""


class EngineStepError(EngineError):
    def __init__(self, request_ids: list[str], cause: BaseException, message: str | None = None) -> None:
        super().__init__(message or f"engine step failed for {len(request_ids)} request(s): {cause!r}")
        self.request_ids = request_ids
        self.cause = cause


class StepRejected(EngineStepError, RequestRejected):
    """Requests a step found can never be served (their grammar failed to compile): rejected like
    at add_request, and `str()` is the reason a client may read."""


class KVLeaseExpired(EngineError):
    """A parked request's blocks were held past kv_lease_timeout_s; they are freed."""
