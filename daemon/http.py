"""The admin port's HTTP protocol: uvicorn's h11 protocol with a deadline on each request head.

uvicorn counts every open connection against ``limit_concurrency`` and starts no timer before a
connection's first request, so connections that send nothing held the port: 63 of them made
every request, ``/healthz`` included, answer 503 for as long as they stayed open, and the
kubelet would restart the pod and kill a running trainer. Here a connection has
``admin.request_head_timeout_s`` from opening (and from each response) to deliver a complete
request head, or it is closed; uvicorn's keep-alive timer still closes idle keep-alive
connections sooner.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol


def with_head_deadline(timeout_s: float) -> type[H11Protocol]:
    """The protocol class for ``uvicorn.Config(http=...)``."""

    class HeadDeadlineProtocol(H11Protocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._heads = 0  # request heads received on this connection
            self._last_cycle: object | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.cycle is not None and self.cycle is not self._last_cycle:
                self._last_cycle, self._heads = self.cycle, self._heads + 1

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()  # the next request's head has its own deadline

        def _arm(self) -> None:
            self.loop.call_later(timeout_s, self._expire, self._heads)

        def _expire(self, heads_then: int) -> None:
            if self._heads == heads_then and not self.transport.is_closing():
                self.transport.close()  # no request head since the deadline was armed

    return HeadDeadlineProtocol
