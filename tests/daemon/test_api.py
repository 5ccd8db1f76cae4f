"""Admin API: authentication, body limits, path safety, and the token staying secret."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from registry_support import make_adapter

from daemon.config import AligndConfig
from daemon.service import Service

TOKEN = "s3cret-admin-token-value"
READ_TOKEN = "read-only-token-value-0123"
AUTH = {"authorization": f"Bearer {TOKEN}"}
READS = ["/v1/status", "/v1/adapters", "/v1/adapters/v0001", "/v1/runs/r-1"]
MUTATING = [
    ("POST", "/v1/adapters/v0001/promote"),
    ("POST", "/v1/adapters/v0001/reject"),
    ("POST", "/v1/rollback"),
    ("POST", "/v1/refresh"),
]


@pytest.fixture()
def service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Service:
    monkeypatch.setenv("ALIGND_ADMIN__TOKEN", TOKEN)
    monkeypatch.setenv("ALIGND_ADMIN__READ_TOKEN", READ_TOKEN)
    config = AligndConfig(
        paths={"data_dir": tmp_path / "data"},
        store={"url": f"sqlite:///{tmp_path / 'f.db'}"},
        admin={"max_body_bytes": 1024},
    )
    svc = Service(config)
    yield svc
    svc.store.close()


@pytest.fixture()
def client(service: Service) -> TestClient:
    return TestClient(service.app())


@pytest.mark.parametrize(("method", "path"), MUTATING)
def test_mutating_endpoints_need_the_token(client: TestClient, method: str, path: str) -> None:
    assert client.request(method, path).status_code == 401
    assert client.request(method, path, headers={"authorization": "Basic abc"}).status_code == 401
    wrong_same_length = "x" * len(TOKEN)
    assert (
        client.request(
            method, path, headers={"authorization": f"Bearer {wrong_same_length}"}
        ).status_code
        == 403
    )
    assert (
        client.request(method, path, headers={"authorization": "Bearer short"}).status_code == 403
    )
    assert (
        client.request(method, path, headers={"authorization": f"Bearer {TOKEN}x"}).status_code
        == 403
    )


def test_no_configured_token_refuses_everyone(tmp_path: Path) -> None:
    svc = Service(
        AligndConfig(
            paths={"data_dir": tmp_path / "d"}, store={"url": f"sqlite:///{tmp_path / 'f.db'}"}
        )
    )
    client = TestClient(svc.app())
    assert (
        client.post("/v1/refresh", headers={"authorization": "Bearer anything"}).status_code == 403
    )
    svc.store.close()


def test_promote_and_rollback_with_the_token(
    client: TestClient, service: Service, tmp_path: Path
) -> None:
    auth = {"authorization": f"Bearer {TOKEN}", "x-alignd-actor": "alice"}
    for i in range(2):
        service.registry.register(
            make_adapter(tmp_path / f"a{i}", seed=i), {"gate": {"promote": True}}
        )
    assert (
        client.post(
            "/v1/adapters/v0001/promote", headers=auth, json={"reason": "first"}
        ).status_code
        == 200
    )
    assert client.post("/v1/adapters/v0002/promote", headers=auth).status_code == 200
    assert client.post("/v1/rollback", headers=auth).json()["active"] == "v0001"
    states = [a["state"] for a in client.get("/v1/adapters", headers=auth).json()]
    assert states == ["active", "retired"]
    audit = list(service.registry.audit())
    assert audit[-1]["actor"] == "alice" and audit[-1]["action"] == "rollback"


@pytest.mark.parametrize("version", ["..%2F..%2Fetc", "v0001..", "v00x1", "%2e%2e"])
def test_path_parameters_cannot_escape_the_registry(client: TestClient, version: str) -> None:
    auth = {"authorization": f"Bearer {TOKEN}"}
    assert client.get(f"/v1/adapters/{version}", headers=auth).status_code in {404, 422}
    assert client.post(f"/v1/adapters/{version}/promote", headers=auth).status_code in {404, 422}


def test_unknown_version_and_run_are_404(client: TestClient) -> None:
    assert client.get("/v1/adapters/v0042", headers=AUTH).status_code == 404
    assert client.get("/v1/runs/r-nope", headers=AUTH).status_code == 404
    assert client.get("/v1/runs/..%2Fstate", headers=AUTH).status_code == 404


def test_request_body_size_is_limited(client: TestClient) -> None:
    auth = {"authorization": f"Bearer {TOKEN}"}
    response = client.post(
        "/v1/rollback", headers=auth, content=b'{"reason": "' + b"x" * 5000 + b'"}'
    )
    assert response.status_code == 413


def test_chunked_body_is_bounded_before_authentication(client: TestClient) -> None:
    """No Content-Length, no token: the size limit answers, not the (later) auth check."""

    def chunks():  # type: ignore[no-untyped-def]
        for _ in range(64):
            yield b"x" * 256

    response = client.post("/v1/rollback", content=chunks())
    assert response.status_code == 413
    small = client.post("/v1/rollback", content=iter([b'{"reason": "ok"}']))
    assert small.status_code == 401  # within the limit: on to authentication


@pytest.mark.parametrize("path", READS)
def test_reads_under_v1_need_a_token(client: TestClient, path: str) -> None:
    assert client.get(path).status_code == 401
    assert client.get(path, headers={"authorization": "Bearer nope"}).status_code == 403
    for token in (TOKEN, READ_TOKEN):
        assert client.get(path, headers={"authorization": f"Bearer {token}"}).status_code in {
            200,
            404,
        }


@pytest.mark.parametrize(("method", "path"), MUTATING)
def test_the_read_token_cannot_change_anything(client: TestClient, method: str, path: str) -> None:
    read = {"authorization": f"Bearer {READ_TOKEN}"}
    assert client.request(method, path, headers=read).status_code == 403


def test_probes_and_metrics_stay_open(client: TestClient) -> None:
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code in {200, 503}
    assert client.get("/metrics").status_code == 200


def test_status_never_counts_the_whole_store(
    client: TestClient, service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/v1/status is cheap: the newest seq and the last tick's counts, no COUNT(*) per call."""

    def refuse(**_: object) -> int:
        raise AssertionError("status counted the store")

    monkeypatch.setattr(service.store, "count", refuse)
    monkeypatch.setattr(service.store, "counts_by_type", refuse)
    body = client.get("/v1/status", headers=AUTH).json()
    assert body["store"]["last_seq"] == 0 and body["store"]["error"] is None


def test_unknown_body_fields_are_rejected(client: TestClient) -> None:
    auth = {"authorization": f"Bearer {TOKEN}"}
    assert client.post("/v1/rollback", headers=auth, json={"too": "v0001"}).status_code == 422


def test_health_is_independent_of_kafka_and_readiness_is_not(client: TestClient) -> None:
    assert client.get("/healthz").status_code == 200
    ready = client.get("/readyz")
    assert ready.status_code == 503  # the consumer never connected (no broker in this test)
    assert any("consumer" in p for p in ready.json()["problems"])


def test_token_never_appears_in_logs_or_errors(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    bodies = [
        client.post("/v1/refresh", headers={"authorization": f"Bearer {TOKEN}-wrong"}).text,
        client.post(
            "/v1/adapters/v0009/promote", headers={"authorization": f"Bearer {TOKEN}"}
        ).text,
        client.get("/v1/status", headers=AUTH).text,
    ]
    assert all(TOKEN not in body for body in bodies)
    assert TOKEN not in caplog.text


def test_metrics_endpoint_exposes_alignd_metrics(client: TestClient) -> None:
    text = client.get("/metrics").text
    for name in (
        "alignd_events_consumed_total",
        "alignd_refresh_runs_total",
        "alignd_gate_decisions_total",
        "alignd_consumer_ready",
        "alignd_drift_retain_nats",
        "alignd_retain_drift_nats",
    ):
        assert name in text


@contextmanager
def small_admin_server(head_timeout_s: float, limit: int) -> Iterator[int]:
    """A real uvicorn server with the admin port's protocol and a tiny /healthz app."""
    import threading
    import time

    import uvicorn
    from fastapi import FastAPI

    from daemon.http import with_head_deadline
    from demo.broker import free_port

    app, port = FastAPI(), free_port()
    app.get("/healthz")(lambda: {"status": "ok"})
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error",
                                           limit_concurrency=limit,
                                           http=with_head_deadline(head_timeout_s)))  # fmt: skip
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(5)


def test_idle_sockets_cannot_starve_the_probes() -> None:
    """Issue #31, finding 3: connections that send nothing counted against limit_concurrency
    with no timer, so /healthz answered 503 for as long as they stayed open. 200 silent sockets
    and a half-sent request line on a port limited to 16: every probe still answers."""
    import socket
    import time

    import httpx

    with small_admin_server(head_timeout_s=60, limit=16) as port:
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(200)]
        half = socket.create_connection(("127.0.0.1", port))
        half.sendall(b"GET /healthz HTTP/1.1\r\nHost: alignd\r\n")  # never finished
        try:
            time.sleep(0.3)
            codes = []
            for _ in range(5):
                codes.append(httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code)
                time.sleep(0.1)
            assert codes == [200] * 5
        finally:
            for s in [*idle, half]:
                s.close()
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200


def test_a_silent_connection_is_closed_at_its_head_deadline() -> None:
    import socket
    import time

    with small_admin_server(head_timeout_s=1.0, limit=16) as port:
        quiet = socket.create_connection(("127.0.0.1", port))
        quiet.settimeout(5)
        started = time.monotonic()
        assert quiet.recv(1) == b""  # closed by the server...
        assert 0.8 < time.monotonic() - started < 3  # ...at its deadline
        quiet.close()
