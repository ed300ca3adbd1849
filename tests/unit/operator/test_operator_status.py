"""Status logic: sidecar metrics parsing and aggregation, conditions, transitions."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from saber_operator.reconcile import contains
from saber_operator.spec import Condition
from saber_operator.status import (
    aggregate,
    deployment_conditions,
    engine_model_status,
    event_type,
    merge_conditions,
    parse_sidecar_metrics,
    sla_condition,
    status_dict,
    transitions,
)
from saber_sidecar.config import SidecarConfig


def sidecar_text(attain: dict[str, float], counts: dict[str, tuple[int, int]], goodput: float, limit: int) -> str:
    registry = CollectorRegistry()
    a = Gauge("saber_sla_attainment_ratio", "x", ["class"], registry=registry)
    r = Counter("saber_requests", "x", ["class", "outcome"], registry=registry)
    Gauge("saber_goodput_requests_per_second", "x", registry=registry).set(goodput)
    Gauge("saber_admission_limit", "x", registry=registry).set(limit)
    for name, value in attain.items():
        a.labels(name).set(value)
    for name, (met, missed) in counts.items():
        r.labels(name, "met").inc(met)
        r.labels(name, "missed").inc(missed)
    return generate_latest(registry).decode()


CONFIG = SidecarConfig.model_validate({
    "classes": [{"name": "fast", "deadline_seconds": 1, "target_attainment": 0.9}, {"name": "slow", "deadline_seconds": 10}],
    "default_class": "slow",
})


def test_parse_and_weighted_aggregate():
    pod1 = parse_sidecar_metrics(sidecar_text({"fast": 1.0, "slow": 0.5}, {"fast": (30, 0), "slow": (5, 5)}, 2.0, 16))
    pod2 = parse_sidecar_metrics(sidecar_text({"fast": 0.8}, {"fast": (8, 2)}, 1.5, 8))
    assert pod1.requests == {"fast": 30, "slow": 10}
    figures = aggregate(CONFIG, [pod1, pod2])
    by = {c.name: c for c in figures.classes}
    assert by["fast"].attainment == pytest.approx((1.0 * 30 + 0.8 * 10) / 40)
    assert by["slow"].attainment == pytest.approx(0.5) and by["slow"].requests == 10
    assert figures.overall == pytest.approx((0.95 * 40 + 0.5 * 10) / 50)
    assert figures.goodput == pytest.approx(3.5) and figures.admission_limit == 24


def test_sla_condition():
    none = aggregate(CONFIG, [])
    assert sla_condition(none, 3).status == "Unknown" and sla_condition(none, 3).reason == "NoData"
    ok = aggregate(CONFIG, [parse_sidecar_metrics(sidecar_text({"fast": 0.95, "slow": 0.99}, {}, 1, 1))])
    assert sla_condition(ok, 3).status == "True"
    bad = aggregate(CONFIG, [parse_sidecar_metrics(sidecar_text({"fast": 0.5}, {}, 1, 1))])
    cond = sla_condition(bad, 3)
    assert cond.status == "False" and "fast 0.500 < 0.900" in cond.message and cond.observed_generation == 3


def test_deployment_conditions():
    conds, replicas, ready = deployment_conditions(2, None, 1)
    assert {c.type: c.status for c in conds} == {"Ready": "False", "Progressing": "True", "Degraded": "False"}
    dep = {"metadata": {"generation": 4}, "status": {"observedGeneration": 4, "replicas": 2, "readyReplicas": 2, "updatedReplicas": 2}}
    conds, replicas, ready = deployment_conditions(2, dep, 1)
    assert {c.type: c.status for c in conds} == {"Ready": "True", "Progressing": "False", "Degraded": "False"}
    assert (replicas, ready) == (2, 2)
    stale = {"metadata": {"generation": 5}, "status": dep["status"]}
    assert {c.type: c.status for c in deployment_conditions(2, stale, 1)[0]}["Progressing"] == "True"
    stuck = {"metadata": {"generation": 4}, "status": {**dep["status"], "readyReplicas": 1, "conditions": [
        {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded", "message": "timed out"}]}}
    degraded = {c.type: c for c in deployment_conditions(2, stuck, 1)[0]}["Degraded"]
    assert degraded.status == "True" and degraded.reason == "RolloutStuck"


def test_transition_times_and_events():
    old = [{"type": "Ready", "status": "False", "reason": "X", "lastTransitionTime": "2020-01-01T00:00:00Z"}]
    same = [Condition(type="Ready", status="False", reason="Y")]
    assert merge_conditions(old, same, "NOW")[0].last_transition_time == "2020-01-01T00:00:00Z"
    assert transitions(old, same) == []
    flipped = [Condition(type="Ready", status="True", reason="AllReplicasReady")]
    assert merge_conditions(old, flipped, "NOW")[0].last_transition_time == "NOW"
    assert transitions(old, flipped) == flipped and event_type(flipped[0]) == "Normal"
    assert event_type(Condition(type="Degraded", status="True", reason="InvalidSpec")) == "Warning"


def test_contains_ignores_server_defaults():
    desired = {"spec": {"ports": [{"port": 80, "name": "http"}], "replicas": 1}}
    live = {"spec": {"ports": [{"port": 80, "name": "http", "protocol": "TCP"}], "replicas": 1, "extra": True}}
    assert contains(live, desired)
    assert not contains({"spec": {"ports": [], "replicas": 1}}, desired)
    assert not contains({"spec": {"ports": [{"port": 81, "name": "http"}], "replicas": 1}}, desired)
    assert contains({"cpu": 1}, {"cpu": "1"})


def test_pods_are_weighted_by_their_attainment_window_not_their_lifetime():
    """Two real sidecar metric sets: an old pod with a long, good history and a recent good
    window, and a new pod whose window is all misses. Each window holds 10 requests, so the
    service's attainment is their plain mean, whatever the old pod's lifetime count."""
    from saber_sidecar.metrics import MET, MISSED, SidecarMetrics
    from saber_sidecar.policy.base import PolicyStats

    def pod(history: int, recent: str) -> str:
        now = [0.0]
        registry = CollectorRegistry()
        metrics = SidecarMetrics(registry, PolicyStats, window_s=60.0, clock=lambda: now[0])
        for _ in range(history):
            metrics.record("fast", MET, 0.5)
        now[0] = 100.0  # the history has left the window
        for _ in range(10):
            metrics.record("fast", recent, 0.5)
        return generate_latest(registry).decode()

    old, new = parse_sidecar_metrics(pod(990, MET)), parse_sidecar_metrics(pod(0, MISSED))
    assert old.requests["fast"] == 1000 and old.window_requests["fast"] == 10
    fast = {c.name: c for c in aggregate(CONFIG, [old, new]).classes}["fast"]
    assert fast.attainment == pytest.approx(0.5)
    assert fast.requests == 1010


def engine_text(speed: dict[int, float], prefill: float, confidence: float | None, observations: int) -> str:
    """A sidecar's learned engine model as it exports it (the names agreed with the sidecar)."""
    registry = CollectorRegistry()
    v = Gauge("saber_engine_speed_tokens_per_second", "x", ["batch"], registry=registry)
    for batch, tps in speed.items():
        v.labels(str(batch)).set(tps)
    Gauge("saber_engine_prefill_seconds_per_token", "x", registry=registry).set(prefill)
    if confidence is not None:
        Gauge("saber_engine_model_confidence", "x", registry=registry).set(confidence)
    Counter("saber_engine_model_observations", "x", registry=registry).inc(observations)
    return generate_latest(registry).decode()


def test_engine_model_is_the_confidence_weighted_mean_of_the_pods():
    learned = parse_sidecar_metrics(engine_text({1: 40.0, 4: 30.0, 16: 12.0}, 0.0014, 0.9, 300))
    fresh = parse_sidecar_metrics(engine_text({1: 100.0, 4: 90.0}, 0.00005, 0.1, 5))
    assert learned.speed == {1: 40.0, 4: 30.0, 16: 12.0}
    assert learned.prefill_seconds_per_token == pytest.approx(0.0014)
    assert learned.confidence == pytest.approx(0.9) and learned.observations == 300
    # A pod with no engine model metrics (an older sidecar) is left out, not counted as zeros.
    older = parse_sidecar_metrics(sidecar_text({"fast": 1.0}, {}, 1.0, 4))
    model = engine_model_status([learned, fresh, older])
    assert model.pods == 2 and model.observations == 305
    assert model.confidence == pytest.approx(0.5)
    assert model.speed_tokens_per_second["1"] == pytest.approx((40 * 0.9 + 100 * 0.1) / 1.0)
    assert model.speed_tokens_per_second["4"] == pytest.approx((30 * 0.9 + 90 * 0.1) / 1.0)
    assert model.speed_tokens_per_second["16"] == pytest.approx(12.0)  # only the learned pod has it
    assert model.prefill_seconds_per_token == pytest.approx(0.0014 * 0.9 + 0.00005 * 0.1)
    # Nobody confident yet: a plain mean.
    cold = [parse_sidecar_metrics(engine_text({1: 10.0}, 0.001, 0.0, 0)),
            parse_sidecar_metrics(engine_text({1: 30.0}, 0.003, 0.0, 0))]
    cold_model = engine_model_status(cold)
    assert cold_model.speed_tokens_per_second == {"1": pytest.approx(20.0)}
    assert cold_model.prefill_seconds_per_token == pytest.approx(0.002) and cold_model.confidence == 0.0
    assert engine_model_status([older]) is None and engine_model_status([]) is None
    # It fits the status schema (keys are batch sizes as strings) and round-trips.
    from saber_operator.spec import SaberServiceStatus
    status = SaberServiceStatus(engine_model=model)
    dumped = status_dict(status)["engineModel"]
    assert dumped["speedTokensPerSecond"]["16"] == pytest.approx(12.0) and dumped["pods"] == 2


def test_calibration_failure_is_a_warning():
    assert event_type(Condition(type="Calibrated", status="False", reason="JobFailed")) == "Warning"
    assert event_type(Condition(type="Calibrated", status="Unknown", reason="Running")) == "Normal"
