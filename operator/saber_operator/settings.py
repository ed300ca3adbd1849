"""The operator's own settings (environment variables with prefix SABER_OPERATOR_)."""

from __future__ import annotations

from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from saber_operator.builders import DEFAULT_ENGINE_SCRAPERS, DEFAULT_SABER_IMAGE


class OperatorSettings(BaseSettings):
    """Built in `main()` and passed in; nothing reads the environment at import time."""

    model_config = SettingsConfigDict(env_prefix="SABER_OPERATOR_", extra="ignore")

    timer_interval_seconds: float = Field(
        default=30.0, ge=0.1, le=3600, description="How often each SaberService is re-reconciled and its status refreshed."
    )
    retry_backoff_seconds: float = Field(
        default=5.0, ge=0.05, le=600, description="Delay before a failed reconcile is retried."
    )
    scrape_timeout_seconds: float = Field(default=2.0, gt=0, le=60, description="Per-pod metrics scrape timeout.")
    api_timeout_seconds: float = Field(default=10.0, gt=0, le=300, description="Kubernetes API request timeout.")
    saber_image: str = Field(default=DEFAULT_SABER_IMAGE, description="Image for sidecars and the emulator engine.")
    servicemonitor: bool = Field(default=True, description="Create a ServiceMonitor when its CRD is installed.")
    events: bool = Field(default=True, description="Post Kubernetes events on condition transitions.")
    network_policy: bool = Field(
        default=True,
        description="Give each SaberService a NetworkPolicy: the sidecar port open, the engine port only to "
        "calibration pods and engine scrapers (needs a CNI that enforces NetworkPolicy).",
    )
    engine_metrics_from: list[dict[str, Any]] = Field(
        default_factory=lambda: [dict(p) for p in DEFAULT_ENGINE_SCRAPERS],
        max_length=16,
        description="NetworkPolicy peers (JSON) admitted to the engine's port to scrape vLLM's metrics; "
        "default: pods app.kubernetes.io/name=prometheus in namespace monitoring; [] admits none.",
    )
    namespaces: list[str] = Field(default_factory=list, description="Namespaces to serve; empty: all.")
    peering: bool = Field(default=False, description="Coordinate replicas through kopf peering: one active at a time.")
    peering_name: str = Field(default="saber-operator", description="ClusterKopfPeering object to use.")
    priority: int | None = Field(
        default=None, ge=0, le=2**31, description="Peering priority; unset: random, so equal replicas never tie."
    )
    liveness_endpoint: str | None = Field(
        default=None, description="kopf's liveness endpoint, e.g. http://0.0.0.0:8080/healthz."
    )
    api_server: str | None = Field(
        default=None,
        description="Talk to this API URL without credentials (API emulators in tests); unset: in-cluster or kubeconfig.",
    )
