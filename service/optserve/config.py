"""Every setting of the server, read from OPTSERVE_* environment variables in one place."""

from __future__ import annotations

import ipaddress
import socket
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Server settings; the README's settings table lists the same names and defaults."""

    model_config = SettingsConfigDict(env_prefix="OPTSERVE_", extra="ignore")

    redis_url: str | None = Field(
        default=None,
        description="Redis/Valkey URL. Unset: start the embedded Valkey with data in data_dir.",
    )
    redis_cluster: bool | None = Field(
        default=None,
        description="true: the Redis URL is one node of a Redis Cluster (use the cluster client); "
        "false: a single server; unset: ask the server (INFO cluster) at startup. A reachable "
        "store that says otherwise stops the startup.",
    )
    data_dir: Path = Field(
        default=Path(".optserve"), description="Embedded store's files (AOF, config, log, lock)."
    )
    host: str = Field(default="127.0.0.1", description="Address `optserve serve` binds.")
    port: int = Field(default=8000, ge=0, le=65535, description="Port `optserve serve` binds.")
    fsync: Literal["everysec", "always"] = Field(
        default="everysec",
        description="always: each acknowledgement waits for the store's AOF fsync (WAITAOF).",
    )
    store_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="A store command unanswered this long fails with 503 store_unavailable.",
    )
    max_body_bytes: int = Field(
        default=256 * 2**20, gt=0, description="Largest request body; larger gets 413."
    )
    max_json_body_bytes: int = Field(
        default=32 * 2**20,
        gt=0,
        description="Largest JSON request body; larger gets 413. JSON is parsed whole into "
        "Python objects (up to about 33x its size in memory, measured), so it has a smaller "
        "bound than safetensors, which is decoded in place.",
    )
    long_poll_max_s: float = Field(
        default=60.0, gt=0, description="Upper bound of `wait_s` on GET params."
    )
    group_commit: bool = Field(
        default=True,
        description="Apply queued pushes of a session as one batch (one load, one commit).",
    )
    idempotency_ttl_s: float = Field(
        default=86_400.0, gt=0, description="How long an Idempotency-Key's response is kept."
    )
    session_ttl_s: float | None = Field(
        default=None,
        ge=0.1,
        description="Idle TTL of sessions created without `ttl_s` (unset: they never expire).",
    )
    max_session_ttl_s: float | None = Field(
        default=None,
        ge=0.1,
        description="Largest `ttl_s` a session may have; set, every session must expire.",
    )
    sweep_interval_s: float = Field(
        default=60.0,
        gt=0,
        description="How often expired sessions' index entries and leftover keys are cleared.",
    )
    cors_origins: list[str] = Field(
        default_factory=list,
        description="Browser origins allowed to call the API (JSON list, e.g. "
        '["https://app.example"]); empty: no CORS headers.',
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    log_format: Literal["json", "text"] = Field(
        default="json",
        description="json: one JSON object per line on stderr; text: for reading in a terminal.",
    )
    shutdown_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="On SIGTERM, how long requests in flight may take to finish before they are "
        "cancelled (and again for queued pushes and rounds to commit).",
    )
    # -- who may call, and how much (auth.py, engine/limits.py) --
    api_keys: SecretStr | None = Field(
        default=None,
        description='Static API keys as tenant:key pairs, e.g. "team-a:k1...,team-b:k2..." '
        "(keys of 16+ characters). Stored keys: `optserve keys create`.",
    )
    api_key_cache_s: float = Field(
        default=1.0, ge=0, description="How long a stored key's record is cached per process "
        "(a revoked key stops working within this time).",
    )
    rate_limit_per_s: float = Field(
        default=0.0, ge=0, description="Requests per second per API key, shared by every "
        "replica through Redis (429 rate_limited beyond); 0: no limit.",
    )
    rate_limit_burst: int | None = Field(
        default=None, ge=1, description="Requests a key may send at once; unset: one second's "
        "worth.",
    )
    max_tensors_per_session: int = Field(default=10_000, ge=1, description="422 beyond.")
    max_elements_per_tensor: int = Field(default=2**28, ge=1, description="413 beyond.")
    max_elements_per_session: int = Field(default=2**29, ge=1, description="413 beyond.")
    max_tensor_name_length: int = Field(default=256, ge=1, description="422 beyond.")
    max_sessions_per_tenant: int = Field(default=1_000, ge=1, description="422 beyond.")
    engine: Literal["write-through", "hot"] = Field(
        default="write-through",
        description="write-through: every push reads and writes the state in Redis. hot: the "
        "owning process keeps the session in memory and logs each push to Redis.",
    )
    advertise_url: str | None = Field(
        default=None,
        description="hot engine: the URL other replicas forward a session's requests to when "
        "this process owns it. Unset: http://<host>:<port> (the hostname if bound to all).",
    )
    hot_lease_ms: int = Field(
        default=2_000, ge=100, description="hot engine: ownership lease (takeover after this)."
    )
    hot_snapshot_steps: int = Field(
        default=32, ge=1, description="hot engine: snapshot after this many log entries."
    )
    hot_snapshot_s: float = Field(
        default=5.0, gt=0, description="hot engine: ... or after this many seconds."
    )

    @property
    def own_url(self) -> str:
        """Where other replicas reach this process (the hot engine's forwarding)."""
        if self.advertise_url:
            return self.advertise_url.rstrip("/")
        host = self.host
        if host in ("0.0.0.0", "::", ""):
            host = socket.gethostname()
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        """True when `host` only accepts local connections."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


@lru_cache
def get_settings() -> Settings:
    return Settings()
