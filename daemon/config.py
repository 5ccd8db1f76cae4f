"""alignd's configuration: one typed, frozen model, loaded once at start-up.

Sources, highest priority first: environment variables ``ALIGND_<SECTION>__<KEY>`` (e.g.
``ALIGND_KAFKA__BOOTSTRAP_SERVERS``), then the YAML file named by ``--config`` or
``ALIGND_CONFIG``, then the defaults below. Unknown keys and bad values fail at start-up with
the key named; secrets are redacted whenever the config is printed or logged.

Past 400 lines on purpose: every section, its defaults and its start-up checks in the one file
``docs/reference.md`` is generated from; the feedback sections live in ``feedback.config``.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    Field,
    SecretStr,
    TypeAdapter,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from daemon.auth import operator_name
from daemon.canary import RolloutConfig
from daemon.gate import GateConfig
from daemon.watch import WatchConfig
from feedback.attribution import AttributionConfig
from feedback.base import FrozenModel, refuse_retired
from feedback.config import DatasetConfig, EventLimits, KafkaConfig, StoreConfig, read_secret
from trainer.methods import PAIRED_METHODS, check_paired_method
from trainer.spec import Detectors, EvalSpec, Hyperparameters, LoraSpec, RunSpec, deep_merge

PairMethodName = Annotated[
    str,
    AfterValidator(check_paired_method),
    WithJsonSchema({"type": "string", "enum": list(PAIRED_METHODS)}),
]


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names every bad key."""


class PathsConfig(FrozenModel):
    data_dir: Path = Field(Path("alignd-data"), description="registry, snapshots, runs, caches")


class ScheduleConfig(FrozenModel):
    """When a refresh runs (see ``daemon.scheduler.refresh_due``)."""

    cron: str | None = Field(
        "0 3 * * *", description="crontab expression (UTC); null = counts only"
    )
    min_new_pairs: int | None = Field(
        200, gt=0, description="new edits+comparisons that trigger a run"
    )
    min_new_ratings: int | None = Field(1000, gt=0, description="new thumbs that trigger a run")
    min_interval_s: float = Field(3600.0, ge=0, description="never start runs closer than this")
    tick_s: float = Field(30.0, gt=0, description="how often the decision is re-evaluated")
    drift_probe_cron: str | None = Field(
        "*/30 * * * *",
        description="drift probe schedule: the active adapter's KL on the retain set",
    )
    drift_probe_timeout_s: float = Field(
        900.0, gt=0, description="a probe running longer is stopped (counted as timed_out)"
    )
    drift_probe_memory_limit_mb: int | None = Field(
        None, gt=0, description="address-space limit of the probe child (null: training's)"
    )
    retention_cron: str | None = Field("17 4 * * *", description="when store retention runs")

    @model_validator(mode="before")
    @classmethod
    def _retired_keys(cls, data: Any) -> Any:
        return refuse_retired(
            data,
            {
                "drift_probe_prompts": "is gone: the probe measures the retain set "
                "(run_spec.eval.retain_set), not recent production replies"
            },
        )

    @field_validator("cron", "drift_probe_cron", "retention_cron")
    @classmethod
    def _valid_cron(cls, value: str | None) -> str | None:
        if value is not None:
            from apscheduler.triggers.cron import CronTrigger

            try:
                CronTrigger.from_crontab(value, timezone="UTC")
            except ValueError as e:
                raise ValueError(f"not a crontab expression: {e}") from e
        return value


class KubernetesJobConfig(FrozenModel):
    namespace: str = Field("alignd", description="where Jobs are created")
    image: str = Field("alignd:0.1.0-cuda", description="the trainer image (same as the daemon's)")
    service_account: str | None = Field(None, description="service account of the Job's pod")
    pvc_name: str = Field("alignd-data", description="the shared data volume claim")
    data_mount: str = Field("/data", description="where the claim is mounted (= paths.data_dir)")
    gpus: int = Field(1, ge=0, description="nvidia.com/gpu limit; > 1 launches torchrun")
    gpu_memory_gib: float = Field(
        80.0, gt=0, description="memory of one GPU: a refresh whose plan exceeds it is refused"
    )
    cpu: str = Field("4", description="CPU request")
    memory: str = Field("32Gi", description="memory request and limit")
    node_selector: dict[str, str] = Field(default_factory=dict, description="e.g. GPU node pool")
    tolerations: list[dict[str, Any]] = Field(default_factory=list, description="e.g. GPU taints")
    poll_s: float = Field(10.0, gt=0, description="Job status poll interval")
    ttl_seconds_after_finished: int = Field(3600, ge=0, description="cluster-side clean-up")


class TrainingConfig(FrozenModel):
    """What a refresh trains and how the child process is bounded."""

    base_model: str = Field("smollm2", description="'smollm2', a .gguf file or a model directory")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto",
        description="the base's weight precision: auto = bf16 on CUDA, fp32 on CPU (LoRA "
        "weights, optimizer state, losses and log-probs stay fp32)",
    )
    pair_method: PairMethodName = Field(
        "dpo", description="loss when the snapshot has pairs: " + ", ".join(PAIRED_METHODS)
    )
    both_policy: Literal["pairs", "kto_union"] = Field(
        "pairs", description="pairs and thumbs: DPO-family on pairs, or KTO on all (pairs split)"
    )
    warm_start: bool = Field(True, description="initialise LoRA from the active adapter")
    incremental: bool = Field(
        True,
        description="with warm_start: train on rows new since the active adapter's snapshot "
        "plus a replay sample of older ones (held-out: all)",
    )
    replay_ratio: float = Field(
        3.0, ge=0, description="incremental refresh: older rows replayed per new training row"
    )
    replay_rows: int = Field(
        1000, ge=0, description="incremental refresh: at most this many older rows per kind"
    )
    incremental_epochs: float | None = Field(
        1.0,
        gt=0,
        description="incremental refresh: epochs over the new and replayed rows (null: the run "
        "spec's hyper.epochs)",
    )
    min_pairs: int = Field(8, gt=0, description="fewer training pairs: no paired run")
    min_kto_rows: int = Field(16, gt=0, description="fewer thumbs: no KTO run")
    run_spec: dict[str, Any] = Field(
        default_factory=dict, description="run-spec overrides (hyper, lora, eval, detectors)"
    )

    @field_validator("run_spec")
    @classmethod
    def _valid_run_spec(cls, value: dict[str, Any]) -> dict[str, Any]:
        """Checked at start-up, not at the first refresh: a typo in a hyperparameter or a bad
        policy-rule pattern names its key now."""
        sections: dict[str, type[FrozenModel]] = {
            "hyper": Hyperparameters,
            "lora": LoraSpec,
            "eval": EvalSpec,
            "detectors": Detectors,
        }
        for key, section in value.items():
            if key not in RunSpec.model_fields:
                raise ValueError(f"{key}: not a run-spec field")
            try:
                if key in sections:
                    sections[key].model_validate(section)
                else:  # a plain field (engine, dtype, method, seed, ...): its own type
                    field = RunSpec.model_fields[key]
                    # its type with its validators (a method name's check)
                    kind: Any = field.annotation
                    if field.metadata:
                        kind = Annotated[kind, *field.metadata]
                    TypeAdapter(kind).validate_python(section)
            except ValidationError as e:
                first = e.errors()[0]
                where = ".".join(str(p) for p in (key, *first["loc"]))
                raise ValueError(f"{where}: {first['msg']}") from None
        return value

    def spec(self, run: dict[str, Any] | None = None, *after: dict[str, Any]) -> RunSpec:
        """The run spec this section makes, typed: ``run`` (a refresh's data, output directory,
        method...) with ``run_spec``'s overrides laid over it, then each of ``after``. This
        section's ``base_model`` and ``dtype`` are the defaults (``run_spec.dtype`` wins).
        Without ``run`` the paths are placeholders: the view the daemon reads outside a refresh
        (the drift probe's retain set, engine, quantisation)."""
        base = {"data": ".", "output_dir": ".", "base_model": self.base_model,
                "dtype": self.dtype, **(run or {})}  # fmt: skip
        raw = deep_merge(base, self.run_spec)
        for extra in after:
            raw = deep_merge(raw, extra)
        return RunSpec.model_validate(raw)

    timeout_s: float = Field(6 * 3600.0, gt=0, description="a run past this is stopped, failed")
    memory_limit_mb: int | None = Field(None, gt=0, description="address-space limit of the child")
    stop_grace_s: float = Field(20.0, ge=0, description="SIGTERM → SIGKILL grace for the child")
    runner: Literal["local", "kubernetes"] = Field(
        "local", description="train in a child process, or as a Kubernetes Job"
    )
    kubernetes: KubernetesJobConfig = KubernetesJobConfig()

    @model_validator(mode="after")
    def _sharding_can_run(self) -> TrainingConfig:
        """FSDP needs several GPUs in one Job; the local runner trains in one process, where
        ``engine`` would be silently ignored."""
        if self.run_spec.get("engine") != "fsdp":
            return self
        if (self.run_spec.get("lora") or {}).get("quantize") is not None:
            raise ValueError(
                "run_spec.engine: fsdp shards a base in its own precision; run_spec.lora.quantize "
                "(NF4) runs on one GPU: remove one of them"
            )
        if self.runner != "kubernetes" or self.kubernetes.gpus < 2:
            raise ValueError(
                "run_spec.engine: fsdp shards the base over the GPUs of a Kubernetes Job: it "
                "needs training.runner: kubernetes and training.kubernetes.gpus of 2 or more "
                f"(here runner {self.runner}, gpus {self.kubernetes.gpus})"
            )
        return self

    @model_validator(mode="after")
    def _quantization_can_run(self) -> TrainingConfig:
        """QLoRA needs a CUDA GPU where training runs: refused at start-up, naming the key,
        not at the first refresh hours later."""
        quantize = (self.run_spec.get("lora") or {}).get("quantize")
        if quantize is None:
            return self
        if self.runner == "kubernetes" and self.kubernetes.gpus == 0:
            raise ValueError(
                f"run_spec.lora.quantize: {quantize} needs a GPU, and training.kubernetes.gpus "
                "is 0: give the Jobs a GPU or remove lora.quantize"
            )
        if self.runner == "local" and not cuda_here():
            raise ValueError(
                f"run_spec.lora.quantize: {quantize} needs a CUDA GPU and training runs here "
                "(training.runner: local), which has none: remove lora.quantize, or run "
                "training as Kubernetes Jobs on GPU nodes (training.runner: kubernetes)"
            )
        return self


def cuda_here() -> bool:
    """Whether this machine has a CUDA GPU torch can use, asked of a child process (the
    daemon itself never imports torch)."""
    code = "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)"
    return subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


class AdminConfig(FrozenModel):
    host: str = Field("127.0.0.1", description="admin API / metrics bind address")
    port: int = Field(8080, ge=0, le=65535, description="admin API / metrics port")
    token: SecretStr | None = Field(None, description="admin bearer token: reads and changes")
    token_file: Path | None = Field(None, description="file holding the admin bearer token")
    read_token: SecretStr | None = Field(
        None, description="read-only bearer token: GET under /v1/ (dashboards, on-call)"
    )
    read_token_file: Path | None = Field(None, description="file holding the read-only token")
    operator_token_files: dict[str, Path] = Field(
        {},
        description="operator name -> file holding their own admin token: the audit log names "
        "them by the token they used, whatever they type",
    )
    max_body_bytes: int = Field(
        16_384, gt=0, description="request bodies larger are refused while streaming, before auth"
    )
    max_connections: int = Field(
        64, gt=0, description="concurrent connections and requests; beyond it 503"
    )
    keep_alive_s: float = Field(5.0, gt=0, description="idle keep-alive connections close after")
    request_head_timeout_s: float = Field(
        10.0,
        gt=0,
        description="a connection that delivers no complete request head this long after it "
        "opened (or after its last response) is closed: idle sockets cannot hold the port",
    )
    drain_s: float = Field(25.0, gt=0, description="SIGTERM → exit bound (< pod grace period)")
    json_logs: bool = Field(False, description="structured JSON-lines logs")

    @field_validator("token", "read_token")
    @classmethod
    def _long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            _check_token_length(value.get_secret_value())
        return value

    @model_validator(mode="after")
    def _token_files_long_enough(self) -> AdminConfig:
        files = [(key, getattr(self, key)) for key in ("token_file", "read_token_file")]
        files += [(f"operator_token_files.{n}", p) for n, p in self.operator_token_files.items()]
        for key, path in files:
            if path is not None:
                try:
                    _check_token_length(read_secret(None, path) or "")
                except ValueError as e:
                    raise ValueError(f"{key}: {e}") from e
        for name in self.operator_token_files:
            try:
                if operator_name(name) != name:
                    raise ValueError("letters, digits and -_.@ only, at most 64")
            except ValueError as e:
                raise ValueError(f"operator_token_files.{name}: {e}") from None
        return self

    def operator_tokens(self) -> dict[str, str]:
        """Operator name -> their own admin token."""
        return {n: read_secret(None, p) or "" for n, p in self.operator_token_files.items()}


MIN_TOKEN_CHARS = 24


def _check_token_length(token: str) -> None:
    if len(token) < MIN_TOKEN_CHARS:
        raise ValueError(
            f"shorter than {MIN_TOKEN_CHARS} characters: use a random one, e.g. "
            "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`"
        )


class ServingConfig(FrozenModel):
    current_pointer: bool = Field(True, description="keep registry/current → active version")
    vllm_endpoints: list[str] = Field(
        default_factory=list, description="vLLM servers to hot-load into"
    )
    vllm_adapter_prefix: str = Field("alignd", description="served LoRA name: PREFIX-VERSION")


class AligndConfig(BaseSettings):
    """Every setting alignd reads. ``alignd config show`` prints the resolved values."""

    model_config = SettingsConfigDict(
        env_prefix="ALIGND_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        hide_input_in_errors=True,  # an error must never print a token or a password
    )

    kafka: KafkaConfig = KafkaConfig()
    store: StoreConfig = StoreConfig()
    limits: EventLimits = EventLimits()
    dataset: DatasetConfig = DatasetConfig()
    paths: PathsConfig = PathsConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    training: TrainingConfig = TrainingConfig()
    gate: GateConfig = GateConfig()
    admin: AdminConfig = AdminConfig()
    serving: ServingConfig = ServingConfig()
    watch: WatchConfig = WatchConfig()
    rollout: RolloutConfig = RolloutConfig()
    attribution: AttributionConfig = AttributionConfig()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # init (the YAML file, passed in by load_config) < environment: env overrides the file.
        return env_settings, init_settings

    def redacted(self) -> dict[str, Any]:
        """The resolved config as plain data, secrets shown as '**********' (and a password in
        ``store.url`` as ``***``)."""
        redacted: dict[str, Any] = _redact(self.model_dump(mode="python"))
        redacted["store"]["url"] = self.store.display_url()
        return redacted


def _redact(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return "**********"
    if isinstance(value, dict):
        return {k: _redact(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def load_config(path: Path | str | None = None) -> AligndConfig:
    """Load and validate the config; raises :class:`ConfigError` naming each bad key."""
    path = path or os.environ.get("ALIGND_CONFIG")
    raw: dict[str, Any] = {}
    if path:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot read config file {path}: {e}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: the top level must be a mapping")
        raw = loaded
    try:
        return AligndConfig(**raw)
    except ValidationError as e:
        lines = [f"invalid configuration{f' ({path})' if path else ''}:"]
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"])
            lines.append(f"  {key}: {err['msg']} (env ALIGND_{key.upper().replace('.', '__')})")
        raise ConfigError("\n".join(lines)) from e


def with_absolute_paths(config: AligndConfig) -> AligndConfig:
    """``config`` with its file paths made absolute against the daemon's working directory:
    children start in a safe directory of their own (``daemon.child``), so every path they
    are given must not depend on where the daemon was started."""
    training = config.training
    base = Path(training.base_model)
    if base.exists():
        training = training.model_copy(update={"base_model": str(base.resolve())})
    curated = config.gate.curated_heldout
    gate = config.gate.model_copy(
        update={"curated_heldout": curated.resolve() if curated is not None else None}
    )
    paths = config.paths.model_copy(update={"data_dir": config.paths.data_dir.resolve()})
    return config.model_copy(update={"training": training, "gate": gate, "paths": paths})


SALT_FILE = "split-salt"


def with_split_salt(config: AligndConfig) -> AligndConfig:
    """``config`` with a secret held-out split salt: the configured one, else the one kept in
    ``<data_dir>/split-salt``, generated (and written 0600) on the first start.

    With a public salt anyone could compute offline which prompts the gate holds out and
    steer exactly those; the file keeps the split stable across restarts.
    """
    if config.dataset.split_salt is not None:
        return config
    path = config.paths.data_dir / SALT_FILE
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_suffix(".tmp")
        fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(staging, path)
    salt = path.read_text().strip()
    if not salt:
        raise ValueError(f"dataset.split_salt: {path} is empty; delete it to generate a new one")
    dataset = config.dataset.model_copy(update={"split_salt": SecretStr(salt)})
    return config.model_copy(update={"dataset": dataset})
