from prometheus_client import CollectorRegistry, generate_latest

from saber_sidecar.metrics import DEMOTED, MET, MISSED, SidecarMetrics, SlidingOutcomes
from saber_sidecar.policy.base import PolicyStats


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_sliding_window_drops_old_requests():
    clock = Clock()
    w = SlidingOutcomes(10.0, clock)
    w.add("a", False)
    clock.t += 5
    w.add("a", True)
    w.add("b", True)
    assert w.attainment() == {"a": 0.5, "b": 1.0}
    assert w.goodput() == 2 / 5
    clock.t += 6  # the first request leaves the window
    assert w.attainment() == {"a": 1.0, "b": 1.0}
    clock.t += 100
    assert w.attainment() == {} and w.goodput() == 0.0


def test_exposition_has_every_documented_metric():
    clock = Clock()
    registry = CollectorRegistry()
    stats = PolicyStats(queued_sla=2, queued_best_effort=1, running=5, admission_limit=17,
                        predicted_speed=80.5, speed_model_r2=0.99, speed_model_error_ratio=0.04,
                        engine_speeds={1: 99.0, 64: 20.5}, engine_prefill_seconds_per_token=0.0014,
                        engine_model_confidence=0.75, engine_model_observations=42)
    metrics = SidecarMetrics(registry, lambda: stats, 60.0, clock, targets=lambda: {"qna": 0.9})
    metrics.record("qna", MET, 0.5, 0.05)
    metrics.record("qna", MISSED, 1.5, 0.3)
    metrics.record("qna", DEMOTED, 3.0, None)
    metrics.reloads.labels(result="failure").inc()
    text = generate_latest(registry).decode()
    for line in [
        'saber_requests_total{class="qna",outcome="met"} 1.0',
        'saber_request_duration_seconds_count{class="qna"} 3.0',
        'saber_time_to_first_token_seconds_count{class="qna"} 2.0',
        'saber_sla_attainment_ratio{class="qna"} 0.3333333333333333',
        'saber_sla_window_requests{class="qna"} 3.0',
        'saber_sla_attainment_target_ratio{class="qna"} 0.9',
        'saber_queue_depth{queue="sla"} 2.0',
        'saber_queue_depth{queue="best_effort"} 1.0',
        "saber_running_requests 5.0",
        "saber_admission_limit 17.0",
        "saber_predicted_speed_tokens_per_second 80.5",
        "saber_speed_model_r2 0.99",
        "saber_speed_model_error_ratio 0.04",
        'saber_config_reloads_total{result="failure"} 1.0',
        'saber_config_reloads_total{result="success"} 0.0',
        "saber_goodput_requests_per_second 1.0",
        # The engine model: names agreed with the operator (SaberService status).
        'saber_engine_speed_tokens_per_second{batch="1"} 99.0',
        'saber_engine_speed_tokens_per_second{batch="64"} 20.5',
        "saber_engine_prefill_seconds_per_token 0.0014",
        "saber_engine_model_confidence 0.75",
        "saber_engine_model_observations_total 42.0",
    ]:
        assert line in text, line
