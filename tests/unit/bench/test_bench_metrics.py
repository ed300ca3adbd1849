import math

import pytest

from saber_bench.metrics import RequestRecord, coefficient_of_variation, combine_seeds, run_stats


def rec(i, arrival=0.0, sla=1.0, finish=None, first=None, rejected=False, demoted=False, cls="qna", tokens=10):
    return RequestRecord(f"r{i}", cls, arrival, sla, rejected=rejected, demoted=demoted,
                         first_token_at=first, finished_at=finish, output_tokens=tokens if finish else 0)


def test_goodput_counts_rejected_and_unfinished_as_misses():
    records = [
        rec(0, finish=0.5, first=0.1),  # met
        rec(1, arrival=1.0, finish=1.9, first=1.2),  # met (0.9 s)
        rec(2, arrival=2.0, finish=3.5, first=2.1, demoted=True),  # missed (1.5 s), demoted
        rec(3, arrival=3.0, rejected=True),
        rec(4, arrival=4.0),  # never finished
    ]
    st = run_stats(records)
    assert st.n == 5 and st.met == 2
    assert st.goodput == pytest.approx(0.4)
    assert st.rejected == 1 and st.demoted == 1 and st.unfinished == 1


def test_deadline_is_inclusive_and_measured_from_scheduled_arrival():
    st = run_stats([rec(0, arrival=2.0, sla=8.0, finish=10.0, first=2.5)])
    assert st.goodput == 1.0
    assert st.e2e_p50 == pytest.approx(8.0)
    assert st.ttft_p50 == pytest.approx(0.5)


def test_variability_population_includes_rejected_as_worst_miss():
    served = [rec(0, finish=0.5), rec(1, finish=3.0)]  # ratios 0.5 and 3.0
    st = run_stats(served + [rec(2, rejected=True)])
    assert st.mean_e2e_over_sla == pytest.approx((0.5 + 3.0 + 3.0) / 3)
    # With all served requests on time, a rejection still counts as a miss (ratio 1).
    st = run_stats([rec(0, finish=0.5), rec(1, rejected=True)])
    assert st.mean_e2e_over_sla == pytest.approx((0.5 + 1.0) / 2)


def test_attainment_per_class():
    records = [rec(0, finish=0.5, cls="qna"), rec(1, finish=2.0, cls="qna"), rec(2, sla=8, finish=5, cls="generation")]
    st = run_stats(records)
    assert st.attainment == {"generation": 1.0, "qna": 0.5}


def test_throughput_over_makespan():
    st = run_stats([rec(0, finish=1.0, tokens=50), rec(1, arrival=1.0, finish=2.0, tokens=150)])
    assert st.makespan_s == pytest.approx(2.0)
    assert st.throughput_tok_s == pytest.approx(100.0)
    assert st.throughput_rps == pytest.approx(1.0)


def test_combine_seeds_means_and_keeps_per_seed():
    a = run_stats([rec(0, finish=0.5), rec(1, finish=2.0)])
    b = run_stats([rec(0, finish=0.5), rec(1, finish=0.7)])
    cell = combine_seeds([a, b])
    assert cell["goodput"] == pytest.approx(0.75)
    assert cell["goodput_per_seed"] == [0.5, 1.0]
    with pytest.raises(ValueError):
        combine_seeds([])


def test_cv_is_population_std_over_mean():
    assert coefficient_of_variation([1.0, 1.0, 1.0]) == 0.0
    assert coefficient_of_variation([1.0, 3.0]) == pytest.approx(0.5)
    assert math.isnan(coefficient_of_variation([]))
