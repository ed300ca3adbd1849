"""saber: our policy. The speed curve is v(L) = 100 - L and margins are 0 unless a test sets them,
so each expected decision can be checked by hand."""

import pytest

from policy_support import fmt
from saber_sidecar.config import SaberSchedulingConfig, SidecarConfig
from saber_sidecar.policy import Admit, EngineSnapshot, Reject, make_policy, request_for
from saber_sidecar.policy.engine_model import EngineModel
from saber_sidecar.policy.estimates import OutputEstimate
from saber_sidecar.policy.saber import SaberPolicy
from saber_sidecar.policy.saber_tuning import Tuning
from saber_sidecar.speed_model import SpeedModel

# `output_tokens` far above any max_tokens used here: each request is expected to produce its
# max_tokens, and the class counts as sized (no cold start), so decisions can be checked by hand.
# `est` states none (it learns); `cold` states none and has never finished a request; `rejcold`
# is a reject class that states none.
SIZED = 1_000_000
CLASSES = [
    {"name": "loose", "deadline_seconds": 100, "output_tokens": SIZED},
    {"name": "tight", "deadline_seconds": 1.0, "output_tokens": SIZED},
    {"name": "rej", "deadline_seconds": 1.0, "on_miss": "reject", "output_tokens": SIZED},
    {"name": "rejcold", "deadline_seconds": 1.0, "on_miss": "reject"},
    {"name": "ttft", "deadline_seconds": 10, "ttft_seconds": 0.5, "output_tokens": SIZED},
    {"name": "tpot", "deadline_seconds": 100, "tpot_seconds": 0.0103, "output_tokens": SIZED},  # needs 97.09 tok/s
    {"name": "est", "deadline_seconds": 1.0},
    {"name": "cold", "deadline_seconds": 4.0},
]


# Margins, load shedding, slack reserve, prefill cost, the at-risk and light-load leniencies
# and the best-effort wait bound are off unless a test turns them on, so the base decisions
# stay checkable by hand. Settings go to the config; the internal constants (saber_tuning.py) to
# `Tuning`; `prefill_seconds_per_token` is the engine model's prior prefill cost.
OFF = {"deadline_margin_seconds": 0, "speed_headroom": 0, "output_min_samples": 4,
       "shed_batch_fraction": 0, "slack_reserve_share": 0, "prefill_seconds_per_token": 0,
       "at_risk_slack_share": 0, "light_load": 0, "best_effort_max_wait_slas": 0}


def _split(params):
    params = {**OFF, **params}
    knobs = {k: v for k, v in params.items() if k in SaberSchedulingConfig.model_fields}
    tuning = {k: v for k, v in params.items() if k in Tuning.__dataclass_fields__}
    assert set(knobs) | set(tuning) | {"prefill_seconds_per_token"} == set(params), params
    return knobs, Tuning(**tuning), params["prefill_seconds_per_token"]


def config(**saber):
    return SidecarConfig.model_validate(
        {
            "classes": CLASSES,
            "default_class": "loose",
            "scheduling": {
                "policy": "saber",
                "max_queue": 100,
                "speed_model": {"form": "linear", "params": [100, -1], "online_refit": False},
                "saber": _split(saber)[0],
            },
        }
    )


def policy_for(cfg, **saber):
    """saber on `cfg` with the test's internal constants and prior prefill cost."""
    _, tuning, prefill = _split(saber)
    sm = cfg.scheduling.speed_model
    model = EngineModel.from_speed_table(SpeedModel.from_config(sm, online_refit=False).table, prefill,
                                         online=sm.online_refit)
    return SaberPolicy(cfg, tuning, model)


class Driver:
    def __init__(self, **saber):
        self.saber = saber
        self.cfg = config(**saber)
        self.pol = self.build()
        assert isinstance(make_policy(self.cfg), SaberPolicy)

    def build(self):
        return policy_for(self.cfg, **self.saber)

    def submit(self, cls, rid, t, max_tokens, deadline=None):
        return fmt(self.pol.submit(request_for(self.cfg, cls, rid, t, max_tokens, deadline=deadline), t))

    def finish(self, rid, t, tokens=10, first_token_at=None):
        return fmt(self.pol.finished(rid, t, tokens, first_token_at))

    def wake(self, t):
        return fmt(self.pol.wake(t))

    def blocker(self):
        """One running request that any extra request would push past its deadline.

        990 tokens alone take 990/99 = 10.0 s; one more request slows it by at least
        1/98 - 1/99 ≈ 0.0001 s, more than its 0.00005 s of slack.
        """
        margin = self.cfg.scheduling.saber.deadline_margin_seconds
        assert self.submit("loose", "A", 0.0, 990, deadline=10.00005 + margin) == "admit:A"


def test_admits_at_once_when_feasible():
    d = Driver()
    assert d.submit("loose", "a", 0.0, 10) == "admit:a"
    assert d.submit("tight", "b", 0.0, 50) == "admit:b"
    assert d.pol.next_wake() is None


def test_holds_a_request_that_would_push_a_running_one_late_then_admits_on_finish():
    d = Driver()
    d.blocker()
    assert d.submit("loose", "B", 0.0, 200) == ""
    assert d.pol.stats().queued_sla == 1
    assert d.finish("A", 10.0, 990) == "admit:B"


def test_earliest_deadline_first():
    d = Driver()
    d.blocker()
    assert d.submit("loose", "C", 0.0, 10, deadline=50.0) == ""
    assert d.submit("loose", "D", 0.1, 10, deadline=20.0) == ""
    assert d.finish("A", 10.0, 990) == "admit:D admit:C"


def test_lookahead_admits_past_a_head_that_needs_a_lighter_batch():
    d = Driver()
    # Three long requests with plenty of time keep L at 3: v(4) = 96.
    for i in range(3):
        assert d.submit("loose", f"bg{i}", 0.0, 5000) == f"admit:bg{i}"
    # The head (earliest deadline) needs 97.0 tok/s: it only fits a lighter batch.
    assert d.submit("loose", "head", 0.0, 97, deadline=1.0) == ""
    # A later-deadline request behind it fits now.
    assert d.submit("loose", "small", 0.0, 10, deadline=2.0) == "admit:small"
    assert d.pol.stats().queued_sla == 1


@pytest.mark.parametrize(
    "cls, expected",
    [
        # 500 tokens in 1 s needs 500 tok/s > v(1) = 99: hopeless on arrival.
        ("tight", "demote:x be:x"),  # demoted, and the idle engine takes it as best effort
        ("rej", "reject:x"),  # rejected at once
    ],
)
def test_hopeless_on_arrival_demote_or_reject_by_class(cls, expected):
    d = Driver()
    assert d.submit(cls, "x", 0.0, 500) == expected


def test_reject_carries_retry_after_and_reason():
    d = Driver()
    d.blocker()
    acts = d.pol.submit(request_for(d.cfg, "rej", "r", 0.0, 500), 0.0)
    assert len(acts) == 1 and isinstance(acts[0], Reject)
    assert 0.1 <= acts[0].retry_after_s <= 60 and "single-request speed" in acts[0].reason


def test_reject_class_is_rejected_at_once_when_predicted_too_late():
    d = Driver()
    for i in range(60):  # L = 60: v(61) = 39 tok/s, and nothing finishes for ~2 minutes
        d.submit("loose", f"bg{i}", 0.0, 5000, deadline=1000.0)
    # 90 tokens in 1 s could be done alone (v(1) = 99), but not before the batch drains.
    acts = d.pol.submit(request_for(d.cfg, "rej", "r", 0.0, 90), 0.0)
    assert fmt(acts) == "reject:r"
    assert acts[0].reason == "predicted to miss its deadline" and acts[0].retry_after_s == 60.0
    # The same request of a demote class waits until it is hopeless instead.
    assert d.submit("tight", "t", 0.0, 90) == ""
    assert d.pol.next_wake() == pytest.approx(1.0 - 90 / 99)


def test_wake_timer_demotes_when_a_queued_request_becomes_hopeless():
    d = Driver()
    d.blocker()
    assert d.submit("tight", "x", 0.0, 50) == ""
    hopeless_at = 1.0 - 50 / 99  # after this, even alone it cannot finish 50 tokens by t = 1.0
    assert d.pol.next_wake() == pytest.approx(hopeless_at)
    assert d.wake(hopeless_at - 0.01) == ""
    assert d.wake(hopeless_at) == "demote:x"  # best effort now; A still blocks it
    assert d.pol.stats().queued_best_effort == 1
    assert d.finish("A", 10.0, 990) == "be:x"


def test_deadline_margin_moves_the_timer():
    d = Driver(deadline_margin_seconds=0.1)
    d.blocker()
    d.submit("tight", "x", 0.0, 50)
    assert d.pol.next_wake() == pytest.approx(1.0 - 0.1 - 50 / 99)


def test_ttft_target_too_short_for_the_engine_is_missed_on_arrival():
    d = Driver(initial_ttft_seconds=0.6)
    assert d.submit("ttft", "x", 0.0, 10) == "demote:x be:x"


def test_ttft_deadline_timer():
    d = Driver()  # TTFT estimate 0.05 s until measured
    d.blocker()
    assert d.submit("ttft", "x", 0.0, 10) == ""
    assert d.pol.next_wake() == pytest.approx(0.5 - 0.05)
    assert d.wake(0.45) == "demote:x"  # the blocker still runs: best effort must wait


def test_ttft_estimate_is_measured():
    d = Driver()
    d.submit("loose", "a", 0.0, 10)
    d.finish("a", 1.0, 10, first_token_at=0.3)
    assert d.pol.engine.ttft_estimate == pytest.approx(0.05 + 0.2 * (0.3 - 0.05))


def test_tpot_target_limits_the_batch():
    d = Driver()
    assert d.submit("tpot", "t1", 0.0, 100) == "admit:t1"  # v(1) = 99 >= 97.09
    assert d.submit("tpot", "t2", 0.0, 100) == "admit:t2"  # v(2) = 98
    assert d.submit("tpot", "t3", 0.0, 100) == ""  # v(3) = 97 < 97.09
    assert d.submit("loose", "l", 0.0, 10) == ""  # would slow t1 and t2 below their TPOT
    assert d.finish("t1", 1.0, 100) == "admit:t3"


def test_best_effort_waits_for_sla_queue_and_kv_cache():
    d = Driver()
    d.blocker()
    assert d.submit("loose", "S", 0.0, 10, deadline=50.0) == ""
    assert d.submit("tight", "B", 0.0, 500) == "demote:B"
    assert d.finish("A", 10.0, 990) == "admit:S be:B"  # SLA first, then best effort
    # With the engine's KV cache nearly full, best effort is held back, and released after.
    assert fmt(d.pol.observe_engine(EngineSnapshot(running=2, waiting=0, kv_cache_usage=0.99), 10.0)) == ""
    assert d.submit("tight", "B2", 10.0, 500) == "demote:B2"
    assert fmt(d.pol.observe_engine(EngineSnapshot(running=2, waiting=0, kv_cache_usage=0.5), 10.1)) == "be:B2"


def test_best_effort_keeps_room_for_fresh_sla_requests():
    # A class whose fresh requests need 400 tok / 5 s = 80 tok/s: best effort may run only while
    # v(L + 1 + reserve) >= 80, i.e. L <= 18 with reserve 1.
    cfg = SidecarConfig.model_validate(
        {
            "classes": [
                {"name": "fast", "deadline_seconds": 5, "output_tokens": 400},
                # sized: a class that states no length would explore with cold requests first
                {"name": "bulk", "deadline_seconds": 5, "output_tokens": 10000},
            ],
            "default_class": "fast",
            "scheduling": {
                "policy": "saber",
                "speed_model": {"form": "linear", "params": [100, -1], "online_refit": False},
                "saber": {"deadline_margin_seconds": 0},
            },
        }
    )
    pol = SaberPolicy(cfg, Tuning(speed_headroom=0))
    admitted = 0
    for i in range(30):  # hopeless arrivals (10000 tokens in 5 s): all become best effort
        acts = pol.submit(request_for(cfg, "bulk", f"b{i}", 0.0, 10000), 0.0)
        admitted += sum(isinstance(a, Admit) for a in acts)
    assert admitted == 19  # the first needs nothing running; then up to L = 18 more
    assert pol.stats().admission_limit == 20  # v(20) = 80: fresh requests fit up to L = 20


def test_output_length_is_learned_per_class():
    d = Driver()
    # 'est' states no output length: until it has learned one (from 4 finished requests here),
    # a request is expected to produce its max_tokens (500 tokens in 1 s: hopeless if that were
    # known) and is cold; the empty engine takes it, unprotected.
    assert d.submit("est", "e0", 0.0, 500) == "admit:e0"
    for i in range(4):
        d.pol.submit(request_for(d.cfg, "loose", f"w{i}", 1.0, 500), 1.0)
        d.pol.finished(f"w{i}", 2.0, 20, None)  # other classes do not count
    assert d.pol.expected_tokens("est") is None
    d.finish("e0", 2.0, 20)
    for i in range(1, 4):
        d.pol.submit(request_for(d.cfg, "est", f"e{i}", 2.0, 500), 2.0)
        d.pol.finished(f"e{i}", 2.5, 20, None)
    assert d.pol.expected_tokens("est") == 20
    assert d.submit("est", "e9", 3.0, 500) == "admit:e9"


def learning_driver(**saber):
    d = Driver(**saber)
    d.cfg.scheduling.speed_model.online_refit = True
    d.pol = d.build()
    return d


def test_finished_requests_feed_the_engine_model():
    d = learning_driver()
    d.submit("loose", "a", 0.0, 100)
    d.submit("loose", "b", 0.0, 100)
    before = d.pol.model.theta.copy()
    d.finish("a", 1.0, 98, first_token_at=0.05)
    # Its time to first token and its decode span (97 steps in 0.95 s at a batch of 2).
    assert d.pol.model.observations == 2
    assert (d.pol.model.theta != before).any()
    assert d.pol.stats().engine_model_observations == 2


def test_never_deadlocks_with_nothing_running():
    d = Driver()
    d.blocker()
    # Requests that only fit a lighter batch pile up behind the blocker.
    for i in range(5):
        assert d.submit("loose", f"q{i}", 0.0, 98, deadline=1.0 + 2 * i) == ""
    # The blocker ends early: the engine is empty, and the head gets in although it needs
    # nearly all of the engine (98 tokens by t = 1.0); the rest must wait for it.
    assert d.finish("A", 0.001, 10) == "admit:q0"


def test_cancel_removes_a_queued_request_and_its_timer():
    d = Driver()
    d.blocker()
    d.submit("tight", "x", 0.0, 50)
    d.pol.cancel("x", 0.1)
    assert d.pol.next_wake() is None and d.pol.stats().queued_sla == 0
    assert d.wake(0.5) == ""


def test_queue_full_and_duplicate_ids():
    cfg = config()
    cfg.scheduling.max_queue = 2
    pol = policy_for(cfg)
    pol.submit(request_for(cfg, "loose", "A", 0.0, 990, deadline=10.00005), 0.0)
    for rid in ("q1", "q2"):
        assert pol.submit(request_for(cfg, "loose", rid, 0.0, 10), 0.0) == []
    acts = pol.submit(request_for(cfg, "loose", "q3", 0.0, 10), 0.0)
    assert fmt(acts) == "reject:q3" and acts[0].reason == "queue full"
    with pytest.raises(ValueError, match="already known"):
        pol.submit(request_for(cfg, "loose", "q1", 0.0, 10), 0.0)


def test_request_for():
    cfg = config()
    r = request_for(cfg, "ttft", "x", 5.0, 100, prompt_tokens=7)
    assert (r.deadline, r.ttft_deadline, r.expected_tokens, r.prompt_tokens) == (15.0, 5.5, 100, 7)
    assert request_for(cfg, "rej", "y", 0.0, 10, deadline=3.0).on_miss == "reject"
    assert request_for(cfg, "tpot", "z", 0.0, 10).tpot_target == 0.0103
    with pytest.raises(ValueError, match="unknown SLA class 'nope'"):
        request_for(cfg, "nope", "x", 0.0, 10)
    with pytest.raises(ValueError, match="max_tokens"):
        request_for(cfg, "loose", "x", 0.0, 0)
    with pytest.raises(ValueError, match="not after arrival"):
        request_for(cfg, "loose", "x", 5.0, 10, deadline=4.0)


def test_an_empty_engine_always_takes_the_head():
    # With 50% headroom a request needing 70 tok/s "does not fit" (70 * 1.5 > 99), but it is
    # not hopeless (70 <= v(1)); with nothing running it must be admitted, not left waiting.
    d = Driver(speed_headroom=0.5)
    assert d.submit("loose", "x", 0.0, 70, deadline=1.0) == "admit:x"
    assert d.submit("loose", "y", 0.0, 70, deadline=1.05) == ""  # alongside x: 70 * 1.5 / 98 > 1.05
    assert d.finish("x", 0.3, 70) == "admit:y"  # needs 93 * 1.5 tok/s: "does not fit", admitted


def test_cut_off_requests_free_their_slot_but_teach_nothing():
    d = learning_driver()
    d.blocker()
    assert d.submit("loose", "B", 0.0, 200) == ""
    # A is cut off (client gone) after 5 tokens: B gets the slot, but neither the speed model nor
    # the class's output-length estimate learns from the partial output.
    assert fmt(d.pol.finished("A", 1.0, 5, 0.1, completed=False)) == "admit:B"
    assert d.pol.model.observations == 0
    for i in range(4):
        d.pol.submit(request_for(d.cfg, "est", f"e{i}", 2.0, 500), 2.0)
        d.pol.finished(f"e{i}", 2.5, 3, None, completed=False)
    assert d.pol.expected_tokens("est") is None
    d.finish("B", 3.0, 200, first_token_at=1.1)
    assert d.pol.model.observations == 2


def test_prefill_of_a_candidate_is_charged_to_the_batch():
    # A: 99 tokens alone take 1.0 s; deadline 1.5 s leaves 0.5 s of slack.
    d = Driver(prefill_seconds_per_token=0.01)
    assert d.submit("loose", "A", 0.0, 99, deadline=1.5) == "admit:A"
    # A 10-token request with no prompt slows A by ~1 ms: admitted.
    assert fmt(d.pol.submit(request_for(d.cfg, "loose", "B", 0.0, 10, prompt_tokens=0), 0.0)) == "admit:B"
    # With a 100-token prompt its prefill stalls the batch for 1 s: A would be late.
    assert fmt(d.pol.submit(request_for(d.cfg, "loose", "C", 0.0, 10, prompt_tokens=100), 0.0)) == ""


def test_prefill_cost_is_learned_from_ttft():
    """TTFT = one step + 1e-4 s per prompt token (noisy): the learned cost, from a prior 10x too high."""
    import random

    rng = random.Random(1)
    d = learning_driver(prefill_seconds_per_token=0.001)
    step = 1 / 99  # one engine step with one request running (v(1) = 99)
    for i in range(60):
        prompt = 100 + 50 * (i % 8)
        req = request_for(d.cfg, "loose", f"p{i}", float(i), 10, prompt_tokens=prompt)
        assert fmt(d.pol.submit(req, float(i))) == f"admit:p{i}"
        ttft = (step + 1e-4 * prompt) * rng.uniform(0.9, 1.1)
        d.pol.finished(f"p{i}", i + ttft + 9 * step, 10, i + ttft)
    assert d.pol.model.per_token == pytest.approx(1e-4, rel=0.15)
    assert d.pol.stats().engine_prefill_seconds_per_token == d.pol.model.per_token


def test_best_effort_wait_is_bounded_by_a_multiple_of_the_sla():
    d = Driver(best_effort_max_wait_slas=2.0)
    d.blocker()
    assert d.submit("tight", "B", 0.0, 500) == "demote:B"  # 500 tokens in 1 s: hopeless
    assert d.pol.next_wake() == pytest.approx(2.0)  # 2 x its 1 s SLA after arrival
    assert d.wake(1.9) == ""
    assert d.wake(2.0) == "reject:B"
    reject = d.pol.wake(2.0)
    assert reject == [] and d.pol.stats().queued_best_effort == 0
    assert d.finish("A", 10.0, 990) == ""  # nothing left to run


def test_a_demoted_request_that_will_not_be_served_hears_so_at_once():
    """Overload: best effort never gets in (a blocker holds the engine). The first demoted requests
    wait at most the bound (1 x their 1 s SLA); once best effort is seen backed up, later ones are
    rejected at arrival, not after the bound."""
    d = Driver(best_effort_max_wait_slas=1.0)
    d.blocker()
    waited = {}
    rejected_at = {}

    def wakes_until(t):  # every timer the policy asks for, at its time
        while (w := d.pol.next_wake()) is not None and w <= t:
            for a in d.pol.wake(w):
                if isinstance(a, Reject):
                    rejected_at[a.request_id] = w

    for i in range(40):
        t = 0.05 * i
        wakes_until(t)
        waited[f"b{i}"] = t
        for a in d.pol.submit(request_for(d.cfg, "tight", f"b{i}", t, 500), t):
            if isinstance(a, Reject):
                rejected_at[a.request_id] = t
    wakes_until(10.0)
    assert len(rejected_at) == 40  # every one of them told it will not be served
    delays = sorted(rejected_at[r] - waited[r] for r in rejected_at)
    assert delays[-1] <= 1.0 + 1e-9  # the stated bound: best_effort_max_wait_slas x the SLA
    # Most at once: each time the queue empties a few more are let in to try (here 12 of 40).
    assert sum(1 for x in delays if x == 0.0) >= 25


def test_a_short_candidate_may_overtake_a_long_request_within_the_model_error():
    # A (990 tokens, 10 s) has 0.00005 s of slack: far less than 5% of its remaining time.
    for at_risk, expected in ((0.0, ""), (0.05, "admit:s")):
        d = Driver(at_risk_slack_share=at_risk)
        d.blocker()
        # A longer candidate finishes after A and would push it late: held either way.
        assert d.submit("loose", "l", 0.0, 2000, deadline=1000.0) == ""
        # A short one finishes before A: it may overtake A only when A counts as at risk.
        assert d.submit("loose", "s", 0.0, 10, deadline=50.0) == expected


def test_under_light_load_a_thin_admission_is_not_protected():
    # R runs 10 tokens; T (990 tokens) then fits with 0.05 s of slack, under 5% of its 10 s.
    # Under light load T is admitted unprotected, so a later long candidate is not held back
    # for its sake; otherwise T is protected and the candidate waits.
    for light_load, expected in ((0.0, ""), (10.0, "admit:X")):
        d = Driver(at_risk_slack_share=0.05, light_load=light_load)
        assert d.submit("loose", "R", 0.0, 10) == "admit:R"
        assert d.submit("loose", "T", 0.0, 990, deadline=10.05) == "admit:T"
        assert d.submit("loose", "X", 0.0, 2000, deadline=1000.0) == expected


def test_offered_load_follows_arrivals():
    # 10 tok/s arriving (one 10-token request per second) against a capacity of max L x v(L)
    # = 50 x 50 = 2500 tok/s: a load of 0.004 once the window has filled.
    d = Driver(load_window_seconds=5.0)
    for i in range(60):
        d.pol.submit(request_for(d.cfg, "loose", f"r{i}", float(i), 10), float(i))
        d.pol.finished(f"r{i}", i + 0.5, 10, None)
    assert d.pol.stats().extra["offered_load_ratio"] == pytest.approx(10 / 2500, rel=0.15)


def test_sheds_a_request_that_would_need_a_small_batch_under_contention():
    # Ten long requests run: under contention a request that needs 95 tok/s (only a batch of 5
    # or less gives that) is shed at once instead of waiting to throttle the engine.
    for shed, expected in ((1.0, "demote:x be:x"), (0.0, "")):  # best effort fits beside them
        d = Driver(shed_batch_fraction=shed)
        for i in range(10):
            assert d.submit("loose", f"bg{i}", 0.0, 5000) == f"admit:bg{i}"
        assert d.submit("tight", "x", 0.0, 95) == expected


def test_slack_reserve_keeps_long_requests_from_taking_the_last_slack():
    d = Driver(slack_reserve_share=0.1)
    # A: 99 tokens alone take 1.0 s; its deadline leaves it 0.3 s of slack (0.3 >= 0.1 x 1.3).
    assert d.submit("loose", "A", 0.0, 99, deadline=1.3) == "admit:A"
    # A long candidate (5 s to its deadline) must leave 0.5 s of slack: it waits.
    assert d.submit("loose", "long", 0.0, 10, deadline=5.0) == ""
    # A short, urgent one need leave only 0.05 s: it gets in.
    assert d.submit("loose", "short", 0.0, 10, deadline=0.5) == "admit:short"


def test_best_effort_runs_shortest_weighted_job_first():
    d = Driver()
    d.blocker()
    # Both hopeless (demoted); the one with fewer tokens x SLA seconds goes first.
    assert d.submit("loose", "big", 0.0, 100000, deadline=100.0) == "demote:big"
    assert d.submit("tight", "small", 0.0, 500) == "demote:small"
    assert d.finish("A", 10.0, 990) == "be:small be:big"  # FIFO would start big first


def test_one_decision_replays_the_batch_once_then_resumes():
    d = Driver()
    d.blocker()
    for rid in ("B", "C", "D"):
        assert d.submit("loose", rid, 0.0, 10, deadline=50.0) == ""
    # A ends: B enters the empty engine unconditionally, C is priced with the one replay this
    # decision may do, and D, which may fit too, waits for the resume timer.
    assert d.finish("A", 10.0, 990) == "admit:B admit:C"
    assert d.pol.next_wake() == pytest.approx(10.0 + Tuning().min_recheck_seconds)
    assert d.wake(d.pol.next_wake()) == "admit:D"
    assert d.pol.next_wake() is None


def test_cold_request_is_admitted_unprotected_when_it_pushes_no_one_late():
    # 'cold' states no output length and has learned none: 1000 tokens in 4 s would be hopeless
    # (250 tok/s > v(1)) if max_tokens were its length, but most requests stop far short of it.
    d = Driver()
    assert d.submit("cold", "c0", 0.0, 1000) == "admit:c0"
    assert d.submit("cold", "c1", 0.0, 1000) == "admit:c1"  # c0 is unprotected: nothing to push late
    assert d.pol.stats().queued_best_effort == 0
    # Unprotected: a sized request that fits is not held back for the cold ones' sake.
    assert d.submit("loose", "x", 0.0, 100) == "admit:x"


def test_cold_request_waits_rather_than_push_a_running_request_late():
    d = Driver()
    d.blocker()
    # Priced at its max_tokens (the cautious side for A), it would push A late: it waits, as an
    # SLA request (not demoted for a length it may never produce), and goes in when A ends.
    assert d.submit("cold", "c", 0.0, 1000) == ""
    assert d.pol.stats().queued_sla == 1
    assert d.finish("A", 1.0, 990) == "admit:c"


def test_cold_request_is_demoted_only_once_its_deadline_passes():
    d = Driver()
    d.blocker()
    assert d.submit("cold", "c", 0.0, 1000) == ""
    assert d.pol.next_wake() == pytest.approx(4.0)  # its deadline (margin 0)
    assert d.wake(4.0) == "demote:c"


def test_an_unlearned_gate_slow_starts_and_opens_when_observations_confirm_the_model():
    """With learning on, nothing confirmed yet: at most 8 run, whatever the prior says; completed
    requests that ran as the model predicted lift the cap."""
    d = learning_driver()
    admitted = [d.submit("loose", f"r{i}", 0.0, 20) for i in range(30)]
    assert sum(a.startswith("admit") for a in admitted) == 8
    assert d.pol.stats().admission_limit == 8
    # The 8 finish as the curve (v = 100 - L) predicts: 19 tokens after the first at v(8) = 92.
    for i in range(8):
        first = 0.01
        d.pol.finished(f"r{i}", first + 19 / 92, 20, first)
    assert d.pol.engine.confirmed >= 4 and d.pol.engine.cap > 8


def test_the_gate_never_plans_past_the_engines_seats():
    d = learning_driver()
    d.cfg.scheduling.engine_max_num_seqs = 4  # as the operator sets it from spec.engine.maxNumSeqs
    d.pol = d.build()
    assert sum(d.submit("loose", f"r{i}", 0.0, 20).startswith("admit") for i in range(10)) == 4
    # Learned from the engine: two scrapes in a row with requests waiting at 3 running.
    d = learning_driver()
    for t in (0.1, 0.2):
        d.pol.observe_engine(EngineSnapshot(running=3, waiting=2), t)
    assert d.pol.engine.seats_seen == 3 and d.pol.stats().admission_limit <= 3
    assert sum(d.submit("loose", f"r{i}", 0.3, 20).startswith("admit") for i in range(10)) == 3
    # One scrape with a request just handed over (waiting, running not yet stable) says nothing.
    d = learning_driver()
    d.pol.observe_engine(EngineSnapshot(running=3, waiting=2), 0.1)
    d.pol.observe_engine(EngineSnapshot(running=5, waiting=0), 0.2)
    assert d.pol.engine.seats_seen is None


def test_slow_start_lifts_on_an_engine_faster_than_predicted_and_holds_on_a_slower_one():
    """The slow-start cap guards against an optimistic model only: requests that ran faster than
    predicted confirm the plan is safe (a fast engine under a slow prior must not be held at 8);
    ones that ran slower than predicted keep the cap."""
    from saber_sidecar.policy.saber import INF_SEATS

    fast = learning_driver()
    for i in range(8):
        fast.submit("loose", f"r{i}", 0.0, 20)
    # Twice as fast as the curve predicts (19 tokens at v(8) = 92 would take 19 / 92 s).
    fast.pol.finished("r0", 0.01 + 0.5 * 19 / 92, 20, 0.01)
    assert fast.pol.engine.cap == INF_SEATS
    slow = learning_driver()
    for i in range(8):
        slow.submit("loose", f"r{i}", 0.0, 20)
    for i in range(8):  # twice as slow: the model was optimistic, the cap holds
        slow.pol.finished(f"r{i}", 0.01 + 2.0 * 19 / 92, 20, 0.01)
    assert slow.pol.engine.cap < INF_SEATS


def test_first_tokens_as_fast_as_planned_grow_the_slow_start_cap_before_any_request_completes():
    """A first token is engine work at the batch its request joined (the step in progress, the
    prompts ahead), which the plan priced at admission: one no slower than planned vouches for that
    batch as a completed request does, so the cap doubles from it long before the first request
    completes. One far slower than planned (an optimistic prior) grows nothing, and once a
    completed request has checked the model, first tokens are no longer the evidence."""
    def gate():
        d = learning_driver()
        out = [d.submit("loose", f"r{i}", 0.0, 20) for i in range(30)]
        assert sum(o.startswith("admit") for o in out) == 8
        return d

    fast = gate()
    # r7 joined a batch of 8: first token after about 1.5 steps at v(7) = 93, as planned.
    admitted = fmt(fast.pol.first_token("r7", 1.5 / 93))
    assert fast.pol.engine.cap == 16
    assert admitted == "admit:r8"  # the queue moves at once, no completion needed
    t = 1.5 / 93
    for _ in range(20):  # (a decision admits one at a time, then resumes: its work is bounded)
        t = fast.pol.next_wake() or t
        fast.pol.wake(t)
    assert len(fast.pol.batch.running) == 16
    slow = gate()
    assert fmt(slow.pol.first_token("r7", 10 * 1.5 / 93)) == ""  # 10x slower than planned
    assert slow.pol.engine.cap == 8
    checked = gate()
    t = 0.01 + 2.0 * 19 / 92
    checked.pol.finished("r0", t, 20, 0.01)  # twice as slow as predicted: checked, not confirmed
    cap = checked.pol.engine.cap
    for _ in range(20):
        t = checked.pol.next_wake() or t
        checked.pol.wake(t)
    last = max(checked.pol.batch.running.values(), key=lambda r: r.n0)
    assert last.n0 == cap
    assert fmt(checked.pol.first_token(last.req.id, t + 0.01)) == ""
    assert checked.pol.engine.cap == cap
    assert fmt(fast.pol.first_token("unknown", 0.02)) == ""  # not running: nothing to learn


def test_a_reject_class_that_states_no_length_explores_then_reads_an_honest_max_tokens_strictly():
    """`rejcold` states no output length: its max_tokens (500 in 1 s: 5x the engine's speed) is
    only a bound. Read strictly, it would reject everything and never learn a length; instead at
    most `output_min_samples` (4) run at once as probes. When they end at their max_tokens (an
    honest cap), the class has learned that length and the rest are rejected at once."""
    d = Driver()
    out = [d.submit("rejcold", f"p{i}", 0.0, 500) for i in range(10)]
    assert sum(o.startswith("admit") for o in out) == 4
    assert not any(o.startswith("reject") for o in out)
    assert d.pol.stats().queued_sla == 6
    decided = [d.finish(f"p{i}", 0.5, 500) for i in range(4)]
    assert "reject:p9" in " ".join(decided) and d.pol.stats().queued_sla == 0
    assert d.pol.expected_tokens("rejcold") == 500
    assert d.submit("rejcold", "late", 0.6, 500) == "reject:late"


def test_a_reject_class_learns_short_lengths_under_a_high_cap_and_then_admits_by_them():
    d = Driver()
    for i in range(4):
        assert d.submit("rejcold", f"p{i}", 0.0, 500) == f"admit:p{i}"
    for i in range(4):
        d.finish(f"p{i}", 0.2, 10)
    assert d.pol.expected_tokens("rejcold") == 10
    # Priced at its learned 10 tokens, not the 500 it may ask for: admitted, protected.
    assert d.submit("rejcold", "next", 0.3, 500) == "admit:next"


def test_a_burst_of_long_prompts_waits_for_the_prefill_backlog_ahead_of_it():
    """Prompts are prefilled in turn: the third 200-token prompt at 1 ms a token sees its first
    token after ~0.6 s of prefill ahead of it, past its 0.5 s TTFT target, so it is not admitted
    with the first two (as if its prefill began at once); it goes in once the backlog drained."""
    d = Driver(prefill_seconds_per_token=1e-3)
    out = [fmt(d.pol.submit(request_for(d.cfg, "ttft", f"r{i}", 0.0, 10, prompt_tokens=200), 0.0)) for i in range(4)]
    assert out[:2] == ["admit:r0", "admit:r1"]
    assert out[2:] == ["", ""]
    assert d.pol.batch.prefill_ahead(0.0) == pytest.approx(0.4, rel=0.01)
    # A request arriving at 0.3 s has 0.1 s of backlog ahead: first token by ~0.6 s, within 0.8 s.
    assert fmt(d.pol.submit(request_for(d.cfg, "ttft", "late", 0.3, 10, prompt_tokens=200), 0.3)) == "admit:late"


def test_requests_waiting_behind_a_long_prefill_do_not_read_as_the_engines_seats():
    """A request waits inside the engine while another's long prompt takes the step's token
    budget: running stays put and waiting > 0 across scrapes, but the engine's counters show it
    prefilling (or still in one long step). That is not its seat limit; steps made with no prompt
    tokens prefilled and a request still waiting are."""
    d = learning_driver()
    d.pol.observe_engine(EngineSnapshot(running=2, waiting=3, steps=10, prompt_tokens=1000, generation_tokens=20), 0.1)
    d.pol.observe_engine(EngineSnapshot(running=2, waiting=3, steps=10, prompt_tokens=1000, generation_tokens=20), 0.6)
    d.pol.observe_engine(EngineSnapshot(running=2, waiting=3, steps=11, prompt_tokens=9192, generation_tokens=21), 1.1)
    assert d.pol.engine.seats_seen is None
    d.pol.observe_engine(EngineSnapshot(running=2, waiting=3, steps=15, prompt_tokens=9192, generation_tokens=29), 1.6)
    assert d.pol.engine.seats_seen == 2


def test_a_slow_engines_step_counters_still_teach_the_model():
    """One step every 3 s (a CPU engine prefilling a full token budget): a span of the counters
    grows until it holds enough steps instead of being cut at a fixed length with too few."""
    d = learning_driver()
    assert d.submit("loose", "long", 0.0, 5000) == "admit:long"  # keeps the engine busy throughout
    for i in range(1, 80):
        t = 0.5 * i
        steps = float(int(t / 3.0))
        d.pol.observe_engine(EngineSnapshot(running=1, waiting=0, steps=steps, prompt_tokens=0.0,
                                            generation_tokens=steps), t)
    assert d.pol.model.observations >= 1


def test_the_slow_start_cap_lifts_on_a_run_of_good_predictions_after_a_wrong_prior():
    """A prior 3x too fast: the first predictions miss by far (their average stays above the bound
    for several more requests), then the learned model predicts well; a run of
    SLOW_START_CONFIRM predictions within the bound, observed after the last miss, confirms it."""
    from saber_sidecar.policy.saber_engine import SLOW_START_CONFIRM, SLOW_START_ERROR

    engine = learning_driver().pol.engine
    for t, observed in enumerate((3.2, 1.8, 1.4)):  # log errors 1.16, 0.59, 0.34: the prior, then learning
        engine._check_prediction(1.0, observed, t, t + 1.0)
    assert engine.cap == 8
    engine._check_prediction(1.0, 1.1, 2.5, 3.5)  # good, but it ran alongside the last miss
    assert engine.streak == 0
    for i in range(SLOW_START_CONFIRM - 1):
        engine._check_prediction(1.0, 1.1, 3.0 + i, 4.0 + i)
        assert engine.update_cap() is False and engine.cap == 8
    assert engine.model_error > SLOW_START_ERROR  # the average alone would still hold the cap
    engine._check_prediction(1.0, 1.1, 9.0, 10.0)
    assert engine.update_cap() and engine.cap == engine.seats
    engine._check_prediction(1.0, 2.0, 10.0, 11.0)  # a miss ends the run
    assert engine.streak == 0 and engine.miss_end == 11.0


def _six_long_then_four_short(d, short_at):
    """Six `loose` requests admitted at 0 s, four more at `short_at`: the long and the short runners."""
    for i in range(6):
        assert d.submit("loose", f"l{i}", 0.0, 100) == f"admit:l{i}"
    for i in range(4):
        assert d.submit("loose", f"s{i}", short_at, 100) == f"admit:s{i}"


def test_running_requests_past_the_finished_lengths_raise_a_class_estimate():
    """Short requests finish first: the first lengths a class sees are its shortest. Six run from
    0 s; four more go in at 0.45 s and finish at 0.5 s with 5 tokens (what the plan gave them:
    the plan's progress is worth its tokens). The six still running have made ~47 each (0.45 s
    at v(6) = 94 tok/s, 0.05 s at v(10) = 90): the class is planned at what those have made at
    least, not at 5 (the plain p90 of the finished). As the long ones finish, their lengths take over."""
    d = Driver()
    _six_long_then_four_short(d, 0.45)
    for i in range(4):
        d.finish(f"s{i}", 0.5, 5)
    assert 45 <= d.pol.expected_tokens("loose") <= 47  # 0.45 s at v(6) = 94, 0.05 s at v(10) = 90
    for i in range(6):
        d.finish(f"l{i}", 1.2, 100)
    assert d.pol.expected_tokens("loose") == 100 and not d.pol.estimates["loose"].bounded


def test_planned_progress_counts_at_what_it_has_been_worth():
    """An optimistic model plans more tokens than the engine makes: the four that finish made a
    fifth of what the plan gave them, so the running ones count at a fifth of their planned
    progress (~9 of ~45), which is not past the finished lengths' p90: the plain one stands."""
    d = Driver()
    _six_long_then_four_short(d, 0.0)
    for i in range(4):
        d.finish(f"s{i}", 0.5, 9 + i)  # planned ~45 each
    assert d.pol.expected_tokens("loose") == 12 and not d.pol.estimates["loose"].bounded


def test_output_estimate_counts_running_requests_only_past_its_quantile():
    class Running:
        def __init__(self, *progress):
            self.values = list(progress)

        def progress(self, sla_class):
            return self.values

    est = OutputEstimate(256, 0.9, 4)
    for tokens in (10, 20, 30):
        assert not est.add(tokens, Running(500.0))
    assert est.add(40, Running(15.0, 35.0))  # no running request past the p90 (40): the plain one
    assert est.value == 40 and not est.bounded
    est = OutputEstimate(256, 0.9, 4)
    for tokens in (10, 20, 30, 40):
        est.add(tokens, Running(50.0, 60.5, 70.0, 80.0))
    # p90 of the 4 finished and the 4 running at their progress: the 8th of 8 (ceil(0.9 x 8) = 8)
    assert est.value == 80 and est.bounded
    assert est.add(5, Running()) and est.value == 40 and not est.bounded  # recomputed at once


def test_cold_requests_of_a_demote_class_explore_a_few_at_a_time():
    """'cold' states no length: its max_tokens (1000) is only a bound, so its first requests go in
    unprotected, but at most `output_min_samples` (4) at once (as for a reject class): admitted
    all at once under a burst they would flood the engine before the class knows any length. The
    rest wait as SLA requests, and go in as the explorers finish."""
    d = Driver()
    out = [d.submit("cold", f"c{i}", 0.0, 1000) for i in range(10)]
    assert out[:4] == [f"admit:c{i}" for i in range(4)] and out[4:] == [""] * 6
    assert d.pol.stats().queued_sla == 6 and d.pol.stats().queued_best_effort == 0
    assert d.finish("c0", 0.5, 20) == "admit:c4"


def test_best_effort_waits_while_a_cold_request_runs():
    """A cold request runs unprotected because its length is unknown, not because its deadline
    does not matter: best effort does not take the engine from it."""
    d = Driver()
    assert d.submit("cold", "c", 0.0, 1000) == "admit:c"
    assert d.submit("tight", "h", 0.0, 500) == "demote:h"  # 500 tokens in 1 s: hopeless
    assert d.pol.stats().queued_best_effort == 1
    assert d.finish("c", 1.0, 30) == "be:h"


def test_a_request_told_its_exact_length_is_planned_with_it_not_the_class_estimate():
    """The benchmarks' saber-oracle reference: a request whose `expected_tokens` is its true length
    (`exact_length`) is planned with that length for the whole run. Before, the class's learned
    estimate replaced it as soon as the class had one, so the 'oracle' was saber after its first
    few finished requests."""
    d = Driver()
    for i in range(4):
        assert d.submit("est", f"e{i}", 0.0, 500) == f"admit:e{i}"
        d.finish(f"e{i}", 0.2, 10)
    assert d.pol.expected_tokens("est") == 10
    assert d.submit("est", "guess", 0.5, 500) == "admit:guess"  # planned at the class's 10 tokens
    told = request_for(d.cfg, "est", "told", 0.5, 500)
    told.expected_tokens, told.exact_length = 500, True  # 500 tokens in 1 s: hopeless
    assert fmt(d.pol.submit(told, 0.5)).startswith("demote:told")
