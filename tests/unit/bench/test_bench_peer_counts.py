"""The peer comparison's counting and aggregation (saber_bench.peer) and the live capacity and
repeat summaries of the trace replay on real vLLM (saber_bench.trace_live), on hand-made inputs."""

import math

import pytest

from saber_bench.metrics import RequestRecord
from saber_bench.peer import (
    AGREE_POINTS,
    parse_slos,
    peer_counts,
    peer_send_lag,
    saber_counts,
    summarize_runs,
    summary_table,
)
from saber_bench.trace_live import burst_throughput, repeats_table, spread, targets_vs_best_static
from saber_bench.workloads import RequestSpec


def test_parse_slos_reads_milliseconds_as_seconds():
    assert parse_slos("e2el:2000 ttft:1000") == {"e2el": 2.0, "ttft": 1.0}
    assert parse_slos("tpot:50") == {"tpot": 0.05}


def _result(rows, request_goodput=None, duration=10.0):
    """A `vllm bench serve --save-detailed` result: rows of (error, ttft, latency, output_len)."""
    return {"errors": [r[0] for r in rows], "ttfts": [r[1] for r in rows], "latencies": [r[2] for r in rows],
            "output_lens": [r[3] for r in rows], "duration": duration, "request_goodput": request_goodput}


def test_peer_counts_counts_each_miss_and_failures_as_not_good():
    rows = [
        ("", 0.2, 1.0, 10),     # good
        ("", 1.5, 1.9, 10),     # TTFT over 1 s
        ("", 0.3, 2.5, 10),     # e2e over 2 s
        ("", 1.2, 3.0, 10),     # both
        ("", 1.0, 2.0, 1),      # exactly at both SLOs: good (vLLM's `s >= r`)
        ("Too Many Requests", 0.0, 0.0, 0),  # the gate's 429
        ("ClientConnectorError", 0.0, 0.0, 0),
    ]
    c = peer_counts(_result(rows, request_goodput=0.2), {"e2el": 2.0, "ttft": 1.0})
    assert (c["requests"], c["good"], c["completed"], c["failed"], c["rejected"]) == (7, 2, 5, 2, 1)
    assert (c["miss_ttft"], c["miss_e2e"], c["miss_tpot"]) == (2, 2, 0)
    assert c["goodput"] == pytest.approx(2 / 7)
    assert c["reported_good"] == 2  # vLLM's good req/s x duration agrees with the recount


def test_peer_counts_tpot_is_zero_for_one_token_and_excludes_ttft():
    slos = {"tpot": 0.1}
    # (1.2 - 0.2) / (11 - 1) = 0.1: at the SLO; 1 token: TPOT 0 whatever the latency
    c = peer_counts(_result([("", 0.2, 1.2, 11), ("", 0.2, 1.3, 11), ("", 0.5, 9.0, 1)]), slos)
    assert (c["good"], c["miss_tpot"]) == (2, 1)


def test_peer_send_lag_is_the_latest_send_against_the_trace():
    specs = [RequestSpec(f"r{i}", "code", t, 2.0, "p", 1, 1, 1) for i, t in enumerate((0.5, 1.0, 2.0))]
    # start times on the peer's own clock; the first sets the offset
    assert peer_send_lag({"start_times": [100.0, 100.52, 101.6]}, specs) == pytest.approx(0.1)
    assert math.isnan(peer_send_lag({}, specs))


def _rec(i, *, rejected=False, first=None, finished=None, arrival=0.0):
    return RequestRecord(f"r{i}", "code", arrival, 2.0, rejected=rejected, first_token_at=first, finished_at=finished,
                         output_tokens=5, ttft_slo_s=1.0)


def test_saber_counts_match_peer_counts_on_the_same_outcomes():
    recs = [_rec(0, first=0.2, finished=1.0), _rec(1, first=1.5, finished=1.9), _rec(2, first=0.3, finished=2.5),
            _rec(3, rejected=True), _rec(4, first=0.1)]  # 4: never finished
    c = saber_counts(recs)
    assert (c["requests"], c["good"], c["rejected"], c["failed"], c["miss_ttft"], c["miss_e2e"]) == (5, 1, 1, 2, 1, 1)
    p = peer_counts(_result([("", 0.2, 1.0, 5), ("", 1.5, 1.9, 5), ("", 0.3, 2.5, 5), ("Too Many Requests", 0, 0, 0),
                             ("timeout", 0, 0, 0)]), {"e2el": 2.0, "ttft": 1.0})
    for k in ("requests", "good", "rejected", "failed", "miss_ttft", "miss_e2e"):
        assert c[k] == p[k], k


def _runs(rate, peer, saber, load=None):
    return ([{"rate": rate, "load": load, "client": "vllm_bench_serve", "goodput": g} for g in peer]
            + [{"rate": rate, "load": load, "client": "saber_bench", "goodput": g} for g in saber])


def test_summarize_runs_means_spread_and_agreement():
    rows = summarize_runs(_runs(6.0, [0.90, 0.92, 0.94], [0.91, 0.93, 0.95], load=0.6)
                          + _runs(20.0, [0.30, 0.31, 0.32], [0.40, 0.41, 0.42], load=2.0)
                          + _runs(30.0, [0.10, 0.50, 0.90], [0.14, 0.54, 0.94]))
    a, b, c = rows
    assert a["vllm_bench_serve"]["mean"] == pytest.approx(92.0)
    assert a["saber_bench"]["runs"] == pytest.approx([91, 93, 95])
    assert a["difference_points"] == pytest.approx(1.0) and a["spread_points"] == pytest.approx(math.sqrt(8 / 3))
    assert a["agree"] and a["load"] == 0.6
    # 10 points apart with a spread under 1: no agreement, for both reasons
    assert b["difference_points"] == pytest.approx(10.0) and not b["within_points"] and not b["agree"]
    # 4 points apart inside a 33-point spread: within the spread but not within AGREE_POINTS
    assert c["within_spread"] and not c["within_points"] and not c["agree"]
    assert AGREE_POINTS < 4
    table = summary_table(rows)
    assert "92.0 ± 1.6 (90/92/94)" in table and "+10.0" in table and "no (|Δ| > 3) (|Δ| > spread)" in table


def test_summarize_runs_needs_both_clients():
    with pytest.raises(ValueError, match="no saber_bench run"):
        summarize_runs([{"rate": 1.0, "client": "vllm_bench_serve", "goodput": 1.0}])


def test_burst_throughput_counts_served_requests_over_the_makespan():
    recs = [_rec(0, first=0.1, finished=2.0), _rec(1, first=0.1, finished=4.0), _rec(2, rejected=True)]
    b = burst_throughput(recs)
    assert (b["served"], b["requests"], b["makespan_s"]) == (2, 3, 4.0)
    assert b["throughput_rps"] == pytest.approx(0.5)
    with pytest.raises(RuntimeError, match="none of 1"):
        burst_throughput([_rec(0, rejected=True)])


def _cell(rate, policy, goodputs, lat=1.0, load=None):
    s = spread(goodputs)
    return {"rate": rate, "load": load, "policy": policy, "goodput": s["mean"], "goodput_per_seed": goodputs,
            "goodput_spread": s, "mean_e2e_over_sla": lat, "ttft_p50": 0.1, "e2e_p50": 0.5, "e2e_p95": 1.5,
            "rejected": 0.0, "demoted": 0.0, "send_lag_max_s": 0.05, "load1_per_repeat": [2.0, 3.5]}


def test_targets_pick_the_best_static_by_mean_and_apply_the_two_point_margin():
    cells = [_cell(10, "static-8", [0.50, 0.60, 0.70], load=1.0), _cell(10, "static-64", [0.80, 0.80, 0.83], load=1.0),
             _cell(10, "saber", [0.78, 0.80, 0.80], load=1.0),
             _cell(20, "static-8", [0.40, 0.40, 0.40], lat=0.9), _cell(20, "static-64", [0.40, 0.40, 0.40], lat=1.4),
             _cell(20, "saber", [0.30, 0.35, 0.40])]
    t1, t2 = targets_vs_best_static(cells)
    assert t1["best_static"] == "static-64" and t1["minus_best_points"] == pytest.approx(-1.667, abs=1e-3)
    assert t1["met_minus_2"]
    # a tie on goodput goes to the lower latency (static-8 here); saber 5 points under it
    assert t2["best_static"] == "static-8" and t2["minus_best_points"] == pytest.approx(-5.0)
    assert not t2["met_minus_2"]
    table = repeats_table(cells)
    assert "| 10 | 1x | static-64 | 81.0 | 1.4 | 80–83 | 80/80/83 | 0.100 | 0.50/1.50 | 0.0 | 0.0 | 0.05 | 2.0–3.5 |" in table


def test_spread_of_one_value_has_no_std():
    assert spread([0.5]) == {"mean": 0.5, "std": 0.0, "min": 0.5, "max": 0.5, "n": 1}


def test_runs_table_has_a_row_per_run_with_the_machine_load():
    from saber_bench.peer import runs_table

    runs = [{"rate": 11.77, "repeat": 0, "client": "saber_bench", "goodput": 0.5, "good": 75, "requests": 150,
             "rejected": 3, "miss_ttft": 2, "miss_e2e": 70, "send_lag_max_s": 0.012, "load1": 2.5}]
    assert runs_table(runs).splitlines()[2] == "| 11.77 | 0 | saber_bench | 50.0 | 75/150 | 3 | 2 | 70 | 12 | 2.50 |"
