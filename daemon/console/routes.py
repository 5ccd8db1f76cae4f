"""The operator console: ``/ui`` on the admin port, server-rendered HTML.

What an operator decides from: the versions with their states and lineage, a version's gate
checks, training curves, its greedy replies next to the active adapter's on the same held-out
prompts (differences highlighted, unsupported specifics flagged), its production feedback, the
runs, the audit log and KL over time. And the runbook's actions: promote (``force`` with a
reason when the gate rejected it), roll back, reject, refresh.

Every page is plain HTML with inline CSS and SVG drawn here: no script, no CDN, no network
fetch, readable at laptop and tablet widths. Signing in takes the admin or the read-only token
once per browser session (a form POST; the token is never in a URL or a log line): the server
keeps a random session id in an ``HttpOnly``, ``SameSite=Strict`` cookie scoped to ``/ui``.
Read-only sessions see everything and change nothing. Every action form carries the session's
CSRF token and the registry revision the page was rendered at: if the registry changed since
(another operator, the gate, the regression watch), the action is refused and says so. An
action's result page shows the audit entry it wrote, exactly as the CLI would have.
"""

from __future__ import annotations

import hmac
import json
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from daemon.auth import Tokens, TooManyFailures
from daemon.html import (
    CSS,
    FAIL,
    PASS,
    esc,
    facts,
    fmt,
    short,
    state_badge,
    svg_lines,
    table,
    word_diff,
)
from daemon.records import RunStatus
from daemon.registry import Registry, RegistryError, VersionNotFound
from feedback.production import AdapterFeedback
from trainer.results import RunResult
from trainer.spec import SpecError

COOKIE = "alignd_console"
LOGIN_COOKIE = "alignd_console_login"  # the sign-in form's CSRF token
SESSION_S = 8 * 3600


class ConsoleBackend(Protocol):
    """What the console reads and does; :class:`daemon.service.Service` implements it."""

    registry: Registry

    def status(self) -> dict[str, Any]: ...
    def adapters(self) -> list[dict[str, Any]]: ...
    def run(self, run_id: str) -> RunStatus | None: ...
    def runs(self, limit: int) -> list[RunStatus]: ...
    def run_result(self, run_id: str) -> RunResult | None: ...
    def production_feedback(self, version: str | None, since: datetime) -> AdapterFeedback: ...
    def drift_history(self) -> list[dict[str, Any]]: ...
    def promote(
        self, version: str, *, actor: str, reason: str, force: bool, expect_revision: str | None
    ) -> list[str]: ...
    def rollback(
        self, *, actor: str, reason: str, to: str | None, force: bool, expect_revision: str | None
    ) -> tuple[str, list[str]]: ...
    def reject(
        self, version: str, *, actor: str, reason: str, expect_revision: str | None
    ) -> None: ...
    def request_refresh(self, actor: str, *, full: bool = False) -> tuple[bool, str]: ...


@dataclass
class Session:
    admin: bool
    actor: str
    csrf: str
    expires: float


def _actor(name: str) -> str:
    return "".join(c for c in name[:64] if c.isalnum() or c in "-_.@") or "operator"


# --- the page frame ---------------------------------------------------------------------------


def page(title: str, body: str, session: Session | None = None, status: int = 200) -> HTMLResponse:
    nav = ""
    if session is not None:
        role = "admin" if session.admin else "read-only"
        nav = (
            '<a href="/ui">Versions</a><a href="/ui/runs">Runs</a><a href="/ui/audit">Audit log</a>'
            f'<span class="who">{esc(session.actor)} ({role}) '
            '<form method="post" action="/ui/logout" style="display:inline">'
            f'<input type="hidden" name="csrf" value="{esc(session.csrf)}">'
            '<button type="submit">Sign out</button></form></span>'
        )
    document = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{esc(title)} · alignd</title><style>{CSS}</style></head><body>"
        f"<header><a href='/ui'>alignd</a>{nav}</header><main><h1>{esc(title)}</h1>{body}</main>"
        "</body></html>"
    )
    return HTMLResponse(
        document,
        status_code=status,
        headers={
            "cache-control": "no-store",
            "content-security-policy": "default-src 'none'; style-src 'unsafe-inline'; "
            "img-src 'self' data:; form-action 'self'; frame-ancestors 'none'",
            "x-content-type-options": "nosniff",
            "referrer-policy": "no-referrer",
        },
    )


# --- the routes ---------------------------------------------------------------------------------


def mount_console(  # noqa: C901 — the route table, like daemon.api.make_app's
    app: FastAPI, backend: ConsoleBackend, *, tokens: Tokens
) -> None:
    sessions: dict[str, Session] = {}

    def session_of(request: Request) -> Session | None:
        sid = request.cookies.get(COOKIE, "")
        found = sessions.get(sid)
        if found is None or found.expires < time.time():
            sessions.pop(sid, None)
            return None
        return found

    async def form(request: Request) -> dict[str, str]:
        body = (await request.body()).decode("utf-8", "replace")
        return {k: v[-1] for k, v in parse_qs(body, keep_blank_values=True).items()}

    def login_page(message: str = "", status: int = 200) -> HTMLResponse:
        """The sign-in form, with a fresh sign-in CSRF token in a cookie and in the form (a
        cross-site form cannot read the cookie, so it cannot sign a browser in to its session)."""
        error = f'<section class="error"><p>{esc(message)}</p></section>' if message else ""
        nonce = secrets.token_urlsafe(24)
        response = page(
            "Sign in",
            error + '<section><form method="post" action="/ui/login" class="inline">'
            f'<input type="hidden" name="login_csrf" value="{nonce}">'
            '<label>Token <input type="password" name="token" autocomplete="off" required></label>'
            '<label>Your name <input type="text" name="actor" maxlength="64" '
            'placeholder="for the audit log"></label><button type="submit">Sign in</button>'
            '</form><p class="note">The admin token can act; the read-only token can only read. '
            "The token is kept for this browser session only (a cookie naming a session on the "
            "server, never the token).</p></section>",
            status=status,
        )
        response.set_cookie(LOGIN_COOKIE, nonce, max_age=900, path="/ui/login", httponly=True,
                            samesite="strict")  # fmt: skip
        return response

    def refused(session: Session, title: str, message: str, status: int) -> HTMLResponse:
        return page(
            title,
            f'<section class="error"><p>{esc(message)}</p><p><a href="/ui">Back to the versions'
            "</a></p></section>",
            session,
            status=status,
        )

    def action_form(session: Session, action: str, fields: str, label: str, danger: bool = False,
                    ) -> str:  # fmt: skip
        if not session.admin:
            return ""
        revision = backend.registry.revision()
        button = f'<button type="submit"{" class=danger" if danger else ""}>{esc(label)}</button>'
        return (
            f'<form method="post" action="/ui/actions/{action}" class="inline">'
            f'<input type="hidden" name="csrf" value="{esc(session.csrf)}">'
            f'<input type="hidden" name="revision" value="{esc(revision)}">{fields}{button}</form>'
        )

    @app.get("/ui", response_class=HTMLResponse, include_in_schema=False)
    def overview(request: Request) -> Response:
        session = session_of(request)
        if session is None:
            return login_page()
        status = backend.status()
        versions = backend.adapters()
        registered_by = {
            e.get("version"): e.get("actor")
            for e in backend.registry.audit()
            if e.get("action") == "register"
        }
        datasets = {v: backend.registry.manifest(v).dataset_sha256 for v in
                    (a["version"] for a in versions)}  # fmt: skip
        rows = [
            [
                f'<a href="/ui/versions/{esc(v["version"])}">{esc(v["version"])}</a>',
                state_badge(v["state"]),
                esc(v.get("parent") or "—"),
                f"<code>{short(datasets.get(v['version']), 12)}</code>",
                esc(v.get("method")),
                esc(str(v.get("created_at") or "")[:19].replace("T", " ")),
                esc(registered_by.get(v["version"]) or "—"),
                fmt(v.get("heldout_accuracy")),
                fmt(v.get("drift"), 2),
                '<span class="pass">passed</span>' if v.get("gate_passed")
                else '<span class="fail">rejected</span>',
            ]
            for v in reversed(versions)
        ]  # fmt: skip
        watch = status.get("watch") or {}
        last_run = status.get("last_run") or {}
        consumer = status.get("consumer") or {}
        not_ready = f'<span class="fail">not ready</span> {esc(consumer.get("error"))}'
        summary = table(
            ["active", "consumer", "last refresh", "regression watch"],
            [[
                esc(status.get("active_adapter") or "none (the SFT model)"),
                "ready" if consumer.get("ready") else not_ready,
                f'{esc(last_run.get("outcome") or "—")} {esc(last_run.get("reason") or "")}',
                f'{esc(watch.get("status") or "—")} {esc(watch.get("reason") or "")}',
            ]],
        )  # fmt: skip
        kl_points = [
            (float(i + 1), float(v["drift"]))
            for i, v in enumerate(versions)
            if isinstance(v.get("drift"), int | float)
        ]
        drift = [(i + 1.0, float(d["kl"])) for i, d in enumerate(backend.drift_history()[-200:])]
        actions = action_form(
            session,
            "rollback",
            '<input type="text" name="reason" placeholder="reason" required maxlength="1000">'
            '<input type="text" name="to" placeholder="to version (optional)" maxlength="16">'
            '<label><input type="checkbox" name="force" value="1"> allow a rejected one</label>',
            "Roll back",
            danger=True,
        ) + action_form(
            session,
            "refresh",
            '<label><input type="checkbox" name="full" value="1"> full retrain</label>',
            "Refresh now",
        )
        body = (
            f"<section>{summary}{actions}</section>"
            f"<section><h2>Versions</h2>"
            + table(
                [
                    "version",
                    "state",
                    "parent",
                    "dataset",
                    "method",
                    "created (UTC)",
                    "by",
                    "held-out acc.",
                    "drift",
                    "gate",
                ],
                rows,
            )
            + "</section><div class='grid'><section><h2>Drift at evaluation "
            "(KL per retain reply)</h2>"
            + svg_lines({"drift": kl_points}, x_label="version number", y_label="nats")
            + "</section><section><h2>Drift of the active adapter (probe)</h2>"
            + svg_lines({"drift probe": drift}, x_label="probe", y_label="nats")
            + "</section></div>"
        )
        return page("Overview", body, session)

    @app.get("/ui/versions/{version}", response_class=HTMLResponse, include_in_schema=False)
    def version_page(version: str, request: Request) -> Response:
        session = session_of(request)
        if session is None:
            return login_page()
        try:
            info = backend.registry.show(version)
        except VersionNotFound as e:
            return refused(session, "No such version", str(e), 404)
        manifest = info.manifest
        audit = [e for e in backend.registry.audit() if e.get("version") == version]
        registered_by = next((e.get("actor") for e in audit if e.get("action") == "register"), "")
        lineage = facts({
            "state": state_badge(info.state),
            "parent": esc(manifest.parent or "— (the SFT model)"),
            "dataset sha256": f"<code>{short(manifest.dataset_sha256)}</code>",
            "method": esc(manifest.method or "—"),
            "created (UTC)": esc(str(info.created_at)[:19].replace("T", " ")),
            "registered by": esc(registered_by or "—"),
            "run": esc(manifest.run_id or "—"),
            "training data": esc(manifest.training_data.mode if manifest.training_data else "—"),
        })  # fmt: skip
        checks = table(
            ["check", "result", "value", "threshold", "detail"],
            [[esc(c.name), PASS if c.passed else FAIL, fmt(c.value, 4), fmt(c.threshold, 4),
              esc(c.detail)] for c in (manifest.gate.checks if manifest.gate else [])],
        )  # fmt: skip
        result = backend.run_result(manifest.run_id or "")
        curves, replies = _curves(result), _replies(result, manifest.parent)
        since = datetime.now(UTC) - timedelta(days=7)
        feedback = backend.production_feedback(version, since)
        production = table(
            ["replies agents handled", "edit rate", "edit size", "ratings", "thumbs-down rate"],
            [[fmt(feedback.handled), fmt(feedback.edit_rate), fmt(feedback.edit_size),
              fmt(feedback.rated), fmt(feedback.thumbs_down_rate)]],
        )  # fmt: skip
        actions = ""
        if info.state in {"candidate", "rejected", "retired"}:
            needs_force = not manifest.gate_passed or info.state == "rejected"
            force = (
                '<label><input type="checkbox" name="force" value="1" required> override the '
                "gate (it rejected this version)</label>"
                if needs_force
                else ""
            )
            actions += action_form(
                session,
                "promote",
                f'<input type="hidden" name="version" value="{esc(version)}">'
                '<input type="text" name="reason" placeholder="reason" maxlength="1000"'
                f"{' required' if needs_force else ''}>{force}",
                f"Promote {version}",
            )
        if info.state in {"candidate", "retired"}:
            actions += action_form(
                session,
                "reject",
                f'<input type="hidden" name="version" value="{esc(version)}">'
                '<input type="text" name="reason" placeholder="reason" required maxlength="1000">',
                f"Reject {version}",
                danger=True,
            )
        gate_line = (
            '<p class="pass">The gate passed it.</p>'
            if manifest.gate_passed
            else '<p class="fail">The gate rejected it: '
            + esc("; ".join(manifest.gate.reasons if manifest.gate else []))
            + "</p>"
        )
        body = (
            f"<section>{lineage}{actions}</section>"
            f"<section><h2>Gate checks</h2>{gate_line}{checks}</section>"
            f"<div class='grid'><section><h2>Training curves</h2>{curves}</section>"
            f"<section><h2>Production feedback (last 7 days)</h2>{production}"
            '<p class="note">From events whose served_adapter names this version.</p></section>'
            f"</div><section><h2>Replies on held-out prompts</h2>{replies}</section>"
            "<section><h2>Audit entries</h2>"
            + table(
                ["at", "action", "actor", "reason"],
                [
                    [
                        esc(e.get("at")),
                        esc(e.get("action")),
                        esc(e.get("actor")),
                        esc(e.get("reason")),
                    ]
                    for e in audit
                ],
            )
            + "</section>"
        )
        return page(f"Version {version}", body, session)

    @app.get("/ui/runs", response_class=HTMLResponse, include_in_schema=False)
    def runs_page(request: Request) -> Response:
        session = session_of(request)
        if session is None:
            return login_page()
        rows = [
            [esc(r.run_id), esc(r.started_at[:19].replace("T", " ")), esc(r.trigger),
             esc(r.outcome),
             f'<a href="/ui/versions/{esc(r.version)}">{esc(r.version)}</a>' if r.version else "—",
             esc(r.training_data.mode if r.training_data else None), esc(r.reason)]
            for r in backend.runs(200)
        ]  # fmt: skip
        body = (
            "<section>"
            + table(
                ["run", "started (UTC)", "trigger", "outcome", "version", "data", "reason"], rows
            )
            + "</section>"
        )
        return page("Refresh runs", body, session)

    @app.get("/ui/audit", response_class=HTMLResponse, include_in_schema=False)
    def audit_page(request: Request) -> Response:
        session = session_of(request)
        if session is None:
            return login_page()
        entries = list(backend.registry.audit())[-500:]
        rows = [
            [esc(e.get("at")), esc(e.get("action")), esc(e.get("version")), esc(e.get("actor")),
             esc(e.get("reason"))]
            for e in reversed(entries)
        ]  # fmt: skip
        body = "<section>" + table(["at", "action", "version", "actor", "reason"], rows)
        return page("Audit log", body + "</section>", session)

    @app.post("/ui/login", response_class=HTMLResponse, include_in_schema=False)
    async def login(request: Request) -> Response:
        fields = await form(request)
        nonce = request.cookies.get(LOGIN_COOKIE, "")
        if not nonce or not hmac.compare_digest(fields.get("login_csrf", ""), nonce):
            return login_page("The sign-in form did not come from this page; try again.", 403)
        client = request.client.host if request.client else "unknown"
        try:
            access = tokens.scope(fields.get("token", ""), client=client, surface="console")
        except TooManyFailures as e:
            return login_page(f"Too many failed sign-ins from here: {e}.", status=429)
        if access is None:
            return login_page("That token is not valid here.", status=403)
        sid = secrets.token_urlsafe(32)
        for old in [k for k, s in sessions.items() if s.expires < time.time()]:
            sessions.pop(old, None)
        sessions[sid] = Session(
            access == "admin", _actor(fields.get("actor", "")), secrets.token_urlsafe(24),
            time.time() + SESSION_S,
        )  # fmt: skip
        response = RedirectResponse("/ui", status_code=303)
        response.set_cookie(
            COOKIE, sid, max_age=SESSION_S, path="/ui", httponly=True, samesite="strict",
            secure=request.url.scheme == "https",
        )  # fmt: skip
        return response

    @app.post("/ui/logout", include_in_schema=False)
    async def logout(request: Request) -> Response:
        session, fields = session_of(request), await form(request)
        if session is None:
            return login_page()
        if not hmac.compare_digest(fields.get("csrf", ""), session.csrf):
            return refused(session, "Refused", "The form did not come from this session.", 403)
        sessions.pop(request.cookies.get(COOKIE, ""), None)
        response = RedirectResponse("/ui", status_code=303)
        response.delete_cookie(COOKIE, path="/ui")
        return response

    @app.post("/ui/actions/{action}", response_class=HTMLResponse, include_in_schema=False)
    async def act(action: str, request: Request) -> Response:
        session = session_of(request)
        if session is None:
            return login_page("Your session ended; sign in again.", status=401)
        fields = await form(request)
        if not session.admin:
            return refused(
                session, "Not allowed", "The read-only token cannot change anything.", 403
            )
        if not hmac.compare_digest(fields.get("csrf", ""), session.csrf):
            return refused(session, "Refused", "The form did not come from this session.", 403)
        revision, reason = fields.get("revision"), fields.get("reason", "").strip()[:1000]
        force = fields.get("force") == "1"
        version = fields.get("version", "")
        before = backend.registry.revision()
        try:
            if action == "promote":
                passed = backend.registry.manifest(version).gate_passed
                if (force or not passed) and not reason:
                    return refused(session, "Refused", "Overriding the gate needs a reason.", 400)
                message = f"{version} is active"
                failures = backend.promote(version, actor=session.actor, reason=reason or
                                           "operator promotion", force=force,
                                           expect_revision=revision)  # fmt: skip
            elif action == "rollback":
                to, failures = backend.rollback(
                    actor=session.actor, reason=reason or "operator rollback",
                    to=fields.get("to") or None, force=force, expect_revision=revision,
                )  # fmt: skip
                message = f"rolled back; {to} is active"
            elif action == "reject":
                backend.reject(version, actor=session.actor, reason=reason or "operator request",
                               expect_revision=revision)  # fmt: skip
                message, failures = f"{version} is rejected", []
            elif action == "refresh":
                accepted, message = backend.request_refresh(
                    session.actor, full=fields.get("full") == "1"
                )
                if not accepted:
                    return refused(session, "Refused", message, 409)
                return page("Refresh requested", f"<section><p>{esc(message)}</p>"
                            '<p><a href="/ui/runs">Follow it in the runs</a></p></section>',
                            session)  # fmt: skip
            else:
                return refused(session, "Unknown action", action, 404)
        except VersionNotFound as e:
            return refused(session, "Refused", str(e), 404)
        except RegistryError as e:
            return refused(session, "Refused", str(e), 409)
        written = _entries_since(backend.registry, before)
        hooks = (
            f'<p class="fail">Serving hooks failed: {esc("; ".join(failures))}</p>'
            if failures
            else ""
        )
        body = (
            f"<section><p>{esc(message)}.</p>{hooks}<h2>Audit entry written</h2><pre>"
            + esc("\n".join(json.dumps(e, sort_keys=True) for e in written))
            + '</pre><p><a href="/ui">Back to the versions</a></p></section>'
        )
        return page("Done", body, session)


def _entries_since(registry: Registry, revision: str) -> list[dict[str, Any]]:
    """The audit entries appended after ``revision`` (a byte offset into the log)."""
    try:
        with registry.audit_path.open() as f:
            f.seek(int(revision))
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError):
        return []


def _curves(result: RunResult | None) -> str:
    if result is None or not result.steps:
        return '<p class="note">The run directory no longer holds this run (retention).</p>'

    def series(key: str) -> list[tuple[float, float]]:
        values = [(s.step, getattr(s, key)) for s in result.steps]
        return [(float(step), float(value)) for step, value in values if value is not None]

    return svg_lines({"loss": series("loss")}, x_label="step", y_label="loss") + svg_lines(
        {"reward accuracy": series("reward_accuracy"), "reward margin": series("reward_margin")},
        x_label="step",
        y_label="rewards",
    )


def _replies(result: RunResult | None, parent: str | None) -> str:
    """The candidate's greedy replies next to the adapter it was measured against (the active
    one at the time, else the SFT model), with word differences and unsupported specifics."""
    if result is None:
        return '<p class="note">The replies were removed with the run directory (retention).</p>'
    candidate = result.eval.candidate.generation
    incumbent = result.eval.incumbent.generation if result.eval.incumbent else None
    other = incumbent if incumbent and incumbent.replies else result.eval.reference.generation
    other_name = (
        f"{parent or 'the active adapter'} (active when this one was evaluated)"
        if other is incumbent
        else "the SFT model"
    )
    if candidate is None or other is None or not candidate.replies:
        return '<p class="note">This run generated no replies (eval.generate_max_prompts).</p>'
    blocks = []
    for i, (after, before) in enumerate(zip(candidate.replies, other.replies, strict=False)):
        left, right = word_diff(before, after)
        prompt = candidate.prompts[i] if i < len(candidate.prompts) else []
        asked = next(
            (m.get("content", "") for m in reversed(prompt) if isinstance(m, dict)
             and m.get("role") == "user"), "",
        )  # fmt: skip

        def flags(report: Any, index: int) -> str:
            found = report.unsupported[index] if index < len(report.unsupported) else []
            return (
                '<div class="flag">⚠ states what the conversation lacks: '
                + esc(", ".join(found))
                + "</div>"
                if found
                else ""
            )

        blocks.append(
            f'<div class="note">customer: {esc(asked[:300])}</div><div class="pair">'
            f'<div><div class="note">{esc(other_name)}</div><div class="reply">{left}</div>'
            f"{flags(other, i)}</div><div><div class='note'>this version</div>"
            f'<div class="reply">{right}</div>{flags(candidate, i)}</div></div>'
        )
    return "".join(blocks)


def load_result(path: Path) -> RunResult | None:
    try:
        return RunResult.load(path)
    except (SpecError, OSError):
        return None
