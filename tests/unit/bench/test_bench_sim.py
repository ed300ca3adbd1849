"""The simulator drives the sidecar's real policies over the emulator's real engine model."""

import pytest

from saber_bench.metrics import run_stats
from saber_bench.policies import build_policy, config_for_workload, request_builder, sidecar_config
from saber_bench.sim import default_engine, simulate
from saber_bench.workloads import PAPER_TASKS, RequestSpec, make_workload
from saber_emulator.profile import load_profile
from saber_sidecar.config import SchedulingConfig, SidecarConfig, SLAClass


def spec(i, arrival, cls="generation"):
    t = PAPER_TASKS[cls]
    return RequestSpec(f"r{i}", cls, arrival, t.sla_s, "p" * t.prompt_chars, t.prompt_chars // 4, t.max_tokens, t.max_tokens)


def run(specs, policy="static-10", config=None):
    config = config or config_for_workload(policy, "W1")
    return simulate(specs, build_policy(policy, config, 0), default_engine(), request_builder(policy, config))


def test_one_request_takes_prefill_plus_decode_steps_of_the_profile():
    profile = load_profile(None)
    s = spec(0, 1.0)
    rec = run([s]).records[0]
    first = profile.step_time(0, s.prompt_tokens)
    expected = first + (s.output_tokens - 1) * profile.decode_time(1)
    assert rec.first_token_at - s.arrival == pytest.approx(first)
    assert rec.finished_at - s.arrival == pytest.approx(expected)
    assert rec.output_tokens == s.output_tokens and rec.admitted_at == s.arrival


def test_static_cap_serializes_requests_fifo():
    specs = [spec(i, 0.0) for i in range(3)]
    records = run(specs, "static-1", config_for_workload("static-1", "W1")).records
    starts = [r.admitted_at for r in records]
    assert starts[0] == 0.0
    assert records[0].finished_at == pytest.approx(starts[1])
    assert records[1].finished_at == pytest.approx(starts[2])


def test_queue_overflow_is_rejected_and_counts_as_a_miss():
    config = SidecarConfig(
        classes=[SLAClass(name="generation", deadline_seconds=8.0, output_tokens=387)],
        default_class="generation",
        scheduling=SchedulingConfig(policy="static", static_max_concurrency=1, max_queue=1),
    )
    records = run([spec(i, 0.0) for i in range(4)], "static-1", config).records
    assert [r.rejected for r in records] == [False, False, True, True]
    st = run_stats(records)
    assert st.rejected == 2 and st.goodput <= 0.5


@pytest.mark.parametrize("policy", ["static-30", "saber-paper", "saber", "saber-oracle"])
def test_every_request_ends_served_or_rejected(policy):
    specs = make_workload("W3", 10, seed=0)
    result = run(specs, policy, config_for_workload(policy, "W3"))
    assert len(result.records) == 100
    assert all(r.served or r.rejected for r in result.records)
    assert all(r.finished_at >= r.arrival for r in result.records if r.served)
    assert result.policy_calls >= 100


def test_same_inputs_give_the_same_result():
    specs = make_workload("W1", 8, seed=1)
    a = run_stats(run(specs, "saber-paper", config_for_workload("saber-paper", "W1")).records)
    b = run_stats(run(specs, "saber-paper", config_for_workload("saber-paper", "W1")).records)
    assert a == b


def test_policy_configs():
    assert sidecar_config("static-40", PAPER_TASKS).scheduling.static_max_concurrency == 40
    assert config_for_workload("saber-oracle", "W1").scheduling.policy == "saber"
    humaneval = config_for_workload("saber", "humaneval")
    assert humaneval.classes[0].output_tokens is None  # saber must estimate it
    with pytest.raises(ValueError, match="unknown policy"):
        sidecar_config("fifo", PAPER_TASKS)


def test_a_policy_that_never_lets_time_advance_is_reported_not_looped_on():
    """A test double wrapping the real static policy: it asks to be woken at its last instant forever."""
    from saber_bench.sim import SimulationError

    config = config_for_workload("static-10", "W1")
    inner = build_policy("static-10", config, 0)

    class StuckWake:
        name = "stuck-wake"

        def __init__(self):
            self.now = 0.0

        def __getattr__(self, attr):
            return getattr(inner, attr)

        def submit(self, req, now):
            self.now = now
            return []  # never admits: the request waits for a wake that decides nothing

        def wake(self, now):
            return []

        def next_wake(self):
            return self.now

    with pytest.raises(SimulationError, match="never lets time advance"):
        simulate([spec(0, 1.0)], StuckWake(), default_engine(), request_builder("static-10", config))
