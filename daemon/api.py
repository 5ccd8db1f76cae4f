"""The admin API (FastAPI): health, readiness, metrics, status, adapters, runs.

It depends only on :class:`daemon.operations.Operations`, the operator's reads and actions that
the console shares (``daemon.operations.Desk`` implements it over the daemon; the API's tests
implement it in memory). Every answer has a response model, so the OpenAPI document describes
it. Registry errors are mapped to HTTP
codes by type: :class:`~daemon.registry.VersionNotFound` → 404, any other
:class:`~daemon.registry.RegistryError` (a conflict with the registry's state, an invalid
adapter) → 409.

Every endpoint under ``/v1/`` needs ``Authorization: Bearer <token>`` (401 without one, 403
with a wrong one): reads take the admin token or the read-only token (``admin.read_token``),
changes only the admin token. ``/healthz``, ``/readyz`` and ``/metrics`` stay open and carry no
event content (error types, never messages). Request bodies are bounded while they stream in,
before authentication (:class:`BodyLimit`). Tokens are checked by :class:`daemon.auth.Tokens`,
shared with the console: constant-time, wrong ones counted, logged without the token and
rate-limited per client (429 with ``Retry-After``). Without a configured token the endpoints it
opens are refused. Tokens are never logged or echoed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from daemon.auth import Access, ReservedName, Tokens, TooManyFailures, operator_name
from daemon.operations import (
    AdapterSummary,
    CanaryAction,
    CanaryChanged,
    CanaryStatus,
    Operations,
    ServiceStatus,
)
from daemon.records import AdapterDetail, RunStatus
from daemon.registry import RegistryError, VersionNotFound

T = TypeVar("T")


class RefreshBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    full: bool = Field(False, description="train on the whole snapshot, not incrementally")


class PromoteBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field("operator promotion", max_length=1000)
    force: bool = False


class RollbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    to: str | None = Field(None, max_length=64)
    reason: str = Field("operator rollback", max_length=1000)
    force: bool = Field(False, description="allow a version an operator rejected")


class ReasonBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field("operator request", max_length=1000)


class CanaryBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    action: CanaryAction
    version: str | None = Field(
        None, max_length=64, description="start: the version; else, when given, the canary's"
    )
    fraction: float | None = Field(
        None, gt=0, lt=1, description="start: default the first rollout step; widen: the next"
    )
    reason: str = Field("operator request", max_length=1000)
    force: bool = Field(False, description="start or promote past the gate's tier")


class Activated(BaseModel):
    """A promotion or a rollback: what is active now, and serving hooks that failed (they are
    retried every tick until serving agrees with the registry)."""

    active: str
    serving_hook_failures: list[str]


class Rejected(BaseModel):
    rejected: str


class RefreshAccepted(BaseModel):
    accepted: bool
    message: str


class BodyLimit:
    """ASGI middleware: a request body is read at most ``max_body`` bytes far, *before* routing
    and authentication, whether it comes with ``Content-Length`` or chunked; beyond that the
    answer is 413 and the rest is never read (uvicorn then closes the connection). The body read
    is replayed to the app, so endpoints see it unchanged."""

    def __init__(self, app: ASGIApp, max_body: int) -> None:
        self.app, self.max_body = app, max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            await self._too_large(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                await self._too_large(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = JSONResponse(
            {"detail": f"request body over {self.max_body} bytes"},
            status_code=413,
            headers={"connection": "close"},
        )
        await response(scope, receive, send)


def registry_call(fn: Callable[[], T]) -> T:
    """Run a registry operation; its error kinds become 404 / 409 with the message."""
    try:
        return fn()
    except VersionNotFound as e:
        raise HTTPException(404, str(e)) from e
    except RegistryError as e:
        raise HTTPException(409, str(e)) from e


class Guard:
    """Who may call: the dependencies the routes declare. The admin token may read and change;
    the read-only token may only read; without an admin token every mutating request is
    refused, without either every read under /v1/ (:class:`daemon.auth.Tokens`: wrong tokens
    are counted and rate-limited per client)."""

    def __init__(self, tokens: Tokens) -> None:
        self.tokens = tokens

    def access(self, request: Request) -> Access:
        return self.identify(request)[0]

    def identify(self, request: Request) -> tuple[Access, str | None]:
        header = request.headers.get("authorization", "")
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != "bearer" or not presented:
            raise HTTPException(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
        client = request.client.host if request.client else "unknown"
        try:
            found = self.tokens.identify(presented, client=client, surface="api")
        except TooManyFailures as e:
            raise HTTPException(
                429, str(e), headers={"Retry-After": f"{max(1, round(e.retry_after_s))}"}
            ) from e
        if found is None:
            raise HTTPException(403, "invalid token")
        return found

    def reader(self, request: Request) -> None:
        """Reads under /v1/ (manifests, runs, status): the read-only or the admin token."""
        self.access(request)

    def operator(self, request: Request) -> str:
        """Changes: an admin token. The audit log's actor is the operator's own token's name,
        or, with the shared admin token, the name the caller gives (``x-alignd-actor``)."""
        access, name = self.identify(request)
        if access != "admin":
            raise HTTPException(403, "invalid token")
        if name is not None:
            return name
        try:
            return operator_name(request.headers.get("x-alignd-actor", "operator"))
        except ReservedName as e:
            raise HTTPException(400, f"x-alignd-actor: {e}") from e


def make_app(backend: Operations, *, tokens: Tokens, max_body_bytes: int) -> FastAPI:
    """The app: open probes and metrics, reads, then actions (:class:`Guard` says who may)."""
    app = FastAPI(title="alignd admin API", version="1")
    app.add_middleware(BodyLimit, max_body=max_body_bytes)
    guard = Guard(tokens)
    _probes(app, backend)
    _reads(app, backend, guard.reader)
    _actions(app, backend, guard.operator)
    return app


def _probes(app: FastAPI, backend: Operations) -> None:
    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}  # the process answers; never depends on Kafka or the store

    @app.get("/readyz", responses={503: {"description": "not ready: the reasons are listed"}})
    def readyz() -> JSONResponse:
        problems = backend.readiness_problems()
        body = {"ready": not problems, "problems": problems}
        return JSONResponse(body, status_code=200 if not problems else 503)

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(backend.metrics_exposition(), media_type=CONTENT_TYPE_LATEST)


def _reads(app: FastAPI, backend: Operations, reader: Callable[[Request], None]) -> None:
    @app.get("/v1/status", dependencies=[Depends(reader)], response_model=ServiceStatus)
    def status() -> ServiceStatus:
        return backend.status()

    @app.get("/v1/adapters", dependencies=[Depends(reader)],
             response_model=list[AdapterSummary])  # fmt: skip
    def adapters() -> list[AdapterSummary]:
        return backend.adapters()

    @app.get("/v1/adapters/{version}", dependencies=[Depends(reader)], response_model=AdapterDetail)
    def adapter(version: str) -> AdapterDetail:
        return registry_call(lambda: backend.adapter(version))

    @app.get("/v1/canary", dependencies=[Depends(reader)], response_model=CanaryStatus | None)
    def canary() -> CanaryStatus | None:
        return backend.canary()

    @app.get("/v1/routing", dependencies=[Depends(reader)])
    def routing() -> dict[str, Any]:
        """The routing document a gateway reads (``daemon.routing``)."""
        return backend.routing()

    @app.get("/v1/runs/{run_id}", dependencies=[Depends(reader)], response_model=RunStatus)
    def run(run_id: str) -> RunStatus:
        status = backend.run(run_id)
        if status is None:
            raise HTTPException(404, f"no such run: {run_id}")
        return status


def _actions(app: FastAPI, backend: Operations, operator: Callable[[Request], str]) -> None:
    @app.post("/v1/adapters/{version}/promote", response_model=Activated)
    def promote(
        version: str, body: PromoteBody | None = None, actor: str = Depends(operator)
    ) -> Activated:
        body = body or PromoteBody()
        failures = registry_call(
            lambda: backend.promote(version, actor=actor, reason=body.reason, force=body.force)
        )
        return Activated(active=version, serving_hook_failures=failures)

    @app.post("/v1/adapters/{version}/reject", response_model=Rejected)
    def reject(
        version: str, body: ReasonBody | None = None, actor: str = Depends(operator)
    ) -> Rejected:
        reason = (body or ReasonBody()).reason
        registry_call(lambda: backend.reject(version, actor=actor, reason=reason))
        return Rejected(rejected=version)

    @app.post("/v1/rollback", response_model=Activated)
    def rollback(body: RollbackBody | None = None, actor: str = Depends(operator)) -> Activated:
        body = body or RollbackBody()
        version, failures = registry_call(
            lambda: backend.rollback(actor=actor, reason=body.reason, to=body.to, force=body.force)
        )
        return Activated(active=version, serving_hook_failures=failures)

    @app.post("/v1/canary", response_model=CanaryChanged)
    def change_canary(body: CanaryBody, actor: str = Depends(operator)) -> CanaryChanged:
        return registry_call(
            lambda: backend.change_canary(
                body.action, actor=actor, reason=body.reason, version=body.version,
                fraction=body.fraction, force=body.force,
            )
        )  # fmt: skip

    @app.post("/v1/refresh", status_code=202, response_model=RefreshAccepted)
    def refresh(body: RefreshBody | None = None, actor: str = Depends(operator)) -> RefreshAccepted:
        accepted, message = backend.request_refresh(actor, full=(body or RefreshBody()).full)
        if not accepted:
            raise HTTPException(409, message)
        return RefreshAccepted(accepted=True, message=message)
