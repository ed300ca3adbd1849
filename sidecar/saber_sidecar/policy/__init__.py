"""Admission policies: pure decision code shared by the sidecar and the simulator.

Both drivers build requests with `request_for` and policies with `make_policy`, so the benchmark
measures exactly what the sidecar ships.
"""

from __future__ import annotations

from saber_sidecar.config import SidecarConfig
from saber_sidecar.policy.base import (
    Action,
    Admit,
    Demote,
    EngineSnapshot,
    Policy,
    PolicyStats,
    Reject,
    Request,
)

__all__ = [
    "Action",
    "Admit",
    "Demote",
    "EngineSnapshot",
    "Policy",
    "PolicyStats",
    "Reject",
    "Request",
    "make_policy",
    "request_for",
]


def make_policy(config: SidecarConfig, seed: int = 0) -> Policy:
    """The policy `config.scheduling.policy` names, built from the config. `seed` feeds any randomness.

    Raises ConfigError (a ValueError) when the config passes the schema but the policy cannot
    use it (e.g. a speed curve with no positive speed at L=1): the caller keeps its old config
    (reload) or exits with the message (startup)."""
    from saber_sidecar.config import ConfigError

    try:
        return _make_policy(config, seed)
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(f"scheduling: {exc}") from exc


def _make_policy(config: SidecarConfig, seed: int) -> Policy:
    name = config.scheduling.policy
    if name == "static":
        from saber_sidecar.policy.static import StaticPolicy

        return StaticPolicy(config)
    if name == "saber-paper":
        from saber_sidecar.policy.paper import PaperPolicy

        return PaperPolicy(config, seed=seed)
    if name == "saber":
        from saber_sidecar.policy.saber import SaberPolicy

        return SaberPolicy(config)
    raise ValueError(f"unknown policy {name!r}; use saber, saber-paper or static")


def request_for(
    config: SidecarConfig,
    class_name: str,
    id: str,
    arrival: float,
    max_tokens: int,
    prompt_tokens: int = 0,
    deadline: float | None = None,
) -> Request:
    """A policy `Request` for a request of SLA class `class_name` arriving at `arrival`.

    The deadline is `arrival + deadline_seconds` unless given; the expected output length is the
    class's `output_tokens` (capped by `max_tokens`) or `max_tokens`; TTFT and TPOT targets and the
    on-miss behaviour come from the class.
    """
    cls = config.get_class(class_name)
    if cls is None:
        names = ", ".join(c.name for c in config.classes)
        raise ValueError(f"unknown SLA class {class_name!r}; configured classes: {names}")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
    if prompt_tokens < 0:
        raise ValueError(f"prompt_tokens must not be negative, got {prompt_tokens}")
    if deadline is not None and deadline <= arrival:
        raise ValueError(f"deadline {deadline} is not after arrival {arrival}")
    expected = min(max_tokens, cls.output_tokens) if cls.output_tokens else max_tokens
    return Request(
        id=id,
        sla_class=cls.name,
        arrival=arrival,
        deadline=arrival + cls.deadline_seconds if deadline is None else deadline,
        max_tokens=max_tokens,
        expected_tokens=expected,
        prompt_tokens=prompt_tokens,
        on_miss=cls.on_miss,
        ttft_deadline=arrival + cls.ttft_seconds if cls.ttft_seconds is not None else None,
        tpot_target=cls.tpot_seconds,
    )
