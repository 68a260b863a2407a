"""HTTP for the ML backend (FastAPI): Label Studio's routes, auth, limits, errors as JSON.

``create_app(backend, token=...)`` builds the app; ``run_server`` serves it with uvicorn.
With a token, every route but ``GET /health`` and ``POST /webhook`` (Label Studio's webhooks
send no credentials; events are only acknowledged) needs ``Authorization: Bearer <token>``, or HTTP
basic auth whose password is the token (what Label Studio's "Basic Authentication" setting of
a model connection sends); ``teacher.serve.guard`` checks it, and the body limits, before a
body byte is read.

``/health`` runs on the event loop, so no prediction can hold it up. At most ``max_concurrent``
predictions run at once (in threads; ``ServeTeachers`` lets one model call through at a time,
image downloads overlap), more get 429 with Retry-After; a prediction stops when its client
disconnects or at the backend's ``call_timeout_s``. Any error is a JSON ``{"error": ...}``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from functools import partial
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException

from teacher.serve.backend import Backend, RequestError
from teacher.serve.guard import BODY_TIMEOUT_S, Guard, HeadTimeoutH11

log = logging.getLogger("teacher.serve")
MAX_BODY = 20 * 2**20  # bytes of one request (tasks + labeling config + context)
WEBHOOK_BODY = 2**20  # bytes of a webhook event (acknowledged, never used)
MAX_CONCURRENT = 4  # predictions at once; more get 429
RETRY_AFTER_S = 5  # what a 429 asks the client to wait
KEEP_ALIVE_S = 5  # an idle keep-alive connection is closed after this
MAX_HEAD = 16 * 2**10  # bytes of a request's head (request line + headers)
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    # Label Studio tasks {id, data: {image: url}}; one that is not an object gets an error entry
    tasks: list[Any] = Field(description="Label Studio tasks: {id, data: {image: url}}")
    label_config: str | None = None  # the project's labeling config XML
    project: str | int | None = None  # "<id>.<created timestamp>"
    params: dict[str, Any] = Field(default_factory=dict)  # {"context": {...}} for smart tools


class SetupRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    project: str | int | None = None
    schema_: str | None = Field(default=None, alias="schema")  # the labeling config XML
    extra_params: Any = None


def create_app(
    backend: Backend,
    *,
    token: str | None = None,
    max_body: int = MAX_BODY,
    max_concurrent: int = MAX_CONCURRENT,
) -> FastAPI:
    app = FastAPI(title="teacher ML backend", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(
        Guard,  # type: ignore[arg-type]
        token=token,
        max_body=max_body,
        limits={"/webhook": WEBHOOK_BODY},
        body_timeout_s=BODY_TIMEOUT_S,
    )
    add_error_handlers(app)
    running = 0  # predictions in progress (changed on the event loop only: no lock)

    @app.get("/")
    @app.get("/health")
    async def health() -> dict[str, Any]:
        return backend.health()

    @app.post("/setup")
    def setup(body: SetupRequest) -> dict[str, Any]:
        return backend.setup(
            project=None if body.project is None else str(body.project), schema=body.schema_
        )

    @app.post("/predict", response_model=None)
    async def predict(request: Request) -> JSONResponse | dict[str, Any]:
        nonlocal running
        if running >= max_concurrent:
            return JSONResponse(
                {
                    "error": f"{running} predictions running, at most {max_concurrent} "
                    "(--max-concurrent); retry later"
                },
                status_code=429,
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        running += 1
        try:
            return await predict_call(backend, request)
        finally:
            running -= 1

    @app.post("/webhook")  # open: Label Studio's webhooks carry no credentials; acts on nothing
    def webhook(body: dict[str, Any]) -> dict[str, Any]:
        return {
            "status": "ignored",
            "action": action if isinstance(action := body.get("action"), str) else None,
            "reason": "the teachers are trained by the DVC pipeline (dvc repro), not online",
        }

    @app.get("/metrics")
    def metrics() -> dict[str, Any]:
        return {}

    return app


async def predict_call(backend: Backend, request: Request) -> dict[str, Any]:
    """``backend.predict`` of the request's body, in a thread; the backend is told when the
    client disconnects (it then skips the tasks left)."""
    try:
        body = PredictRequest.model_validate_json(await request.body())
    except ValidationError as e:
        raise RequestValidationError(e.errors()) from None
    hung_up = threading.Event()
    watcher = asyncio.ensure_future(watch_disconnect(request, hung_up))
    try:
        return await run_in_threadpool(
            partial(
                backend.predict,
                tasks=body.tasks,
                label_config=body.label_config,
                project=None if body.project is None else str(body.project),
                context=body.params.get("context"),
                hung_up=hung_up,
            )
        )
    finally:
        watcher.cancel()


async def watch_disconnect(request: Request, hung_up: threading.Event) -> None:
    """Set ``hung_up`` when the client disconnects. Called once the body is read: the next
    message is the disconnect (uvicorn sends it also once the response is complete)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    hung_up.set()


def add_error_handlers(app: FastAPI) -> None:
    """Every error a JSON ``{"error": message}``: 400 for a request the backend cannot answer,
    422 for an invalid body, the status of an HTTP error (401, 404, 408, 413, ...), 500 naming
    the exception's type for anything else (its message may hold server paths: only the log,
    with the traceback, has it)."""

    @app.exception_handler(RequestError)
    async def _bad_request(request: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg']}" if e["loc"] else e["msg"]
            for e in exc.errors()
        )
        return JSONResponse({"error": f"invalid request: {problems}"}, status_code=422)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": exc.detail}, exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(
            {"error": f"internal error ({type(exc).__name__}); the server log has its traceback"},
            status_code=500,
        )


def run_server(
    backend: Backend,
    *,
    host: str,
    port: int,
    token: str | None,
    max_concurrent: int = MAX_CONCURRENT,
) -> None:
    """Serve until interrupted. Warns when listening beyond this machine without a token."""
    import uvicorn

    if host not in LOCAL_HOSTS and not token:
        log.warning(
            "listening on %s without a token: anyone who reaches this port can run the "
            "models; set TEACHER_SERVE_TOKEN",
            host,
        )
    uvicorn.run(
        create_app(backend, token=token, max_concurrent=max_concurrent),
        host=host,
        port=port,
        log_level="info",
        http=HeadTimeoutH11,
        timeout_keep_alive=KEEP_ALIVE_S,
        h11_max_incomplete_event_size=MAX_HEAD,
    )
