"""HTTP for the ML backend (FastAPI): Label Studio's routes, auth, limits, 4xx with a message.

``create_app(backend, token=...)`` builds the app; ``run_server`` serves it with uvicorn.
With a token, every route but ``GET /health`` and ``POST /webhook`` (Label Studio's webhooks
send no credentials; events are only acknowledged) needs ``Authorization: Bearer <token>``, or HTTP
basic auth whose password is the token (what Label Studio's "Basic Authentication" setting of
a model connection sends). Model calls are synchronous: FastAPI runs them in its thread pool,
``ServeTeachers`` lets one through at a time, image downloads overlap.
"""

from __future__ import annotations

import base64
import hmac
import logging
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from teacher.serve.backend import Backend, RequestError

log = logging.getLogger("teacher.serve")
MAX_BODY = 20 * 2**20  # bytes of one request (tasks + labeling config + context)
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    tasks: list[dict[str, Any]] = Field(description="Label Studio tasks: {id, data: {image: url}}")
    label_config: str | None = None  # the project's labeling config XML
    project: str | int | None = None  # "<id>.<created timestamp>"
    params: dict[str, Any] = Field(default_factory=dict)  # {"context": {...}} for smart tools


class SetupRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    project: str | int | None = None
    schema_: str | None = Field(default=None, alias="schema")  # the labeling config XML
    extra_params: Any = None


class Unauthorized(Exception):
    pass


def token_ok(header: str | None, token: str) -> bool:
    """``Bearer <token>`` or ``Basic base64(user:<token>)`` (any user name)."""
    if not header:
        return False
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer":
        return hmac.compare_digest(value.strip().encode(), token.encode())
    if scheme.lower() == "basic":
        try:
            _, _, password = base64.b64decode(value.strip()).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        return hmac.compare_digest(password.encode(), token.encode())
    return False


def create_app(backend: Backend, *, token: str | None = None, max_body: int = MAX_BODY) -> FastAPI:
    app = FastAPI(title="teacher ML backend", docs_url=None, redoc_url=None, openapi_url=None)

    def authorized(request: Request) -> None:
        if token and not token_ok(request.headers.get("authorization"), token):
            raise Unauthorized()

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > max_body):
            return JSONResponse(
                {"error": f"request body over {max_body} bytes; send fewer tasks per call"},
                status_code=413,
            )
        return await call_next(request)

    @app.exception_handler(Unauthorized)
    async def _unauthorized(request: Request, exc: Unauthorized):
        return JSONResponse(
            {
                "error": "missing or wrong token: send 'Authorization: Bearer "
                "<token>' (or basic auth with the token as password)"
            },
            status_code=401,
            headers={"WWW-Authenticate": 'Bearer, Basic realm="teacher"'},
        )

    @app.exception_handler(RequestError)
    async def _bad_request(request: Request, exc: RequestError):
        return JSONResponse({"error": str(exc)}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"error": f"invalid request: {problems}"}, status_code=422)

    @app.get("/")
    @app.get("/health")
    def health() -> dict[str, Any]:
        return backend.health()

    @app.post("/setup", dependencies=[Depends(authorized)])
    def setup(body: SetupRequest) -> dict[str, Any]:
        return backend.setup(
            project=None if body.project is None else str(body.project), schema=body.schema_
        )

    @app.post("/predict", dependencies=[Depends(authorized)])
    def predict(body: PredictRequest) -> dict[str, Any]:
        return backend.predict(
            tasks=body.tasks,
            label_config=body.label_config,
            project=None if body.project is None else str(body.project),
            context=body.params.get("context"),
        )

    @app.post(
        "/webhook"
    )  # open: Label Studio's webhooks carry no credentials, and it acts on nothing
    def webhook(body: dict[str, Any]) -> dict[str, Any]:
        return {
            "status": "ignored",
            "action": body.get("action"),
            "reason": "the teachers are trained by the DVC pipeline (dvc repro), not online",
        }

    @app.get("/metrics", dependencies=[Depends(authorized)])
    def metrics() -> dict[str, Any]:
        return {}

    return app


def run_server(backend: Backend, *, host: str, port: int, token: str | None) -> None:
    """Serve until interrupted. Warns when listening beyond this machine without a token."""
    import uvicorn

    if host not in LOCAL_HOSTS and not token:
        log.warning(
            "listening on %s without a token: anyone who reaches this port can run the "
            "models; set TEACHER_SERVE_TOKEN",
            host,
        )
    uvicorn.run(create_app(backend, token=token), host=host, port=port, log_level="info")
