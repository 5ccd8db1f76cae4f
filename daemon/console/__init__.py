"""The operator console: ``/ui`` on the admin port, server-rendered HTML.

What an operator decides from: the versions with their states and lineage, a version's gate
checks, training curves, its greedy replies next to the active adapter's on the same held-out
prompts (differences highlighted, unsupported specifics flagged), its production feedback, the
runs, the audit log and KL over time. And the runbook's actions: promote (``force`` with a
reason when the gate rejected it), roll back, reject, refresh.

The package: :mod:`~daemon.console.routes` (sign-in, sessions, the pages and the actions),
:mod:`~daemon.console.views` (what each page shows, read through
:class:`daemon.operations.Operations` alone: the same interface as the admin API, no registry
access), :mod:`~daemon.console.render` and ``templates/`` (Jinja2, autoescape on).

Every page is plain HTML with inline CSS and SVG: no script, no CDN, no network fetch, readable
at laptop and tablet widths. Signing in takes the admin or the read-only token once per browser
session (a form POST with its own CSRF token; the token is never in a URL or a log line, and is
checked by :class:`daemon.auth.Tokens` like the API's): the server keeps a random session id in
an ``HttpOnly``, ``SameSite=Strict`` cookie scoped to ``/ui``. Read-only sessions see everything
and change nothing. Every action form carries the session's CSRF token and the registry revision
the page was rendered at: if the registry changed since (another operator, the gate, the
regression watch), the action is refused and says so. An action's result page shows the audit
entry it wrote, exactly as the CLI would have.
"""

from daemon.console.routes import mount_console

__all__ = ["mount_console"]
