"""Process settings of the sidecar (where it listens, where the engine is, limits and timers).

Read from the environment with prefix `SABER_SIDECAR_` (e.g. `SABER_SIDECAR_ENGINE_URL`) and
overridden by command-line flags; built once in `main()` and passed in, never read at import.
The SLA classes and the policy are not here: they live in the hot-reloadable config file.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class SidecarSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SABER_SIDECAR_", extra="ignore")

    host: str = Field(default="0.0.0.0", description="Address to listen on.")
    port: int = Field(default=8080, ge=0, le=65535, description="Port to listen on; 0 picks a free one.")
    engine_url: str = Field(default="http://127.0.0.1:8000", description="Base URL of the vLLM engine.")
    engine_model: str | None = Field(
        default=None,
        max_length=512,
        description="Model name the engine serves; requests that use a class alias are rewritten to it. "
        "When unset it is read from the engine's /v1/models.",
    )
    config_path: str | None = Field(
        default=None, description="SLA class config (YAML); when unset, the paper's four classes."
    )
    reload_interval_s: float = Field(default=1.0, gt=0, le=300, description="How often the config file is checked.")
    scrape_interval_s: float = Field(
        default=0.5, gt=0, le=60, description="How often the engine's /metrics is scraped."
    )
    scrape_timeout_s: float = Field(default=2.0, gt=0, le=60, description="Timeout of one /metrics scrape.")
    max_body_bytes: int = Field(
        default=4 * 1024 * 1024, ge=1024, le=1024 * 1024 * 1024, description="Largest request body accepted (413 above)."
    )
    default_max_tokens: int = Field(
        default=512,
        ge=1,
        le=1_000_000,
        description="Token budget assumed for a request that sets no max_tokens and whose class has no output_tokens.",
    )
    connect_timeout_s: float = Field(default=5.0, gt=0, le=300, description="Timeout to connect to the engine.")
    read_timeout_s: float = Field(
        default=600.0, gt=0, le=86_400, description="Longest silence from the engine inside one response."
    )
    pool_size: int = Field(
        default=1024,
        ge=1,
        le=100_000,
        description="Most idle keep-alive connections kept open to the engine (set it at or above the expected "
        "concurrency, so connections are reused rather than reopened).",
    )
    header_timeout_s: float = Field(
        default=10.0,
        gt=0,
        le=600,
        description="A client must send a whole request head within this many seconds of its first byte (of "
        "connecting, for a connection's first request), or it gets a 408 and the connection is closed: a client "
        "trickling a head byte by byte (slowloris) cannot hold a socket longer.",
    )
    body_timeout_s: float = Field(
        default=60.0,
        gt=0,
        le=3600,
        description="Longest time to receive a request's body once its head has arrived (408 above).",
    )
    idle_timeout_s: float = Field(
        default=60.0,
        gt=0,
        le=3600,
        description="A kept-alive client connection with no request in progress is closed after this many seconds "
        "(aiohttp's own default is an hour). A proxy that pools connections to the sidecar (an Envoy-based "
        "gateway keeps them up to an hour by default) should close idle ones sooner than this, or it may send a "
        "request on a connection the sidecar is closing.",
    )
    max_connections: int = Field(
        default=4096,
        ge=1,
        le=1_000_000,
        description="Most client connections open at once; past it a new connection gets a 503 and is closed. Keep "
        "it below the process's file-descriptor limit (`ulimit -n`) less the engine pool's connections.",
    )
    retry_after_s: int = Field(default=1, ge=1, le=3600, description="Retry-After sent with 503 responses.")
    drain_grace_s: float = Field(
        default=30.0, ge=0, le=3600, description="On SIGTERM, how long in-flight requests may take before exit."
    )
    attainment_window_s: float = Field(
        default=300.0, gt=0, le=86_400, description="Sliding window of saber_sla_attainment_ratio and goodput."
    )
    best_effort_priority: int = Field(
        default=10,
        ge=1,
        le=1_000_000,
        description="vLLM `priority` sent with best-effort requests when the engine schedules by priority "
        "(larger is served later; SLA requests keep the default 0).",
    )

    event_loop: Literal["auto", "uvloop", "asyncio"] = Field(
        default="auto",
        description="Event loop: uvloop relays streams with about half the CPU of asyncio's; `auto` uses it "
        "when installed (the sidecar extra installs it), `asyncio` forces the standard loop.",
    )

    @field_validator("engine_url")
    @classmethod
    def _strip_slash(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("engine_url must start with http:// or https://")
        return value.rstrip("/")
