"""The admin API (FastAPI): health, readiness, metrics, status, adapters, runs.

It depends only on :class:`AdminBackend`, a small protocol that ``daemon.service.Service``
implements (and the API's tests implement in memory). Registry errors are mapped to HTTP
codes by type: :class:`~daemon.registry.VersionNotFound` → 404, any other
:class:`~daemon.registry.RegistryError` (a conflict with the registry's state, an invalid
adapter) → 409.

Mutating endpoints need ``Authorization: Bearer <token>``: 401 without one, 403 with a wrong
one. The comparison is constant-time by construction (``hmac.compare_digest`` over SHA-256
digests, so even a token of a different length takes the same path). Without a configured
token the mutating endpoints are refused. The token is never logged or echoed.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field

from daemon.registry import RegistryError, VersionNotFound

T = TypeVar("T")


class AdminBackend(Protocol):
    """What the admin API needs from the daemon. Registry methods raise RegistryError kinds."""

    def readiness_problems(self) -> list[str]: ...
    def metrics_exposition(self) -> bytes: ...
    def status(self) -> dict[str, Any]: ...
    def adapters(self) -> list[dict[str, Any]]: ...
    def adapter(self, version: str) -> dict[str, Any]: ...
    def run(self, run_id: str) -> dict[str, Any] | None: ...
    def promote(self, version: str, *, actor: str, reason: str, force: bool) -> list[str]: ...
    def rollback(self, *, actor: str, reason: str, to: str | None) -> tuple[str, list[str]]: ...
    def reject(self, version: str, *, actor: str, reason: str) -> None: ...
    def request_refresh(self, actor: str) -> tuple[bool, str]: ...


class PromoteBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field("operator promotion", max_length=1000)
    force: bool = False


class RollbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    to: str | None = Field(None, max_length=64)
    reason: str = Field("operator rollback", max_length=1000)


class ReasonBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field("operator request", max_length=1000)


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode()).digest()


def registry_call(fn: Callable[[], T]) -> T:
    """Run a registry operation; its error kinds become 404 / 409 with the message."""
    try:
        return fn()
    except VersionNotFound as e:
        raise HTTPException(404, str(e)) from e
    except RegistryError as e:
        raise HTTPException(409, str(e)) from e


# The route table: long, and the complexity counted is the routes, not branching logic.
def make_app(  # noqa: C901
    backend: AdminBackend, *, token: str | None, max_body_bytes: int
) -> FastAPI:
    """The app; ``token`` None refuses every mutating request."""
    app = FastAPI(title="alignd admin API", version="1")
    expected, max_body = token, max_body_bytes

    @app.middleware("http")
    async def limit_body(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > max_body):
            return JSONResponse({"detail": f"request body over {max_body} bytes"}, status_code=413)
        if request.method in {"POST", "PUT", "PATCH"}:
            body = (
                await request.body()
            )  # chunked bodies: counted after reading, still bounded below
            if len(body) > max_body:
                return JSONResponse(
                    {"detail": f"request body over {max_body} bytes"}, status_code=413
                )
        return await call_next(request)

    def operator(request: Request) -> str:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise HTTPException(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
        if expected is None or not hmac.compare_digest(_digest(token), _digest(expected)):
            raise HTTPException(403, "invalid token")
        actor = request.headers.get("x-alignd-actor", "operator")
        return "".join(c for c in actor[:64] if c.isalnum() or c in "-_.@") or "operator"

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

    @app.get("/v1/status")
    def status() -> dict[str, Any]:
        return backend.status()

    @app.get("/v1/adapters")
    def adapters() -> list[dict[str, Any]]:
        return backend.adapters()

    @app.get("/v1/adapters/{version}")
    def adapter(version: str) -> dict[str, Any]:
        return registry_call(lambda: backend.adapter(version))

    @app.post("/v1/adapters/{version}/promote")
    def promote(
        version: str, body: PromoteBody | None = None, actor: str = Depends(operator)
    ) -> dict[str, Any]:
        body = body or PromoteBody()
        failures = registry_call(
            lambda: backend.promote(version, actor=actor, reason=body.reason, force=body.force)
        )
        return {"active": version, "serving_hook_failures": failures}

    @app.post("/v1/adapters/{version}/reject")
    def reject(
        version: str, body: ReasonBody | None = None, actor: str = Depends(operator)
    ) -> dict[str, Any]:
        reason = (body or ReasonBody()).reason
        registry_call(lambda: backend.reject(version, actor=actor, reason=reason))
        return {"rejected": version}

    @app.post("/v1/rollback")
    def rollback(
        body: RollbackBody | None = None, actor: str = Depends(operator)
    ) -> dict[str, Any]:
        body = body or RollbackBody()
        version, failures = registry_call(
            lambda: backend.rollback(actor=actor, reason=body.reason, to=body.to)
        )
        return {"active": version, "serving_hook_failures": failures}

    @app.post("/v1/refresh", status_code=202)
    def refresh(actor: str = Depends(operator)) -> dict[str, Any]:
        accepted, message = backend.request_refresh(actor)
        if not accepted:
            raise HTTPException(409, message)
        return {"accepted": True, "message": message}

    @app.get("/v1/runs/{run_id}")
    def run(run_id: str) -> dict[str, Any]:
        status = backend.run(run_id)
        if status is None:
            raise HTTPException(404, f"no such run: {run_id}")
        return status

    return app
