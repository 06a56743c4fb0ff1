"""The router: FastAPI ingress with the OpenAI and Anthropic routes, and its Serve deployment class.

`build_router_app(ctx)` is plain FastAPI (unit tests drive it with a fake engine client); `Router` is
the ingress deployment class that builds it at replica start, once the engine pool answers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import ray
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException

from k2ray.api.chat_template import ChatTemplate
from k2ray.api.openai_responses import ModelCard, ModelList
from k2ray.api.tokenizer import K2Tokenizer
from k2ray.serve.args import ServeArgs
from k2ray.serve.channel.delta_receiver import DeltaReceiver
from k2ray.serve.engine.channel_engine_client import ChannelEngineClient
from k2ray.serve.engine.engine_client import HandleEngineClient
from k2ray.serve.handlers.anthropic_messages import count_tokens, messages
from k2ray.serve.handlers.openai_chat import chat_completions
from k2ray.serve.handlers.openai_completions import completions
from k2ray.serve.handlers.openai_responses import responses
from k2ray.serve.http.admin_routes import add_admin_routes
from k2ray.serve.http.auth import AdminGuard, Authenticator, read_admin_token
from k2ray.serve.http.errors import (
    ApiError,
    ApiFlavor,
    error_response,
    flavor_of,
    internal_error,
    invalid_request,
)
from k2ray.serve.http.limits_actor import get_or_create_limits_actor
from k2ray.serve.http.metering import Billing
from k2ray.serve.http.request_limits import read_body
from k2ray.serve.http.router_context import Admission, RouterContext
from k2ray.serve.http.usage_routes import add_usage_routes
from k2ray.serve.metrics import RouterMetrics
from k2ray.serve.metrics.router_metrics import ERROR_FINISH
from k2ray.tools import WebSearch

logger = logging.getLogger(__name__)

Handler = Callable[[RouterContext, bytes], Awaitable[Response]]


async def _guarded(ctx: RouterContext, request: Request, handler: Handler, flavor: ApiFlavor) -> Response:
    """The caller's key first; every failure leaves in the API's own error shape, unexpected ones as a bare 500.
    Each request is counted once: by `dispatch` if it generated, else here with the status it got."""
    observation = ctx.metrics.start(request.url.path) if ctx.metrics is not None else None
    try:
        caller = await ctx.auth.authenticate(request.headers)
        scoped = ctx.for_caller(caller)
        scoped.observation = observation
        response = await handler(scoped, await read_body(request, ctx.limits.max_body_bytes))
    except ApiError as err:
        response = error_response(err, flavor)
    except Exception:
        logger.exception("unhandled error in %s", request.url.path)
        response = error_response(internal_error(), flavor)
    if observation is not None and not isinstance(response, StreamingResponse):  # a stream counts on close
        observation.finish(response.status_code, ERROR_FINISH if response.status_code >= 400 else None)
    return response


def build_router_app(ctx: RouterContext) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        if ctx.billing is not None:  # a router that shuts down writes every queued usage record
            ctx.billing.close()
        if ctx.web_search is not None:
            await ctx.web_search.aclose()

    app = FastAPI(title="k2ray", docs_url=None, redoc_url=None, lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(invalid_request("Invalid request"), flavor_of(request.url.path))

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        # Unknown routes (404) and wrong methods (405, with its Allow header) in the API's own shape.
        message = f"Invalid URL ({request.method} {request.url.path})" if exc.status_code == 404 else str(exc.detail)
        response = error_response(ApiError(exc.status_code, message), flavor_of(request.url.path))
        response.headers.update(exc.headers or {})
        return response

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        try:
            await ctx.auth.authenticate(request.headers)
        except ApiError as err:
            return error_response(err, "openai")
        cards = [ModelCard(id=m.id, created=ctx.created, max_model_len=ctx.max_model_len) for m in ctx.models]
        return JSONResponse(ModelList(data=cards).model_dump())

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await _guarded(ctx, request, chat_completions, "openai")

    @app.post("/v1/completions")
    async def complete(request: Request) -> Response:
        return await _guarded(ctx, request, completions, "openai")

    @app.post("/v1/responses")
    async def openai_responses(request: Request) -> Response:
        return await _guarded(ctx, request, responses, "openai")

    @app.post("/v1/messages")
    async def anthropic_messages(request: Request) -> Response:
        return await _guarded(ctx, request, messages, "anthropic")

    @app.post("/v1/messages/count_tokens")
    async def anthropic_count_tokens(request: Request) -> Response:
        return await _guarded(ctx, request, count_tokens, "anthropic")

    add_usage_routes(app, ctx)
    add_admin_routes(app, ctx)
    return app


@serve.ingress()
class Router:
    """Router deployment: owns tokenizer, chat template and parsers; engines see token ids only."""

    def __init__(self, args: ServeArgs, engine: DeploymentHandle) -> None:
        self._args = args
        transport = args.router.engine_transport
        if transport == "channel":
            host = args.router.channel_host or ray.util.get_node_ip_address()
            self._engine = ChannelEngineClient(engine, DeltaReceiver(host, args.router.channel_limits))
        else:
            self._engine = HandleEngineClient(engine, transport)
        self._metrics = RouterMetrics()
        self._billing = None
        if args.billing is not None:
            ledger_dsn = args.billing.ledger
            self._billing = Billing.open(args.billing, lambda _: get_or_create_limits_actor(args.app_name, ledger_dsn),
                                         self._metrics)

    async def __serve_build_asgi_app__(self) -> FastAPI:
        # Waiting for the engine here keeps the router out of rotation (and /health failing) until the
        # app can really serve.
        info = await self._engine.info()
        model_dir = self._args.model_dir
        token = self._args.router.admin_token
        ctx = RouterContext(
            tokenizer=K2Tokenizer.from_pretrained(model_dir),
            template=ChatTemplate.from_checkpoint(model_dir),
            engine=self._engine,
            models=self._args.served_models,
            max_model_len=int(info["max_model_len"]),
            admission=Admission(self._args.router.max_inflight_requests, self._args.router.retry_after_s),
            allow_injection=self._args.testing.allow_injection,
            created=int(time.time()),
            limits=self._args.router.limits,
            billing=self._billing,
            auth=Authenticator(self._billing.keys if self._billing and self._args.router.auth else None,
                               self._args.router.key_cache_ttl_s),
            admin=AdminGuard(read_admin_token(token and token.get_secret_value(), self._args.router.admin_token_file)),
            metrics=self._metrics,
            web_search=WebSearch.from_config(self._args.tools.web_search),
        )
        return build_router_app(ctx)
