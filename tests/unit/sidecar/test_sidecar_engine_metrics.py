import pytest

from saber_sidecar.engine_metrics import EngineMetricsError, parse_engine_metrics

# Shape of vLLM v1 (0.8+) output: two engines, new cache metric name.
NEW = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 2.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 1.0
vllm:num_requests_waiting{engine="1",model_name="m"} 0.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.5
# HELP vllm:generation_tokens_total Number of generation tokens processed.
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{engine="0",model_name="m"} 1234.0
"""

# Older vLLM (0.6): the GPU cache name.
OLD = """# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="m"} 7.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="m"} 4.0
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{model_name="m"} 0.9
"""


def test_new_names_sum_counts_and_take_max_usage():
    snap = parse_engine_metrics(NEW)
    assert (snap.running, snap.waiting, snap.kv_cache_usage, snap.healthy) == (5, 1, 0.5, True)


def test_old_cache_name_is_the_fallback():
    snap = parse_engine_metrics(OLD)
    assert (snap.running, snap.waiting, snap.kv_cache_usage) == (7, 4, pytest.approx(0.9))


def test_missing_metrics_are_named():
    with pytest.raises(EngineMetricsError, match="vllm:num_requests_waiting"):
        parse_engine_metrics("# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running 1\n")


def test_garbage_is_refused():
    with pytest.raises(EngineMetricsError):
        parse_engine_metrics("this is { not prometheus")
