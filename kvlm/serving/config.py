"""Server configuration in `tensorflow_model_server`'s formats.

- `models.config`: a `ModelServerConfig` text proto (`model_config_list { config { ... } }`).
- `batching.config`: a `BatchingParameters` text proto (`max_batch_size { value: 32 } ...`).
- `ssl.config`: an `SSLConfig` text proto (`server_key`, `server_cert`, `custom_ca`, `client_verify`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

from kvlm.export.layout import validate_model_name
from kvlm.serving.protos import BatchingParameters, MonitoringConfig, SSLConfig

VERSION_POLICIES = ("latest", "all", "specific")
DEFAULT_PROMETHEUS_PATH = "/monitoring/prometheus/metrics"
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096
DEFAULT_MAX_DECODE_BYTES = 1024**3


@dataclass(frozen=True)
class ModelConfig:
    """One served model: versions are numeric folders under `base_path`.

    `policy` is "latest" (the `num_versions` newest), "all", or "specific" (`versions`).
    `labels` maps version labels (e.g. "stable") to versions.
    """

    name: str
    base_path: Path
    policy: str = "latest"
    num_versions: int = 1
    versions: tuple[int, ...] = ()
    labels: dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        validate_model_name(self.name)
        if self.policy not in VERSION_POLICIES:
            raise ValueError(f"Unknown version policy {self.policy!r}; use one of {VERSION_POLICIES}.")
        if self.policy == "latest" and self.num_versions < 1:
            raise ValueError(f"Model {self.name!r}: latest.num_versions must be >= 1, got {self.num_versions}.")
        if self.policy == "specific" and not self.versions:
            raise ValueError(f"Model {self.name!r}: the 'specific' version policy needs at least one version.")

    def select(self, available: list[int]) -> list[int]:
        """The versions to serve among the `available` ones."""
        if self.policy == "all":
            return sorted(available)
        if self.policy == "specific":
            return sorted(v for v in available if v in self.versions)
        return sorted(available)[-self.num_versions :]


@dataclass(frozen=True)
class BatchingConfig:
    """Batching options (defaults as TF Serving's where it has one)."""

    max_batch_size: int = 32
    batch_timeout_micros: int = 1000
    max_enqueued_batches: int = 100
    num_batch_threads: int = 2
    allowed_batch_sizes: tuple[int, ...] = ()

    def __post_init__(self):
        for name in ("max_batch_size", "max_enqueued_batches", "num_batch_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"Batching parameter {name} must be >= 1, got {getattr(self, name)}.")
        if self.batch_timeout_micros < 0:
            raise ValueError(f"batch_timeout_micros must be >= 0, got {self.batch_timeout_micros}.")
        sizes = self.allowed_batch_sizes
        if sizes and (list(sizes) != sorted(set(sizes)) or sizes[-1] != self.max_batch_size or sizes[0] < 1):
            raise ValueError(
                f"allowed_batch_sizes must be increasing and end with max_batch_size "
                f"({self.max_batch_size}); got {list(sizes)}."
            )


@dataclass(frozen=True)
class TLSConfig:
    """PEM contents for a TLS server; `client_verify` requires client certificates."""

    server_key: bytes
    server_cert: bytes
    custom_ca: bytes | None = None
    client_verify: bool = False


def _read(path: str | Path, what: str) -> str:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path.read_text(encoding="utf-8")


def _resolve(base_path: str, config_dir: Path) -> Path:
    path = Path(base_path)
    return path if path.is_absolute() else (config_dir / path).resolve()


def parse_model_config(text: str, config_dir: str | Path = ".") -> list[ModelConfig]:
    """Parses a `models.config` text proto; relative base paths are taken from `config_dir`."""
    try:
        proto = text_format.Parse(text, model_server_config_pb2.ModelServerConfig())
    except text_format.ParseError as error:
        raise ValueError(f"Invalid model config: {error}") from None
    return model_configs_from_proto(proto, config_dir)


def model_configs_from_proto(
    proto: model_server_config_pb2.ModelServerConfig, config_dir: str | Path = "."
) -> list[ModelConfig]:
    """The models of a `ModelServerConfig` (from a file or a HandleReloadConfigRequest)."""
    if proto.WhichOneof("config") != "model_config_list":
        raise ValueError("The model config needs a `model_config_list { config { ... } }` section.")
    models = []
    for entry in proto.model_config_list.config:
        if not entry.name or not entry.base_path:
            raise ValueError(f"Every model config needs `name` and `base_path`; got {text_format.MessageToString(entry, as_one_line=True)!r}.")
        if entry.model_platform not in ("", "tensorflow"):
            raise ValueError(f"Model {entry.name!r}: only model_platform 'tensorflow' is served, not {entry.model_platform!r}.")
        policy = entry.model_version_policy
        kind = policy.WhichOneof("policy_choice") or "latest"
        models.append(
            ModelConfig(
                name=entry.name,
                base_path=_resolve(entry.base_path, Path(config_dir)),
                policy=kind,
                num_versions=(policy.latest.num_versions or 1) if kind == "latest" else 1,
                versions=tuple(policy.specific.versions) if kind == "specific" else (),
                labels=dict(entry.version_labels),
            )
        )
    names = [m.name for m in models]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"Model names must be unique in the model config; repeated: {duplicates}.")
    if not models:
        raise ValueError("The model config lists no models.")
    return models


def load_model_config(path: str | Path) -> list[ModelConfig]:
    """Reads a `--model_config_file`."""
    return parse_model_config(_read(path, "Model config file"), Path(path).resolve().parent)


def parse_batching_parameters(text: str) -> BatchingConfig:
    """Parses a `--batching_parameters_file` (`BatchingParameters` text proto)."""
    try:
        proto = text_format.Parse(text, BatchingParameters())
    except text_format.ParseError as error:
        raise ValueError(f"Invalid batching parameters: {error}") from None
    defaults = BatchingConfig()
    values = {
        name: getattr(proto, name).value if proto.HasField(name) else getattr(defaults, name)
        for name in ("max_batch_size", "batch_timeout_micros", "max_enqueued_batches", "num_batch_threads")
    }
    return BatchingConfig(**values, allowed_batch_sizes=tuple(proto.allowed_batch_sizes))


def load_batching_parameters(path: str | Path) -> BatchingConfig:
    """Reads a `--batching_parameters_file`."""
    return parse_batching_parameters(_read(path, "Batching parameters file"))


def parse_monitoring_config(text: str) -> str | None:
    """The Prometheus path of a `--monitoring_config_file` (`MonitoringConfig` text proto), or None
    when `prometheus_config { enable: true }` is not set. The path defaults to TF Serving's."""
    try:
        proto = text_format.Parse(text, MonitoringConfig())
    except text_format.ParseError as error:
        raise ValueError(f"Invalid monitoring config: {error}") from None
    prometheus = proto.prometheus_config
    if not prometheus.enable:
        return None
    path = prometheus.path or DEFAULT_PROMETHEUS_PATH
    if not path.startswith("/"):
        raise ValueError(f"prometheus_config.path must start with '/', got {path!r}.")
    return path


def load_monitoring_config(path: str | Path) -> str | None:
    """Reads a `--monitoring_config_file`; returns the Prometheus path or None."""
    return parse_monitoring_config(_read(path, "Monitoring config file"))


def load_ssl_config(path: str | Path) -> TLSConfig:
    """Reads an `--ssl_config_file` (`SSLConfig` text proto with PEM contents inline)."""
    try:
        proto = text_format.Parse(_read(path, "SSL config file"), SSLConfig())
    except text_format.ParseError as error:
        raise ValueError(f"Invalid SSL config: {error}") from None
    if not proto.server_key or not proto.server_cert:
        raise ValueError("The SSL config needs both server_key and server_cert.")
    return TLSConfig(
        server_key=proto.server_key.encode(),
        server_cert=proto.server_cert.encode(),
        custom_ca=proto.custom_ca.encode() or None,
        client_verify=proto.client_verify,
    )


def tls_from_files(cert_file: str, key_file: str, ca_file: str | None = None) -> TLSConfig:
    """A `TLSConfig` from PEM files; a CA file turns on client certificate checks."""
    return TLSConfig(
        server_key=_read(key_file, "TLS key file").encode(),
        server_cert=_read(cert_file, "TLS certificate file").encode(),
        custom_ca=_read(ca_file, "TLS CA file").encode() if ca_file else None,
        client_verify=bool(ca_file),
    )


@dataclass
class ServerOptions:
    """Everything `kvlm serve` configures (flags named as `tensorflow_model_server`'s)."""

    models: list[ModelConfig]
    host: str = "127.0.0.1"
    port: int = 8500
    batching: BatchingConfig | None = None
    file_system_poll_wait_seconds: float = 1.0
    tls: TLSConfig | None = None
    auth_token: str | None = None
    max_message_bytes: int = 32 * 1024 * 1024
    grpc_max_threads: int = 64
    shutdown_grace_seconds: float = 10.0
    rest_api_port: int | None = None  # None: no REST API; 0: any free port
    rest_api_host: str | None = None  # None: the same as `host`
    rest_api_timeout_seconds: float = 30.0
    prometheus_path: str | None = None  # None: no metrics endpoint (it needs the REST API)
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS  # 0: unbounded
    max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES  # 0: unbounded

    def __post_init__(self):
        if not self.models:
            raise ValueError("No models to serve: give --model_base_path or --model_config_file.")
        for flag, port in (("--port", self.port), ("--rest_api_port", self.rest_api_port)):
            if port is not None and not 0 <= port < 65536:
                raise ValueError(f"{flag} must be in [0, 65535], got {port}.")
        if self.prometheus_path and self.rest_api_port is None:
            raise ValueError("Prometheus metrics are served on the REST port: give --rest_api_port.")
        if self.max_image_pixels < 0 or self.max_decode_bytes < 0:
            raise ValueError(
                f"--max_image_pixels and --max_decode_bytes must be >= 0 (0: no limit), got "
                f"{self.max_image_pixels} and {self.max_decode_bytes}."
            )
        if self.max_message_bytes < 1024:
            raise ValueError(f"--max_message_bytes must be at least 1024, got {self.max_message_bytes}.")
        if self.grpc_max_threads < 1:
            raise ValueError(f"--grpc_max_threads must be >= 1, got {self.grpc_max_threads}.")
        if self.auth_token is not None and not self.auth_token.strip():
            raise ValueError("The auth token is empty.")


    @property
    def rest_host(self) -> str:
        return self.rest_api_host or self.host


def auth_token_from_env(value: str | None) -> str | None:
    """The `--auth_token` flag, else the `KVLM_AUTH_TOKEN` environment variable."""
    return value or os.environ.get("KVLM_AUTH_TOKEN") or None
