"""All settings in one pydantic object.

Precedence, lowest to highest: defaults < YAML file < ``KVCELLAR_*`` environment variables <
explicit keyword arguments (CLI flags, ``LLM(...)`` keywords). Scripts outside the package rely on
the field names, so renaming one is a breaking change.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from kvcellar.errors import ConfigError

DEFAULT_MODEL = "SmolLM2-135M-Instruct"

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "kib": 2**10,
    "ki": 2**10,
    "m": 10**6,
    "mb": 10**6,
    "mib": 2**20,
    "mi": 2**20,
    "g": 10**9,
    "gb": 10**9,
    "gib": 2**30,
    "gi": 2**30,
    "t": 10**12,
    "tb": 10**12,
    "tib": 2**40,
    "ti": 2**40,
}


def parse_size(value: Any) -> int:
    """Turn ``"2GB"``, ``"512MiB"``, ``1024`` or ``"0"`` into a byte count.

    Decimal units (KB, MB, GB) are powers of 1000, binary ones (KiB, MiB, GiB) powers of 1024, as
    on disk labels; budgets are exact byte counts either way.
    """
    if isinstance(value, bool):
        raise ValueError("a size must be a number of bytes or a string like '2GB'")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if isinstance(value, float):
        if value < 0 or value != value:
            raise ValueError("a size cannot be negative")
        return int(value)
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            unit = (m.group(2) or "").lower()
            if unit in _UNITS:
                return int(float(m.group(1)) * _UNITS[unit])
    raise ValueError(
        f"{value!r} is not a size; use a byte count or a string like '512MB' or '2GiB'"
    )


class Settings(BaseSettings):
    """Every knob of kvcellar. Build it with :meth:`Settings.load` to get the YAML layer too."""

    model_config = SettingsConfigDict(
        env_prefix="KVCELLAR_", extra="forbid", validate_default=True, case_sensitive=False
    )

    enabled: bool = Field(True, description="false = plain model, the no-cache baseline")
    model: str = Field(
        DEFAULT_MODEL, description="registry name or a local transformers model directory"
    )
    chunk_size: int = Field(256, ge=1, le=65536, description="tokens per KV chunk")
    memory_bytes: int = Field(
        2 * 10**9, description="byte budget of the in-process memory tier (0 = none)"
    )
    disk_path: Path | None = Field(
        None, description="directory of the disk tier (default <model_cache_dir>/kv)"
    )
    disk_bytes: int = Field(
        8 * 10**9, description="byte budget of the disk tier (0 = no disk tier)"
    )
    remote_url: str | None = Field(
        None,
        description="shared remote tier: redis://host:port/db, rediss://..., or "
        "redis+cluster://host:port for a Redis Cluster (any node as seed); unset = none",
    )
    remote_timeout_s: float = Field(
        1.0, gt=0, le=60, description="socket timeout of remote calls; past it the tier is down"
    )
    remote_ttl_s: float | None = Field(
        None, gt=0, description="expire remote entries after this many seconds (unset = never)"
    )
    write_back_queue: int = Field(
        256,
        ge=0,
        le=1_000_000,
        description="chunks waiting to be written to the slower tiers (disk, remote) in the "
        "background; when full, writes are dropped and counted (0 = write synchronously)",
    )
    role: Literal["both", "prefill", "decode"] = Field(
        "both",
        description="server role: prefill = compute and store prompt KV, generate nothing; "
        "decode = load KV from the shared tier and generate; both = a normal server",
    )
    save_partial_chunks: bool = Field(
        False, description="also store a final chunk shorter than chunk_size"
    )
    tenant: str = Field(
        "default", min_length=1, max_length=256, description="salts every cache key"
    )
    memory_codec: str = Field(
        "raw", description="KV codec of the memory tier (raw = exact; see kvcellar.kv.codecs)"
    )
    disk_codec: str = Field("raw", description="KV codec of the disk tier")
    remote_codec: str = Field("raw", description="KV codec of the remote (Redis) tier")
    kivi_group_size: int = Field(
        64, ge=1, le=4096, description="KIVI group: tokens per key group, channels per value group"
    )
    codec_sink_tokens: int = Field(
        4,
        ge=0,
        le=65535,
        description="first tokens of a sequence that quantizing codecs keep in fp16 (attention sinks)",
    )
    dtype: str = Field("float32", description="compute dtype of the model")
    threads: int = Field(0, ge=0, description="torch CPU threads (0 = torch's default)")
    # --- server ---
    host: str = Field("127.0.0.1", description="address `kvcellar serve` listens on")
    port: int = Field(8000, ge=0, le=65535, description="port `kvcellar serve` listens on")
    api_keys: dict[str, str] = Field(
        default_factory=dict,
        description="API key -> tenant; empty = open server, one tenant (env: a JSON object)",
    )
    admin_keys: list[str] = Field(
        default_factory=list, description="API keys that may clear or inspect every tenant"
    )
    max_concurrent_requests: int = Field(
        8, ge=1, description="requests generating at once; later ones wait in the queue"
    )
    max_queued_requests: int = Field(
        256, ge=0, description="requests allowed to wait; beyond that the server answers 429"
    )
    served_model_name: str | None = Field(
        None, description="model id shown in /v1/models (default: the model's name)"
    )
    semantic_cache: bool = Field(
        False, description="answer repeated and paraphrased chat requests from the semantic cache"
    )
    semantic_config: Path | None = Field(
        None, description="YAML file of semantic cache settings (thresholds, categories, ...)"
    )
    semantic_path: str | None = Field(
        None, description="sqlite file of the semantic cache (default <model_cache_dir>/semantic.sqlite)"
    )
    model_cache_dir: Path = Field(
        Path(os.path.expanduser("~/.cache/kvcellar")),
        description="where converted model weights are kept",
    )

    def resolved_disk_path(self) -> Path:
        """The disk tier's directory: ``disk_path``, or ``<model_cache_dir>/kv`` when unset."""
        return self.disk_path if self.disk_path is not None else self.model_cache_dir / "kv"

    @field_validator("memory_bytes", "disk_bytes", mode="before")
    @classmethod
    def _size(cls, v: Any) -> int:
        return parse_size(v)

    @field_validator("memory_codec", "disk_codec", "remote_codec")
    @classmethod
    def _codec(cls, v: str) -> str:
        from kvcellar.kv.codecs import codec_names

        if v not in codec_names():
            raise ValueError(f"unknown codec {v!r}; choose one of {', '.join(codec_names())}")
        return v

    @model_validator(mode="after")
    def _disaggregated(self) -> Settings:
        # A prefill worker must hand over the whole prompt, including its last partial chunk,
        # and a decode worker must look that chunk up.
        if self.role != "both":
            self.save_partial_chunks = True
        return self

    @field_validator("remote_url")
    @classmethod
    def _remote_url(cls, v: str | None) -> str | None:
        if v in (None, ""):
            return None
        scheme = v.split("://", 1)[0] if "://" in v else ""
        allowed = ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster")
        if scheme not in allowed:
            raise ValueError(
                f"{v!r} is not a Redis URL; use redis://host:port/db, rediss://host:port or "
                "redis+cluster://host:port"
            )
        return v

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        allowed = ("float32", "float16", "bfloat16")
        if v not in allowed:
            raise ValueError(f"unknown dtype {v!r}; choose one of {', '.join(allowed)}")
        return v

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Keyword arguments win over the environment; the YAML layer is merged in load().
        return (init_settings, env_settings)

    @classmethod
    def load(cls, config_file: str | Path | None = None, **overrides: Any) -> Settings:
        """Build settings from a YAML file, the environment and keyword overrides.

        ``None`` overrides are ignored so CLI flags that were not given do not mask lower layers.
        Any bad value raises one :class:`ConfigError` naming the setting.
        """
        file_values = _read_yaml(config_file) if config_file else {}
        given = {k: v for k, v in overrides.items() if v is not None}
        env_names = {name for name in cls.model_fields if f"KVCELLAR_{name.upper()}" in os.environ}
        # YAML sits below the environment: drop YAML keys the environment sets.
        merged = {k: v for k, v in file_values.items() if k not in env_names}
        merged.update(given)
        try:
            return cls(**merged)
        except ValidationError as exc:
            raise ConfigError(_explain(exc, config_file)) from None


def _read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {p} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {p} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of setting: value")
    return data


def _explain(exc: ValidationError, config_file: str | Path | None) -> str:
    parts = []
    for err in exc.errors():
        name = ".".join(str(x) for x in err["loc"]) or "settings"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "is not a known setting (see `kvcellar chat --help` or config.py)"
            if name == "codec":
                msg = "was replaced by memory_codec, disk_codec and remote_codec (one per tier)"
        parts.append(f"setting '{name}' (env KVCELLAR_{name.upper()}): {msg}")
    where = f" in {config_file}" if config_file else ""
    return f"invalid configuration{where}: " + "; ".join(parts)
