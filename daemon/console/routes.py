"""The console's routes: sign-in and sessions, the four pages, the actions (see the package's
docstring for the guards). Each page is :mod:`daemon.console.views` rendered by its template."""

from __future__ import annotations

import hmac
import json
import secrets
import time
from urllib.parse import parse_qs

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from daemon.auth import ReservedName, Tokens, TooManyFailures, operator_name
from daemon.console.render import render
from daemon.console.views import Session, overview, version_view
from daemon.operations import Operations
from daemon.registry import RegistryError, VersionNotFound

COOKIE = "alignd_console"
LOGIN_COOKIE = "alignd_console_login"  # the sign-in form's CSRF token
SESSION_S = 8 * 3600
HEADERS = {
    "cache-control": "no-store",
    "content-security-policy": "default-src 'none'; style-src 'unsafe-inline'; "
    "img-src 'self' data:; form-action 'self'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}


def page(template: str, title: str, session: Session | None, status: int = 200,
         **context: object) -> HTMLResponse:  # fmt: skip
    body = render(template, title=title, session=session, **context)
    return HTMLResponse(body, status_code=status, headers=HEADERS)


def refused(session: Session, title: str, message: str, status: int) -> HTMLResponse:
    return page("message.html", title, session, status, message=message, error=True,
                hook_failures=[], written=None, back_href="/ui",
                back_label="Back to the versions")  # fmt: skip


class Sessions:
    """Signed-in browsers: a random id (the cookie) → :class:`Session`, kept in memory."""

    def __init__(self) -> None:
        self.by_id: dict[str, Session] = {}

    def of(self, request: Request) -> Session | None:
        sid = request.cookies.get(COOKIE, "")
        found = self.by_id.get(sid)
        if found is None or found.expires < time.time():
            self.by_id.pop(sid, None)
            return None
        return found

    def open(self, admin: bool, actor: str) -> str:
        """A new session for ``actor`` (already :func:`daemon.auth.operator_name`)."""
        now = time.time()
        for old in [k for k, s in self.by_id.items() if s.expires < now]:
            self.by_id.pop(old, None)
        sid = secrets.token_urlsafe(32)
        self.by_id[sid] = Session(admin, actor, secrets.token_urlsafe(24), now + SESSION_S)
        return sid


def login_page(message: str = "", status: int = 200) -> HTMLResponse:
    """The sign-in form, with a fresh sign-in CSRF token in a cookie and in the form (a
    cross-site form cannot read the cookie, so it cannot sign a browser in to its session)."""
    nonce = secrets.token_urlsafe(24)
    response = page("login.html", "Sign in", None, status, message=message, nonce=nonce)
    response.set_cookie(LOGIN_COOKIE, nonce, max_age=900, path="/ui/login", httponly=True,
                        samesite="strict")  # fmt: skip
    return response


async def form(request: Request) -> dict[str, str]:
    body = (await request.body()).decode("utf-8", "replace")
    return {k: v[-1] for k, v in parse_qs(body, keep_blank_values=True).items()}


class Console:
    """The console's routes over ``ops``; :func:`mount_console` adds them to the admin app."""

    def __init__(self, ops: Operations, tokens: Tokens) -> None:
        self.ops, self.tokens, self.sessions = ops, tokens, Sessions()

    def router(self) -> APIRouter:
        router = APIRouter(
            prefix="/ui", include_in_schema=False, default_response_class=HTMLResponse
        )
        router.add_api_route("", self.overview_page, methods=["GET"])
        router.add_api_route("/versions/{version}", self.version_page, methods=["GET"])
        router.add_api_route("/runs", self.runs_page, methods=["GET"])
        router.add_api_route("/audit", self.audit_page, methods=["GET"])
        router.add_api_route("/login", self.login, methods=["POST"])
        router.add_api_route("/logout", self.logout, methods=["POST"])
        router.add_api_route("/actions/{action}", self.act, methods=["POST"])
        return router

    def overview_page(self, request: Request) -> Response:
        session = self.sessions.of(request)
        if session is None:
            return login_page()
        return page("overview.html", "Overview", session, view=overview(self.ops, session))

    def version_page(self, version: str, request: Request) -> Response:
        session = self.sessions.of(request)
        if session is None:
            return login_page()
        try:
            view = version_view(self.ops, session, version)
        except VersionNotFound as e:
            return refused(session, "No such version", str(e), 404)
        return page("version.html", f"Version {version}", session, view=view)

    def runs_page(self, request: Request) -> Response:
        session = self.sessions.of(request)
        if session is None:
            return login_page()
        return page("runs.html", "Refresh runs", session, runs=self.ops.runs(200))

    def audit_page(self, request: Request) -> Response:
        session = self.sessions.of(request)
        if session is None:
            return login_page()
        entries = list(reversed(self.ops.audit(limit=500)))
        return page("audit.html", "Audit log", session, entries=entries)

    async def login(self, request: Request) -> Response:
        fields = await form(request)
        nonce = request.cookies.get(LOGIN_COOKIE, "")
        if not nonce or not hmac.compare_digest(fields.get("login_csrf", ""), nonce):
            return login_page("The sign-in form did not come from this page; try again.", 403)
        try:
            actor = operator_name(fields.get("actor", ""))
        except ReservedName as e:
            return login_page(f"Your name: {e}.", status=400)
        client = request.client.host if request.client else "unknown"
        try:
            found = self.tokens.identify(fields.get("token", ""), client=client, surface="console")
        except TooManyFailures as e:
            return login_page(f"Too many failed sign-ins from here: {e}.", status=429)
        if found is None:
            return login_page("That token is not valid here.", status=403)
        access, own = found  # an operator's own token names them, whatever the form says
        sid = self.sessions.open(access == "admin", own or actor)
        response = RedirectResponse("/ui", status_code=303)
        response.set_cookie(
            COOKIE, sid, max_age=SESSION_S, path="/ui", httponly=True, samesite="strict",
            secure=request.url.scheme == "https",
        )  # fmt: skip
        return response

    async def logout(self, request: Request) -> Response:
        session, fields = self.sessions.of(request), await form(request)
        if session is None:
            return login_page()
        if not hmac.compare_digest(fields.get("csrf", ""), session.csrf):
            return refused(session, "Refused", "The form did not come from this session.", 403)
        self.sessions.by_id.pop(request.cookies.get(COOKIE, ""), None)
        response = RedirectResponse("/ui", status_code=303)
        response.delete_cookie(COOKIE, path="/ui")
        return response

    async def act(self, action: str, request: Request) -> Response:
        session = self.sessions.of(request)
        if session is None:
            return login_page("Your session ended; sign in again.", status=401)
        fields = await form(request)
        if not session.admin:
            return refused(
                session, "Not allowed", "The read-only token cannot change anything.", 403
            )
        if not hmac.compare_digest(fields.get("csrf", ""), session.csrf):
            return refused(session, "Refused", "The form did not come from this session.", 403)
        return perform(self.ops, session, action, fields)


def mount_console(app: FastAPI, ops: Operations, *, tokens: Tokens) -> None:
    app.include_router(Console(ops, tokens).router())


def perform(ops: Operations, session: Session, action: str, fields: dict[str, str]) -> Response:
    """An admin's action from a form of this session; refused if the registry changed since the
    form's page was rendered (``revision``)."""
    revision, reason = fields.get("revision"), fields.get("reason", "").strip()[:1000]
    force, version = fields.get("force") == "1", fields.get("version", "")
    before = ops.revision()
    try:
        if action == "promote":
            passed = ops.adapter(version).manifest.gate_passed
            if (force or not passed) and not reason:
                return refused(session, "Refused", "Overriding the gate needs a reason.", 400)
            message = f"{version} is active."
            failures = ops.promote(version, actor=session.actor, force=force,
                                   reason=reason or "operator promotion",
                                   expect_revision=revision)  # fmt: skip
        elif action == "rollback":
            to, failures = ops.rollback(
                actor=session.actor, reason=reason or "operator rollback",
                to=fields.get("to") or None, force=force, expect_revision=revision,
            )  # fmt: skip
            message = f"rolled back; {to} is active."
        elif action == "reject":
            ops.reject(version, actor=session.actor, reason=reason or "operator request",
                       expect_revision=revision)  # fmt: skip
            message, failures = f"{version} is rejected.", []
        elif action == "canary":
            change = fields.get("change", "")
            if change not in {"start", "widen", "promote", "abort"}:
                return refused(session, "Unknown action", f"canary {change}", 404)
            try:
                fraction = float(fields["fraction"]) if fields.get("fraction") else None
            except ValueError:
                return refused(session, "Refused", "The share is a number between 0 and 1.", 400)
            changed = ops.change_canary(
                change, actor=session.actor, reason=reason or f"operator canary {change}",  # type: ignore[arg-type]
                version=version or None, fraction=fraction, expect_revision=revision,
            )  # fmt: skip
            failures = changed.serving_hook_failures
            message = (f"canary {changed.version}: {change} done; "
                       + (f"{changed.canary.fraction:.0%} of conversations" if changed.canary
                          else "the stable adapter answers every conversation"))  # fmt: skip
        elif action == "refresh":
            accepted, message = ops.request_refresh(session.actor, full=fields.get("full") == "1")
            if not accepted:
                return refused(session, "Refused", message, 409)
            return page("message.html", "Refresh requested", session, message=message,
                        error=False, hook_failures=[], written=None, back_href="/ui/runs",
                        back_label="Follow it in the runs")  # fmt: skip
        else:
            return refused(session, "Unknown action", action, 404)
    except VersionNotFound as e:
        return refused(session, "Refused", str(e), 404)
    except RegistryError as e:
        return refused(session, "Refused", str(e), 409)
    written = [json.dumps(e.model_dump(exclude_none=True), sort_keys=True)
               for e in ops.audit_since(before)]  # fmt: skip
    return page("message.html", "Done", session, message=message, error=False,
                hook_failures=failures, written=written, back_href="/ui",
                back_label="Back to the versions")  # fmt: skip
