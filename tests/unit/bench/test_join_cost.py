"""What a request costs the batch it joins, read from the decoding streams' token times (join_cost)."""

import numpy as np
import pytest

from saber_bench.join_cost import BASELINE, WINDOW_AFTER, WINDOW_BEFORE, arrival_excess, fit_join_cost


def _streams(n: int, steps: list[float], rng: np.random.Generator, jitter: float = 0.0,
             merge_every: int = 0) -> list[list[tuple[float, int]]]:
    """n streams decoding in lockstep, one token a step; each client reads with its own jitter, and with
    merge_every, every such chunk carries two tokens (a server behind its client)."""
    ends = np.cumsum(steps)
    out = []
    for _ in range(n):
        chunks = [(float(t + abs(rng.normal(0, jitter))), i + 1) for i, t in enumerate(ends)]
        if merge_every:
            chunks = [c for i, c in enumerate(chunks) if i % merge_every != merge_every - 1 or i == len(chunks) - 1]
        out.append(sorted(chunks))
    return out


def test_the_extra_time_around_a_join_is_found_in_the_steps_before_and_at_it():
    rng = np.random.default_rng(1)
    steps = [0.004] * 200
    # The join (token 100 made in the step of the arrival's first token) costs 2 ms in that step,
    # and the arrival's HTTP work 0.25 ms in each of the 4 steps before: 3 ms in all.
    steps[99] += 0.002
    for i in range(95, 99):
        steps[i] += 0.00025
    first_token = float(np.cumsum(steps)[99])
    for jitter, merge in ((0.0, 0), (0.0003, 0), (0.0, 3)):
        got = arrival_excess(_streams(16, steps, rng, jitter, merge), first_token)
        assert got == pytest.approx(0.003, abs=0.0003), (jitter, merge)


def test_a_step_time_that_grows_through_the_wave_is_not_counted_as_a_join_cost():
    steps = list(np.linspace(0.004, 0.008, 300))  # context growing: 4 ms -> 8 ms a step
    first_token = float(np.cumsum(steps)[150])
    got = arrival_excess(_streams(8, steps, np.random.default_rng(2)), first_token)
    assert got == pytest.approx(0.0, abs=1e-5)


def test_an_arrival_too_near_the_waves_edge_is_not_read():
    steps = [0.004] * 100
    near_start = float(np.cumsum(steps)[WINDOW_BEFORE + BASELINE - 3])
    near_end = float(np.cumsum(steps)[100 - WINDOW_AFTER - BASELINE + 2])
    rng = np.random.default_rng(3)
    assert arrival_excess(_streams(4, steps, rng), near_start) is None
    assert arrival_excess(_streams(4, steps, rng), near_end) is None
    # Fewer than half the streams spanning the window: not read either.
    short = [[(0.004 * (i + 1), i + 1) for i in range(20)]] * 3
    assert arrival_excess(_streams(2, steps, rng) + short, float(np.cumsum(steps)[50])) is None


def test_the_fit_recovers_a_fixed_and_a_per_sequence_cost_from_noisy_arrivals():
    rng = np.random.default_rng(4)
    prefill = 16 * 1.4e-5
    points = [(n, prefill + 0.0008 + n * 4e-5 + rng.normal(0, 0.0005)) for n in (4, 8, 16, 32, 48) for _ in range(40)]
    fixed, per_seq = fit_join_cost(points, prefill)
    assert fixed == pytest.approx(0.0008, abs=0.0002)
    assert per_seq == pytest.approx(4e-5, abs=1e-5)


def test_the_fit_never_gives_a_negative_cost():
    # Falling with N (noise): one constant, no slope.
    assert fit_join_cost([(4, 0.003), (16, 0.002), (48, 0.001)], 0.0) == (pytest.approx(0.002), 0.0)
    # Rising but below the prefill at small N: a line through the origin, not a negative constant.
    fixed, per_seq = fit_join_cost([(4, 0.0), (48, 0.002)], 0.0005)
    assert fixed == 0.0 and per_seq > 0
    assert fit_join_cost([(16, 0.0001)], 0.0005) == (0.0, 0.0)
    assert fit_join_cost([], 0.001) == (0.0, 0.0)
