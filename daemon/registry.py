"""The adapter registry: immutable versions, an active pointer, an append-only audit log.

Layout under ``root``::

    adapters/v0001/      adapter_config.json, adapter_model.safetensors, manifest.json
    active.json          {"version": "v0002", "history": ["v0001", "v0002"], "changed_at": ...}
    canary.json          {"version": "v0003", "fraction": 0.1, "started_at": ..., "changed_at": ...}
                         (absent: no canary; at most one beside the stable adapter)
    routing.json         which adapter name answers which share of conversations (daemon.routing)
    audit.jsonl          one JSON object per change: who, what, when, why
    current -> adapters/v0002   (serving hook: a symlink a model server can watch)

Every change is atomic: a version is assembled in ``adapters/.staging-*`` and renamed into
place; ``active.json`` is written to a temp file, fsynced and renamed; the audit log is
appended and fsynced. A crash at any moment leaves either the old state or the new one;
leftover staging directories are removed when the registry is opened.

Changes are serialised across threads (a lock) and processes (``flock`` on ``.lock``): the
state a promote or rollback checks is the state it changes. An activation is recorded in
``active.json`` as ``serving: pending`` before the serving hooks run and ``done`` once they
all succeeded; :meth:`Registry.replay_serving` runs the hooks again for a pending activation
(the daemon calls it at start-up and on every tick), so a crash between the two, or a model
server that was down, is repaired until serving agrees with the registry. The hooks run under
their own lock (``.serving-lock``, in activation order), never under the registry's: a hung
model server does not stop operators, the gate or the watch changing the registry, and an
outage is audited once, not on every retry. Each version's
manifest records its files' sha256 (``files``), checked before the version is activated.

A canary is loaded into the model servers (``canary_hooks``, under the serving lock) *before*
it is recorded, so the routing document never names an adapter no server has: a canary that
cannot be loaded is refused and the registry stays as it was.

Past 400 lines on purpose: every change of the registry (the stable pointer, the canary, the
routing document) and both of its locks in one file, so its atomicity argument (what is
written, under which lock, in which order) can be checked in one reading.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import struct
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from daemon.records import ManifestError, VersionManifest
from daemon.routing import routing_document
from feedback.base import file_sha256

log = logging.getLogger("alignd.registry")

VERSION_RE = re.compile(r"^v\d{4,}$")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# How long an operator's promote or rollback waits for serving (another activation's hooks, then
# its own) before it answers "pending": under the CLI's 30 s, so an operator always gets an answer.
SERVING_WAIT_S = 20.0


class RegistryError(ValueError):
    """An operation the registry refuses; the message says why. The subclass says what kind
    (the admin API maps them to HTTP codes by type)."""


class VersionNotFound(RegistryError):
    """No such version, or not a version name at all."""


class RegistryConflict(RegistryError):
    """The registry's state forbids it: already active, rejected, nothing to roll back to."""


class RegistryChanged(RegistryConflict):
    """The registry changed since the caller looked (its ``expect_revision`` is stale)."""


class InvalidManifest(RegistryError):
    """A version's manifest.json does not parse (the message names the field)."""


class InvalidAdapter(RegistryError):
    """The adapter files are missing, corrupted, or not servable."""


class CanaryNotServed(RegistryConflict):
    """The model servers did not load the canary; nothing was recorded."""


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_json(path: Path, data: Any) -> None:
    """Write, fsync, rename: readers see the old file or the new one, never half of one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_safetensors(path: Path) -> None:
    """Raise unless ``path`` is a complete safetensors file (header parses, data all there).

    Cheap: reads the header only. Catches truncated or corrupted adapter files before they
    reach a model server.
    """
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise InvalidAdapter(f"{path.name}: truncated (no header)")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > size - 8:
            raise InvalidAdapter(f"{path.name}: truncated header ({header_len} bytes declared)")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InvalidAdapter(f"{path.name}: corrupted header: {e}") from e
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
    if not ends:
        raise InvalidAdapter(f"{path.name}: holds no tensors")
    if 8 + header_len + max(ends) != size:
        raise InvalidAdapter(
            f"{path.name}: size {size} does not match its header (truncated or padded)"
        )


def check_adapter_dir(path: Path) -> None:
    """Raise unless ``path`` holds a servable PEFT LoRA adapter."""
    for name in ADAPTER_FILES:
        if not (path / name).is_file():
            raise InvalidAdapter(f"adapter is missing {name}")
    try:
        config = json.loads((path / "adapter_config.json").read_text())
    except json.JSONDecodeError as e:
        raise InvalidAdapter(f"adapter_config.json: {e}") from e
    if config.get("bias", "none") != "none" or config.get("modules_to_save"):
        raise InvalidAdapter("adapter has biases or modules_to_save, which vLLM cannot serve")
    check_safetensors(path / "adapter_model.safetensors")


@dataclass(frozen=True)
class VersionInfo:
    version: str
    state: str  # active | candidate | approved-waiting | retired | rejected
    created_at: str
    manifest: VersionManifest


ServingHook = Callable[[str, Path, str | None], None]
CanaryHook = Callable[[str, Path], None]  # load a canary version beside the stable one


class Registry:
    def __init__(
        self,
        root: Path,
        hooks: list[ServingHook] | None = None,
        *,
        canary_hooks: list[CanaryHook] | None = None,
        adapter_prefix: str = "alignd",
    ) -> None:
        self.root = root
        self.adapters = root / "adapters"
        self.adapters.mkdir(parents=True, exist_ok=True)
        self.active_path = root / "active.json"
        self.canary_path = root / "canary.json"
        self.routing_path = root / "routing.json"
        self.audit_path = root / "audit.jsonl"
        self.hooks = hooks or []
        self.canary_hooks = canary_hooks or []
        self.adapter_prefix = adapter_prefix
        self.lock_path = root / ".lock"
        self.serving_lock_path = root / ".serving-lock"
        self._thread_lock = threading.RLock()
        with self._locked():  # another process may be registering: its staging is not ours
            for leftover in self.adapters.glob(".staging-*"):  # a crash mid-registration
                shutil.rmtree(leftover, ignore_errors=True)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the registry: one change at a time across threads and processes."""
        with self._thread_lock:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # closing releases the flock

    # --- reading ------------------------------------------------------------------------------
    def version_dir(self, version: str) -> Path:
        if not VERSION_RE.match(version):
            raise VersionNotFound(f"not a version name: {version!r}")
        path = self.adapters / version
        if not path.is_dir():
            raise VersionNotFound(f"no such version: {version}")
        return path

    def versions(self) -> list[str]:
        return sorted(p.name for p in self.adapters.iterdir() if VERSION_RE.match(p.name))

    def _active_record(self) -> dict[str, Any]:
        if not self.active_path.exists():
            return {}
        data: dict[str, Any] = json.loads(self.active_path.read_text())
        return data

    def active(self) -> str | None:
        value = self._active_record().get("version")
        return str(value) if value else None

    def revision(self) -> str:
        """Changes whenever the registry does (every change appends to the audit log): a page
        rendered at one revision may act only if it is still current (``expect_revision``)."""
        try:
            return str(self.audit_path.stat().st_size)
        except FileNotFoundError:
            return "0"

    def _check_revision(self, expected: str | None) -> None:
        if expected is not None and expected != self.revision():
            raise RegistryChanged(
                "the registry changed since you looked (another operator, the gate or the "
                f"regression watch); the active version is now {self.active() or 'none'}: "
                "reload and decide again"
            )

    def activation(self) -> dict[str, Any]:
        """The last activation: ``version``, ``previous``, ``changed_at``, ``action`` (promote |
        rollback; absent in files written before 0.3), ``history``, ``serving``."""
        return self._active_record()

    def canary(self) -> dict[str, Any] | None:
        """The running canary: ``version``, ``fraction``, ``started_at``, ``changed_at`` (of
        its last widening), ``stable`` (the stable version when it started); None when none."""
        if not self.canary_path.exists():
            return None
        data: dict[str, Any] = json.loads(self.canary_path.read_text())
        return data or None

    def canary_version(self) -> str | None:
        record = self.canary()
        return str(record["version"]) if record else None

    def routing(self) -> dict[str, Any]:
        """The routing document (:mod:`daemon.routing`) for the registry as it is now."""
        if self.routing_path.exists():
            data: dict[str, Any] = json.loads(self.routing_path.read_text())
            return data
        return routing_document(self.active(), self.canary(), self.adapter_prefix, "")

    def _write_routing(self) -> None:
        """Under the lock, after every change of the stable version or the canary."""
        document = routing_document(self.active(), self.canary(), self.adapter_prefix, _now())
        atomic_write_json(self.routing_path, document)

    def history(self) -> list[str]:
        return [str(v) for v in self._active_record().get("history", [])]

    def serving_state(self) -> str | None:
        """'pending' while the serving hooks of the last activation have not all succeeded,
        'done' once they have; None before any activation. (Files written before this field
        existed count as done.)"""
        record = self._active_record()
        return str(record.get("serving", "done")) if record else None

    def audit(self, *, since: str | None = None) -> Iterator[dict[str, Any]]:
        """The audit log's entries, oldest first; with ``since`` (a :meth:`revision`), only
        those appended after it."""
        if not self.audit_path.exists():
            return
        with self.audit_path.open() as f:
            if since is not None:
                f.seek(int(since) if since.isdigit() else 0)
            for line in f:
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError:
                        # a torn last line after a crash: its change did not happen
                        continue

    def service_windows(self, version: str | None) -> list[tuple[datetime | None, datetime | None]]:
        """When ``version`` served, from the audit log's activations: ``(start, end)`` pairs,
        ``end`` None while it serves. ``version`` None is the SFT model: from the beginning
        (``start`` None) to the first activation."""
        activations = [
            (datetime.fromisoformat(e["at"]), e.get("version"))
            for e in self.audit()
            if e.get("action") in {"promote", "rollback"} and e.get("at")
        ]
        if version is None:
            return [(None, activations[0][0] if activations else None)]
        windows: list[tuple[datetime | None, datetime | None]] = []
        for i, (at, active) in enumerate(activations):
            if active == version:
                end = activations[i + 1][0] if i + 1 < len(activations) else None
                windows.append((at, end))
        return windows

    def manifest(self, version: str) -> VersionManifest:
        """The version's manifest; :class:`ManifestError` (naming the field) if it is malformed."""
        try:
            return VersionManifest.read(self.version_dir(version) / "manifest.json")
        except ManifestError as e:
            raise InvalidManifest(str(e)) from e

    def state(self, version: str) -> str:
        if version == self.active():
            return "active"
        if version == self.canary_version():
            return "canary"
        actions = [e.get("action") for e in self.audit() if e.get("version") == version]
        if actions and actions[-1] == "reject":
            return "rejected"
        if "promote" in actions or "rollback" in actions:
            return "retired"  # was active once
        return "candidate" if self.manifest(version).gate_passed else "rejected"

    def _operator_rejected(self, version: str) -> bool:
        actions = [
            e.get("action")
            for e in self.audit()
            if e.get("version") == version and e.get("action") in {"reject", "promote", "rollback"}
        ]
        return bool(actions) and actions[-1] == "reject"

    def check_files(self, version: str) -> None:
        """Raise :class:`InvalidAdapter` unless the version's files are servable and match the
        sha256 its manifest recorded at registration (older manifests without hashes: servable
        is checked, with a warning)."""
        path = self.version_dir(version)
        check_adapter_dir(path)
        recorded = self.manifest(version).files
        if not recorded:
            log.warning("%s: its manifest records no file hashes (registered before 0.2)", version)
            return
        for name in ADAPTER_FILES:
            if recorded.get(name) != file_sha256(path / name):
                raise InvalidAdapter(
                    f"{version}/{name} does not match the sha256 recorded when it was registered"
                )

    def show(self, version: str) -> VersionInfo:
        manifest = self.manifest(version)
        return VersionInfo(version, self.state(version), manifest.created_at, manifest)

    def list_versions(self) -> list[VersionInfo]:
        return [self.show(v) for v in self.versions()]

    # --- changing -----------------------------------------------------------------------------
    def _append_audit(self, action: str, actor: str, reason: str, **extra: Any) -> None:
        entry = {"at": _now(), "action": action, "actor": actor, "reason": reason, **extra}
        with self.audit_path.open("a") as f:
            f.write(json.dumps(entry, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _next_version(self) -> str:
        numbers = [int(v[1:]) for v in self.versions()]
        return f"v{(max(numbers) + 1 if numbers else 1):04d}"

    def register(
        self,
        adapter_dir: Path,
        manifest: VersionManifest | dict[str, Any],
        *,
        actor: str = "alignd",
    ) -> str:
        """Copy a trained adapter in as a new immutable version; returns its name."""
        check_adapter_dir(adapter_dir)
        with self._locked():
            return self._register(adapter_dir, VersionManifest.model_validate(manifest), actor)

    def _register(self, adapter_dir: Path, manifest: VersionManifest, actor: str) -> str:
        staging = self.adapters / f".staging-{uuid.uuid4().hex}"
        staging.mkdir()
        try:
            for name in ADAPTER_FILES:
                shutil.copy2(adapter_dir / name, staging / name)
            check_adapter_dir(staging)  # what was copied, not only the source
            version = self._next_version()
            files = {name: file_sha256(staging / name) for name in ADAPTER_FILES}
            full = manifest.model_copy(
                update={"version": version, "created_at": _now(), "files": files}
            )
            (staging / "manifest.json").write_text(full.to_json())
            for name in (*ADAPTER_FILES, "manifest.json"):
                with (staging / name).open("rb") as f:
                    os.fsync(f.fileno())
            os.rename(staging, self.adapters / version)  # the moment the version exists
            _fsync_dir(self.adapters)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self._append_audit(
            "register",
            actor,
            "; ".join(manifest.gate.reasons if manifest.gate else []) or "gate passed",
            version=version,
            gate_passed=manifest.gate_passed,
        )
        return version

    def _activate(
        self, version: str, *, action: str, actor: str, reason: str, history: list[str]
    ) -> dict[str, Any]:
        """Record ``version`` as active (under the lock); the caller serves it after the lock
        is released (:meth:`_serve`)."""
        previous = self.active()
        self.check_files(version)
        record = {
            "version": version,
            "history": history,
            "changed_at": _now(),
            "previous": previous,
            "action": action,
            "serving": "pending",
        }
        atomic_write_json(self.active_path, record)
        self._append_audit(action, actor, reason, version=version, previous=previous)
        if version == self.canary_version():  # the canary became stable: no canary now
            self.canary_path.unlink()
            self._append_audit("canary_end", actor, f"{version} now serves all traffic",
                               version=version)  # fmt: skip
        self._write_routing()
        return record

    @contextmanager
    def _serving(self, wait_s: float) -> Iterator[bool]:
        """The serving lock, apart from the registry's: one activation's hooks at a time, so
        they reach the model servers in the order the activations were recorded. Yields False
        when it is not free within ``wait_s`` (another activation's hooks hang)."""
        fd = os.open(self.serving_lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        deadline, acquired = time.monotonic() + wait_s, False
        try:
            while not acquired:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    acquired = True
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        break
                    time.sleep(0.02)
            yield acquired
        finally:
            os.close(fd)  # closing releases the flock

    def _still_active(self, record: dict[str, Any]) -> dict[str, Any] | None:
        """The active record if ``record`` is still the last activation, else None."""
        with self._locked():
            current = self._active_record()
        same = (current.get("version"), current.get("changed_at"))
        return current if same == (record.get("version"), record.get("changed_at")) else None

    def _serve(self, record: dict[str, Any], actor: str, *, replay: bool = False) -> list[str]:
        """Run the serving hooks for the activation ``record`` under the serving lock, never
        under the registry's: a model server that hangs must not hold the registry (operators,
        the gate and the watch change it meanwhile), and an operator waits at most
        ``SERVING_WAIT_S`` for another activation's hooks (then this one is replayed at the next
        tick). An activation superseded meanwhile is not served. Afterwards, if ``record`` is
        still the active one: all succeeded → marked done (on a ``replay``, ``serving_replayed``
        audited); a failure → audited once per activation (``serving_hook_failed``), not once
        per retry, so an outage does not change the registry's revision every tick. Returns the
        failures; the activation stays pending until the hooks succeed."""
        version, previous = str(record["version"]), record.get("previous")
        with self._serving(SERVING_WAIT_S) as free:
            if not free:
                return [
                    f"serving: another activation's hooks are still running after "
                    f"{SERVING_WAIT_S:g} s; {version} is served at the next tick"
                ]
            current = self._still_active(record)
            if current is None:
                return []  # a newer activation: it serves itself
            if current.get("serving", "done") == "done":
                return []  # served meanwhile (a tick's replay waited on the activation's hooks)
            failures = []
            for hook in self.hooks:
                try:
                    hook(version, self.version_dir(version), previous)
                except Exception as e:
                    failures.append(f"{getattr(hook, '__name__', type(hook).__name__)}: {e}")
            with self._locked():
                current = self._active_record()
                if (current.get("version"), current.get("changed_at")) != (
                    version,
                    record.get("changed_at"),
                ):
                    return failures  # superseded while its hooks ran: the newer one is next
                if failures:
                    if not current.get("serving_failed"):
                        self._append_audit("serving_hook_failed", actor, "; ".join(failures),
                                           version=version)  # fmt: skip
                        atomic_write_json(self.active_path, {**current, "serving_failed": True})
                    return failures
                if replay:
                    self._append_audit("serving_replayed", actor, "serving now agrees",
                                       version=version)  # fmt: skip
                atomic_write_json(self.active_path, {**current, "serving": "done",
                                                     "serving_failed": False})  # fmt: skip
        return failures

    def _serve_answering(self, record: dict[str, Any], actor: str) -> list[str]:
        """:meth:`_serve` for an operator's or the gate's activation, answered within
        ``SERVING_WAIT_S`` (under the CLI's 30 s): hooks still running then (a hung model
        server) finish on their own, and the activation stays pending until they succeed."""
        done: list[list[str]] = []
        worker = threading.Thread(target=lambda: done.append(self._serve(record, actor)),
                                  name="serving-hooks", daemon=True)  # fmt: skip
        worker.start()
        worker.join(SERVING_WAIT_S)
        if done:
            return done[0]
        return [
            f"serving: the hooks for {record['version']} are still running after "
            f"{SERVING_WAIT_S:g} s; it is pending until they finish (alignd status)"
        ]

    def replay_serving(self, *, actor: str = "alignd-startup") -> list[str] | None:
        """If the last activation's hooks have not all succeeded (a crash between recording it
        and serving it, a model server that was down), run them again. Returns None when
        nothing was pending, else the failures (empty: serving now agrees)."""
        with self._locked():
            record = self._active_record()
            if not record or record.get("serving", "done") == "done":
                return None
        if not record.get("serving_failed"):
            log.warning(
                "activation of %s was recorded but not served everywhere: replaying the hooks",
                record.get("version"),
            )
        return self._serve(record, actor, replay=True)

    def promote(
        self,
        version: str,
        *,
        actor: str,
        reason: str,
        force: bool = False,
        expect_revision: str | None = None,
    ) -> list[str]:
        """Make ``version`` active. Refuses a version the gate rejected unless ``force``."""
        with self._locked():
            self._check_revision(expect_revision)
            record = self._promote(version, actor=actor, reason=reason, force=force)
        return self._serve_answering(record, actor)

    def _promote(self, version: str, *, actor: str, reason: str, force: bool) -> dict[str, Any]:
        state = self.state(version)
        if state == "active":
            raise RegistryConflict(f"{version} is already active")
        if state == "canary" and not force and not self.manifest(version).gate_passed:
            raise RegistryConflict(
                f"{version} serves a canary on the reviewed tier: all traffic needs every gate "
                "check; use force to override"
            )
        if state == "rejected" and not force:
            raise RegistryConflict(
                f"{version} was rejected by the gate or an operator; use force to override"
            )
        history = [v for v in self.history() if v != version] + [version]
        return self._activate(
            version, action="promote", actor=actor, reason=reason, history=history
        )

    def rollback(
        self,
        *,
        actor: str,
        reason: str,
        to: str | None = None,
        force: bool = False,
        expect_active: str | None = None,
        expect_revision: str | None = None,
    ) -> tuple[str, list[str]]:
        """Re-activate the previous active version, or ``to``. A version an operator rejected
        after it was active is skipped (or, named as ``to``, refused) unless ``force``. With
        ``expect_active``, refuses unless that version is still the active one (a decision
        taken on it must not undo someone else's change)."""
        with self._locked():
            self._check_revision(expect_revision)
            history, active = self.history(), self.active()
            if expect_active is not None and active != expect_active:
                raise RegistryConflict(f"the active version is {active}, not {expect_active}")
            if to is None:
                earlier = [
                    v
                    for v in history[:-1]
                    if v != active and (force or not self._operator_rejected(v))
                ]
                if not earlier:
                    raise RegistryConflict(
                        "nothing to roll back to: no earlier active version that was not rejected"
                        if len(history) >= 2
                        else "nothing to roll back to: no earlier active version"
                    )
                to = earlier[-1]
            else:
                self.version_dir(to)
                if to not in history:
                    raise RegistryConflict(f"{to} was never active; promote it instead")
                if to == active:
                    raise RegistryConflict(f"{to} is already active")
                if self._operator_rejected(to) and not force:
                    raise RegistryConflict(
                        f"{to} was rejected by an operator; use force to roll back to it anyway"
                    )
            history = history[: history.index(to) + 1]
            record = self._activate(
                to, action="rollback", actor=actor, reason=reason, history=history
            )
        return to, self._serve_answering(record, actor)

    # --- the canary ---------------------------------------------------------------------------
    def start_canary(
        self,
        version: str,
        fraction: float,
        *,
        actor: str,
        reason: str,
        force: bool = False,
        supersede: bool = False,
        expect_revision: str | None = None,
    ) -> None:
        """Serve ``version`` to ``fraction`` of conversations beside the stable adapter. Needs
        the gate's ``canary`` or ``stable`` tier (or ``force``); a running canary is refused
        unless ``supersede`` (the gate's newer candidate), which ends it first. The model
        servers load the canary before it is recorded (:class:`CanaryNotServed` if not)."""
        if not 0 < fraction < 1:
            raise RegistryConflict(f"a canary's fraction is between 0 and 1, not {fraction:g}")
        with self._locked():
            self._check_revision(expect_revision)
            self._may_start_canary(version, force=force, supersede=supersede)
            revision = self.revision()
        path = self.version_dir(version)
        with self._serving(SERVING_WAIT_S) as free:
            failures = [] if free else [f"the serving lock stayed busy for {SERVING_WAIT_S:g} s"]
            for hook in self.canary_hooks if free else []:
                try:
                    hook(version, path)
                except Exception as e:
                    failures.append(f"{getattr(hook, '__name__', type(hook).__name__)}: {e}")
        if failures:
            raise CanaryNotServed(f"{version} was not loaded: {'; '.join(failures)}")
        with self._locked():
            if self.revision() != revision:  # something changed while the servers loaded it
                self._may_start_canary(version, force=force, supersede=supersede)
            running = self.canary()
            if running is not None:
                self._append_audit("canary_abort", actor, f"superseded by {version}",
                                   version=running["version"])  # fmt: skip
            now = _now()
            record = {"version": version, "fraction": fraction, "started_at": now,
                      "changed_at": now, "stable": self.active()}  # fmt: skip
            atomic_write_json(self.canary_path, record)
            self._append_audit("canary_start", actor, reason, version=version, fraction=fraction)
            self._write_routing()

    def _may_start_canary(self, version: str, *, force: bool, supersede: bool) -> None:
        state = self.state(version)
        if state in {"active", "canary"}:
            raise RegistryConflict(f"{version} is already {state}")
        running = self.canary_version()
        if running is not None and not supersede:
            raise RegistryConflict(f"{running} is the canary; abort or promote it first")
        if force:
            return
        if self._operator_rejected(version):
            raise RegistryConflict(f"{version} was rejected; use force to override")
        gate = self.manifest(version).gate
        tier = gate.reached if gate is not None else None
        if tier not in {"canary", "stable"}:
            why = gate.tier_reason if gate is not None and gate.tier_reason else "no exposure"
            raise RegistryConflict(f"the gate allows {version} no canary ({why}); use force")

    def widen_canary(
        self,
        fraction: float,
        *,
        actor: str,
        reason: str,
        expect_version: str | None = None,
        expect_revision: str | None = None,
    ) -> None:
        """Give the canary a larger share (never a smaller one: abort instead)."""
        with self._locked():
            self._check_revision(expect_revision)
            record = self._expect_canary(expect_version)
            if not record["fraction"] < fraction < 1:
                raise RegistryConflict(
                    f"widening goes above {record['fraction']:g} and below 1, not {fraction:g}"
                )
            atomic_write_json(
                self.canary_path, {**record, "fraction": fraction, "changed_at": _now()}
            )
            self._append_audit("canary_widen", actor, reason, version=record["version"],
                               fraction=fraction)  # fmt: skip
            self._write_routing()

    def abort_canary(
        self,
        *,
        actor: str,
        reason: str,
        reject: bool = False,
        expect_version: str | None = None,
        expect_revision: str | None = None,
    ) -> str:
        """Send all traffic back to stable; with ``reject``, the version is rejected too (never
        exposed again without a force). Returns the version aborted."""
        with self._locked():
            self._check_revision(expect_revision)
            version = str(self._expect_canary(expect_version)["version"])
            self.canary_path.unlink()
            self._append_audit("canary_abort", actor, reason, version=version)
            if reject:
                self._append_audit("reject", actor, reason, version=version)
            self._write_routing()
        return version

    def _expect_canary(self, expected: str | None) -> dict[str, Any]:
        record = self.canary()
        if record is None:
            raise RegistryConflict("no canary is running")
        if expected is not None and record["version"] != expected:
            raise RegistryConflict(f"the canary is {record['version']}, not {expected}")
        return record

    def reject(
        self, version: str, *, actor: str, reason: str, expect_revision: str | None = None
    ) -> None:
        with self._locked():
            self._check_revision(expect_revision)
            if self.state(version) in {"active", "canary"}:
                raise RegistryConflict(
                    f"{version} is {self.state(version)}; roll back or abort first"
                )
            self.version_dir(version)
            self._append_audit("reject", actor, reason, version=version)


def current_pointer_hook(registry_root: Path) -> ServingHook:
    """Serving hook: point ``<root>/current`` at the active version (atomic symlink swap)."""

    def write_current_pointer(version: str, path: Path, previous: str | None) -> None:
        link = registry_root / "current"
        tmp = registry_root / f".current-{uuid.uuid4().hex}"
        os.symlink(os.path.relpath(path, registry_root), tmp)
        os.replace(tmp, link)

    return write_current_pointer
