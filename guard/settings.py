"""Server settings: flags win over GUARD_* environment variables, which win over defaults."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path


def _cache_dir() -> Path:
    return Path(os.environ.get("GUARD_CACHE_DIR", Path.home() / ".cache" / "guard"))


@dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int = 9464  # 0 disables the /metrics endpoint
    # /metrics listen address; empty: the same as `host` (e.g. 127.0.0.1 keeps it local while host is 0.0.0.0).
    metrics_host: str = ""
    # TLS for both doors from PEM files; with tls_client_ca, clients must present a certificate it signed (mTLS).
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    # The OpenAI-compatible HTTP door; -1 disables it, 0 picks a free port.
    http_port: int = 8080
    # API key file (tenants and key hashes), hot-reloaded; unset: open (meant for loopback).
    api_keys: Path | None = None
    # Without a key file: the only policies callers may use (one: a fixed policy); empty: all.
    allow_policies: list[str] = field(default_factory=list)
    policies: Path = Path("policies")
    default_policy: str = "default"
    # Empty: guard starts and manages a local vLLM server on the default model.
    upstream: list[str] = field(default_factory=list)
    # Served model name; empty: the upstream's first model.
    model: str = ""
    # For the managed vLLM: model directory (empty: the bundled Gemma 3 270M, prepared on first use).
    vllm_model_dir: str = ""
    vllm_max_model_len: int = 2048
    vllm_port: int = 0
    grace_seconds: float = 10.0
    # Requests generating or scoring at once, both doors together; more are refused at once
    # (RESOURCE_EXHAUSTED / 429) instead of queueing. 0: unbounded.
    max_in_flight: int = 512
    poll_seconds: float = 0.5
    log_level: str = "INFO"
    # torch intra-op threads for in-process models (safety encoders, CPU reward models). One by default:
    # requests already run concurrently, and several OpenMP threads spin against each other and
    # against vLLM on a small machine (a 10 ms classifier check measured ~20x slower with 2 threads
    # on a loaded 2-core machine).
    torch_threads: int = 1
    cache_dir: Path = field(default_factory=_cache_dir)
    # Processes serving the same ports; more than 1: a supervisor starts them (guard.workers).
    workers: int = 1
    # SO_REUSEPORT on both doors, set by the supervisor for its workers. Off otherwise: a second guard
    # on a taken port must fail to start, not silently take half its traffic.
    reuse_port: bool = False
    # The audit log: a SQLite file, one record per generation request; unset: off (guard has no state
    # directory to default to, and cache_dir may be wiped). Retention every minute: records older than
    # audit_max_age_days, then the oldest beyond audit_max_megabytes; 0: no limit.
    audit_db: Path | None = None
    audit_max_age_days: float = 30.0
    audit_max_megabytes: int = 1024

    def __post_init__(self) -> None:
        self.check_tls()

    def check_tls(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both --tls-cert and --tls-key")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-client-ca (mTLS) needs --tls-cert and --tls-key")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides) -> Settings:
        """GUARD_<FIELD> environment variables, then non-None overrides (flags)."""
        environ = dict(os.environ if environ is None else environ)
        settings = cls()
        for f in fields(cls):
            raw = environ.get(f"GUARD_{f.name.upper()}")
            if raw is not None:
                setattr(settings, f.name, _parse(f.name, raw, getattr(settings, f.name)))
        for name, value in overrides.items():
            if value is not None:
                setattr(settings, name, value)
        settings.check_tls()
        return settings

    def to_env(self) -> dict[str, str]:
        """The GUARD_<FIELD> variables from_env reads back as these settings: how a supervisor configures its workers."""
        env = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool):
                text = "1" if value else "0"
            elif isinstance(value, list):
                text = ",".join(value)
            else:
                text = "" if value is None else str(value)
            env[f"GUARD_{f.name.upper()}"] = text
        return env


OPTIONAL_PATHS = ("api_keys", "tls_cert", "tls_key", "tls_client_ca", "audit_db")


def _parse(name: str, raw: str, current):
    try:
        if isinstance(current, bool):
            return raw.lower() in ("1", "true", "yes")
        if isinstance(current, int):
            return int(raw)
        if isinstance(current, float):
            return float(raw)
        if name in OPTIONAL_PATHS:
            return Path(raw) if raw else None
        if isinstance(current, Path):
            return Path(raw)
        if isinstance(current, list):
            return [item.strip() for item in raw.split(",") if item.strip()]
        return raw
    except ValueError as exc:
        raise ValueError(f"GUARD_{name.upper()}={raw!r}: {exc}") from exc
