"""The live capacity search (bench/saber_bench/capacity.py) on synthetic engines: goodput a known
function of the rate, so the capacity it must find is known."""

from __future__ import annotations

import asyncio

import pytest

from saber_bench.capacity import PROBE_RESOLUTION, next_rate, search_capacity


def _engine(knee: float):
    """vLLM's own cap meets every deadline up to `knee` req/s and falls under the target past it."""
    rates: list[float] = []

    async def probe(rate: float) -> dict:
        rates.append(rate)
        return {"goodput": 1.0 if rate <= knee else 0.8 * knee / rate}

    return probe, rates


def test_a_passing_start_is_searched_upward_to_the_knee():
    probe, rates = _engine(knee=55.0)
    found = asyncio.run(search_capacity(probe, 30.5))
    # The old probe stopped at 30.5, its first pass: the knee is near 55.
    assert found["capacity_rps"] <= 55.0 < found["first_failing_rps"]
    assert found["first_failing_rps"] / found["capacity_rps"] <= PROBE_RESOLUTION
    assert rates[:2] == [30.5, 61.0]
    assert [p["rate"] for p in found["probes"]] == rates


def test_a_failing_start_is_searched_downward():
    probe, rates = _engine(knee=9.0)
    found = asyncio.run(search_capacity(probe, 40.0))
    assert rates[:3] == [40.0, 20.0, 10.0]
    assert found["capacity_rps"] <= 9.0 < found["first_failing_rps"]
    assert all(p["goodput"] >= 0.9 for p in found["probes"] if p["rate"] <= found["capacity_rps"])


def test_the_search_spends_at_most_its_steps_and_keeps_the_best_pass():
    probe, rates = _engine(knee=1e9)  # never fails: no bracket, every step doubles
    found = asyncio.run(search_capacity(probe, 1.0, steps=3))
    assert rates == [1.0, 2.0, 4.0]
    assert found["capacity_rps"] == 4.0 and found["first_failing_rps"] is None


def test_an_engine_that_meets_nothing_is_an_error_that_names_the_probes():
    async def probe(rate: float) -> dict:
        return {"goodput": 0.1}

    with pytest.raises(RuntimeError, match="at no probed rate"):
        asyncio.run(search_capacity(probe, 8.0, steps=2))


def test_next_rate_doubles_halves_then_bisects_geometrically():
    assert next_rate(10.0, 10.0, None) == 20.0
    assert next_rate(10.0, None, 10.0) == 5.0
    assert next_rate(20.0, 10.0, 40.0) == 20.0
