"""The admin port's HTTP protocol: uvicorn's h11 protocol that idle sockets cannot exhaust.

uvicorn counts every open connection against ``limit_concurrency`` and starts no timer before a
connection's first request, so connections that send nothing held the port: 63 of them made
every request, ``/healthz`` included, answer 503 for as long as they stayed open, and the
kubelet would restart the pod and kill a running trainer. Here:

- a connection has ``admin.request_head_timeout_s`` from opening (and from each response) to
  deliver a complete request head, or it is closed (uvicorn's keep-alive timer still closes idle
  keep-alive connections sooner);
- when a new connection fills the port (``admin.max_connections``), the oldest connections
  without a request in progress (silent, half-sent, or idle between requests) are closed to make
  room, so a probe or an operator always gets in: a flood of idle sockets evicts itself.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a request-head deadline and room made for new connections."""

    head_timeout_s = 10.0  # set per server by :func:`with_head_deadline`

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._heads = 0  # request heads received on this connection
        self._last_cycle: object | None = None
        self._opened = time.monotonic()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._opened = time.monotonic()
        super().connection_made(transport)
        self._arm()
        self._make_room()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.cycle is not None and self.cycle is not self._last_cycle:
            self._last_cycle, self._heads = self.cycle, self._heads + 1

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()  # the next request's head has its own deadline

    def _arm(self) -> None:
        self.loop.call_later(self.head_timeout_s, self._expire, self._heads)

    def _expire(self, heads_then: int) -> None:
        if self._heads == heads_then and not self.transport.is_closing():
            self.transport.close()  # no request head since the deadline was armed

    def _waiting(self) -> bool:
        """No request in progress: nothing received yet, half a head, or between requests."""
        return self.cycle is None or self.cycle.response_complete

    def _make_room(self) -> None:
        limit = self.limit_concurrency
        excess = len(self.connections) - (limit - 1) if limit else 0
        if excess <= 0:
            return
        others = [
            c for c in self.connections if c is not self and isinstance(c, GuardedH11Protocol)
        ]
        idle = sorted((c for c in others if c._waiting()), key=lambda c: c._opened)
        for connection in idle[:excess]:
            connection.transport.close()


def with_head_deadline(timeout_s: float) -> type[H11Protocol]:
    """The protocol class for ``uvicorn.Config(http=...)``, its head deadline ``timeout_s``."""
    return type("AdminH11Protocol", (GuardedH11Protocol,), {"head_timeout_s": timeout_s})
