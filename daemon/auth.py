"""Who may do what on the admin port: the one check the API and the console share.

Two tokens: the admin token (read and change) and the read-only token (read). A presented token
is compared with both in constant time (both comparisons always run, so the time taken does not
say which one was close). A wrong token is counted (``alignd_auth_failures_total{surface}``),
logged with the client's address and never the token, and rate-limited per client: after
``max_failures`` wrong tokens within ``window_s``, that client is refused (429) until the window
has passed, the right token included, so guessing runs at a few tries a minute, not a thousand a
second.

Who an operator is: a token of their own (``admin.operator_tokens``: a name per token) makes
the audit log's ``actor`` that name, whatever the caller says. With the shared admin token the
actor is the name given (the CLI sends ``$USER``, the console asks at sign-in), cleaned by
:func:`operator_name`; names beginning with ``alignd`` are the daemon's own (``alignd-gate``,
``alignd-watch``, ``alignd-startup``) and are refused either way, so no one can write an entry
that reads as the gate's or the watch's.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Literal

log = logging.getLogger("alignd.auth")

Access = Literal["admin", "read"]
RESERVED_PREFIX = "alignd"  # the daemon's own actors in the audit log


class ReservedName(ValueError):
    """An operator gave a name the daemon's own audit entries use."""


def operator_name(given: str) -> str:
    """``given`` for the audit log: letters, digits and ``-_.@`` (at most 64), else
    "operator"; :class:`ReservedName` for a name the daemon's own entries use."""
    name = "".join(c for c in given[:64] if c.isalnum() or c in "-_.@") or "operator"
    if name.lower().startswith(RESERVED_PREFIX):
        raise ReservedName(
            f"{name!r}: names beginning with {RESERVED_PREFIX!r} are the daemon's own in the "
            "audit log (the gate, the watch); give your own"
        )
    return name


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode()).digest()


class TooManyFailures(Exception):
    """This client presented too many wrong tokens lately; ``retry_after_s`` until it may again."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__(f"too many failed attempts; retry in {retry_after_s:.0f} s")
        self.retry_after_s = retry_after_s


class Tokens:
    def __init__(
        self,
        token: str | None,
        read_token: str | None,
        *,
        operators: dict[str, str] | None = None,
        on_failure: Callable[[str], None] = lambda surface: None,
        max_failures: int = 10,
        window_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._admin = _digest(token) if token else None
        self._read = _digest(read_token) if read_token else None
        self._operators = {name: _digest(t) for name, t in (operators or {}).items()}
        self.on_failure, self.max_failures, self.window_s = on_failure, max_failures, window_s
        self.clock = clock
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    @property
    def admin_configured(self) -> bool:
        return self._admin is not None or bool(self._operators)

    def scope(self, presented: str, *, client: str, surface: str) -> Access | None:
        """``admin``, ``read``, or None (counted, logged, rate-limited); raises
        :class:`TooManyFailures` while ``client`` is locked out."""
        found = self.identify(presented, client=client, surface=surface)
        return found[0] if found else None

    def identify(
        self, presented: str, *, client: str, surface: str
    ) -> tuple[Access, str | None] | None:
        """What ``presented`` may do and, for an operator's own token, whose it is (None for
        the shared tokens); None for a wrong token (counted, logged, rate-limited). Every token
        is compared, in constant time, whichever matches."""
        self._check_lockout(client)
        digest = _digest(presented)
        ok_admin = self._admin is not None and hmac.compare_digest(digest, self._admin)
        ok_read = self._read is not None and hmac.compare_digest(digest, self._read)
        named = [n for n, d in self._operators.items() if hmac.compare_digest(digest, d)]
        if named:
            return "admin", named[0]
        if ok_admin:
            return "admin", None
        if ok_read:
            return "read", None
        self._failed(client, surface)
        return None

    def _check_lockout(self, client: str) -> None:
        now = self.clock()
        with self._lock:
            recent = self._failures.get(client)
            while recent and recent[0] <= now - self.window_s:
                recent.popleft()
            if recent is not None and not recent:
                del self._failures[client]
            elif recent is not None and len(recent) >= self.max_failures:
                raise TooManyFailures(recent[0] + self.window_s - now)

    def _failed(self, client: str, surface: str) -> None:
        with self._lock:
            if len(self._failures) > 10_000:  # bounded: forget the oldest clients
                self._failures.pop(next(iter(self._failures)))
            self._failures.setdefault(client, deque()).append(self.clock())
        self.on_failure(surface)
        log.warning("%s: a wrong token from %s", surface, client)
