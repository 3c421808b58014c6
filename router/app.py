"""HTTP routes. Each one validates (pydantic), calls `OpenAIServing` and wraps what it returns.

`build_app` loads the tokenizer up front (a bad model directory fails at start, not at the first request);
the app's lifespan connects to the instances, runs a first health poll and keeps polling in the background.
"""
from __future__ import annotations

import asyncio
import json
import logging
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as distribution_version
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import TypeVar

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from common.loader import resolve_model_path
from router.config import RouterConfig
from router.discovery import Resolver, resolve_with_system
from router.errors import RouterError
from router.instances import InstancePool
from router.metrics import RouterMetrics
from router.middleware import CatchUnexpectedErrors, LimitBodySize, RequireApiKey
from router.orchestrator import Orchestrator
from router.policy import make_policy
from router.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, ModelList, TokenizeRequest
from router.serving import OpenAIServing
from router.tokenization import load_model_info, load_tokenizer

logger = logging.getLogger(__name__)
T = TypeVar("T")

HTTP_CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the client went away"; nobody reads it

routes = APIRouter()


def build_app(config: RouterConfig, resolver: Resolver = resolve_with_system) -> FastAPI:
    model_dir = str(resolve_model_path(config.model))  # an embedded model's name or a GGUF file -> a directory
    tokenizer = load_tokenizer(model_dir)
    model_info = load_model_info(model_dir, tokenizer, config.max_model_len)
    metrics = RouterMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # gRPC aio channels belong to the running loop, so the pool is built here and not in build_app.
        pool = InstancePool.connect(config.prefill_addresses, config.decode_addresses, make_policy(config.policy),
                                    config.rpc_timeout_s, config.health_interval_s, config.security, resolver=resolver,
                                    discovery_interval_s=config.discovery_interval_s)
        metrics.watch_pool(pool)
        orchestrator = Orchestrator(pool, metrics, prefill_timeout_s=config.prefill_timeout_s,
                                    rpc_timeout_s=config.rpc_timeout_s,
                                    max_prefill_attempts=config.max_prefill_attempts,
                                    token_timeout_s=config.token_timeout_s,
                                    max_migrations=config.max_migrations)
        app.state.pool = pool
        app.state.serving = OpenAIServing(config, tokenizer, model_info, orchestrator, metrics)
        await pool.start()
        try:
            yield
        finally:
            await pool.close()

    app = FastAPI(title="HACK serve router", lifespan=lifespan)
    app.state.metrics = metrics
    app.state.metrics_poll_timeout_s = config.rpc_timeout_s + 0.25
    _add_error_handlers(app, metrics)
    app.include_router(routes)
    # add_middleware wraps what is there: the last added runs first.
    app.add_middleware(LimitBodySize, max_bytes=config.max_request_bytes)
    if config.api_keys:
        app.add_middleware(RequireApiKey, keys=config.api_keys)
    app.add_middleware(CatchUnexpectedErrors)
    _document_errors_as_served(app, config.api_keys)
    return app


IGNORED_FIELDS_HEADER = "X-Ignored-Fields"  # the unknown request fields this server accepted and ignored


@routes.post("/v1/completions")
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    return await _respond(request, _serving(request).completion(body), body.ignored_fields)


@routes.post("/v1/chat/completions")
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    return await _respond(request, _serving(request).chat_completion(body), body.ignored_fields)


@routes.get("/v1/models")
async def list_models(request: Request) -> ModelList:
    return _serving(request).models()


@routes.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> Response:
    return _json(_serving(request).tokenize(body), body.ignored_fields)


@routes.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> Response:
    return _json(_serving(request).detokenize(body), body.ignored_fields)


@routes.get("/version")
async def version() -> JSONResponse:
    return JSONResponse({"version": package_version()})


@routes.get("/health")
async def health() -> JSONResponse:
    """Liveness: the router process answers."""
    return JSONResponse({"status": "ok"})


@routes.get("/ready")
async def ready(request: Request) -> JSONResponse:
    """Readiness: at least one healthy prefill and one healthy decode instance."""
    pool: InstancePool = request.app.state.pool
    body = {
        "ready": pool.ready,
        "instances": [
            {"role": i.role.value, "address": i.address, "healthy": i.healthy, "inflight": i.inflight}
            for i in pool.instances
        ],
    }
    return JSONResponse(body, status_code=200 if pool.ready else 503)


@routes.get("/metrics")
async def prometheus_metrics(request: Request) -> Response:
    """The metrics, with the instances' load and health polled right now (a dead instance drops out)."""
    poll = asyncio.ensure_future(request.app.state.pool.poll_once())
    # A poll ends within the RPC timeout (a dead instance: when its health check times out).
    await asyncio.wait((poll,), timeout=request.app.state.metrics_poll_timeout_s)
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


def package_version() -> str:
    try:
        return distribution_version("hack-serve")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"


def _serving(request: Request) -> OpenAIServing:
    return request.app.state.serving


def _ignored_headers(ignored_fields: list[str]) -> dict[str, str]:
    """Header values must be latin-1: a field name beyond ASCII is sent JSON-escaped ("\\u0100")."""
    names = (json.dumps(name)[1:-1] for name in ignored_fields)
    return {IGNORED_FIELDS_HEADER: ", ".join(names)} if ignored_fields else {}


def _json(result: BaseModel, ignored_fields: list[str]) -> JSONResponse:
    return JSONResponse(result.model_dump(mode="json"), headers=_ignored_headers(ignored_fields))


async def _respond(request: Request, work: Awaitable[BaseModel | AsyncIterator[str]],
                   ignored_fields: list[str]) -> Response:
    result = await _cancel_on_disconnect(request, work)
    if result is None:
        return Response(status_code=HTTP_CLIENT_CLOSED_REQUEST)
    if isinstance(result, BaseModel):
        return _json(result, ignored_fields)
    return StreamingResponse(result, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", **_ignored_headers(ignored_fields)})


async def _cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T | None:
    """Run `work`; if the client disconnects first, cancel it (which cancels the request on the instances).

    Starlette notices a disconnect by itself only while it streams a body; this covers the time before.
    Returns None after a disconnect.
    """
    work_task = asyncio.ensure_future(work)
    disconnect_task = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait((work_task, disconnect_task), return_when=asyncio.FIRST_COMPLETED)
    finally:
        disconnect_task.cancel()
        if not work_task.done():
            work_task.cancel()
    if not work_task.done() or work_task.cancelled():
        await asyncio.gather(work_task, return_exceptions=True)  # let its cleanup run
        logger.info("client disconnected from %s before the response was ready", request.url.path)
        return None
    return work_task.result()


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _add_error_handlers(app: FastAPI, metrics: RouterMetrics) -> None:
    @app.exception_handler(RouterError)
    async def router_error(_: Request, error: RouterError) -> JSONResponse:
        return JSONResponse(error.to_dict(), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
        # 400 rather than FastAPI's 422, as OpenAI and vLLM answer.
        metrics.requests.labels("invalid").inc()
        return _validation_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        body = RouterError(str(error.detail), status=error.status_code).to_dict()
        return JSONResponse(body, status_code=error.status_code, headers=error.headers)


_ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["message", "type"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}},
}


def _document_errors_as_served(app: FastAPI, api_keys: tuple[str, ...]) -> None:
    """The OpenAPI schema with the errors the router really answers: 400 (not FastAPI's 422) for a bad request,
    in the OpenAI error shape, plus 401 when API keys are set, 413, 404 (unknown model) and 503/504."""
    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            schema.setdefault("components", {}).setdefault("schemas", {})["ErrorResponse"] = _ERROR_SCHEMA
            reference = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
            for path, operations in schema.get("paths", {}).items():
                for operation in operations.values():
                    responses = operation.setdefault("responses", {})
                    if responses.pop("422", None) is not None:
                        responses["400"] = {"description": "Invalid request", **reference}
                    if path.startswith("/v1/") and "requestBody" in operation:
                        responses["413"] = {"description": "Request body too large", **reference}
                        responses["404"] = {"description": "Unknown model", **reference}
                        responses["503"] = {"description": "No instance can serve the request", **reference}
                    if path.startswith("/v1/") and api_keys:
                        responses["401"] = {"description": "Missing or wrong API key", **reference}
            for schema_name in ("HTTPValidationError", "ValidationError"):
                schema["components"]["schemas"].pop(schema_name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _validation_response(error: RequestValidationError) -> JSONResponse:
    first = error.errors()[0]
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(location) or None
    message = first.get("msg", "invalid request")
    if first.get("type") == "json_invalid":
        message, param = "the request body is not valid JSON", None
    elif param:
        message = f"{param}: {message}"
    return JSONResponse(RouterError(message, status=400, param=param).to_dict(), status_code=400)
