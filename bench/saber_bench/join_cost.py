"""The engine time a request costs when it joins a decoding batch, read from the batch's own token gaps.

While N streams decode, one single-token request is sent; every decoding stream's time over the few
steps up to and just after the one that made that request's first token (the step it joined) is set
against the same stream's time per token a little before and after. The excess, averaged over the
streams, is what the join cost each of them: the arrival's prefill, the engine's work to take it in,
and, where the API server, the relay and the clients share the engine's cores, the CPU they spent on
it. Arrivals are spaced so that each one's window and baseline hold no other arrival.

A local baseline, not the wave's mean: the step grows during a long wave (KV context) and a shared
machine drifts, both far more than a join costs. On the 2-core machine, reading the whole window's
extra time per arrival instead measured 9-10 ms; this reads 0.35-0.5 ms + 3-30 us per running
sequence (docs/BENCHMARKS.md, run 9).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# In tokens of a decoding stream (one per engine step) around token c, the one made in the step the
# arrival joined: the window is the steps that made tokens c - WINDOW_BEFORE + 1 ... c + WINDOW_AFTER.
# The request's HTTP and API-server work overlaps the few steps before its join (on the 2-core
# machine, 4-5 of them); a wider window only adds more of the steps' own spread to each reading.
WINDOW_BEFORE = 6
WINDOW_AFTER = 2
BASELINE = 16  # steps on each side beyond the window
# Between arrivals, in steps of the unloaded wave: one arrival's window clear of the other's
# baseline (24 steps), with room for steps that grow with the wave's context.
SPACING_STEPS = 32


def arrival_excess(streams: Sequence[Sequence[tuple[float, int]]], first_token_at: float) -> float | None:
    """Seconds the arrival whose first token came at `first_token_at` added to each decoding stream,
    averaged over the streams (`streams`: each one's chunks as (arrival time, tokens received so
    far)). None when fewer than half the streams decoded through the window and both baselines.

    Counted in tokens, not chunks: a server that falls behind its client merges a few tokens into
    one chunk, and the time between two token counts is what the steps between them took."""
    excess = []
    for chunks in streams:
        if len(chunks) < 2:
            continue
        t = np.asarray([c[0] for c in chunks], dtype=float)
        n = np.asarray([c[1] for c in chunks], dtype=float)
        c = n[int(np.argmin(np.abs(t - first_token_at)))]  # the stream's token made in the joined step
        lo, hi = c - WINDOW_BEFORE, c + WINDOW_AFTER
        if lo - BASELINE < n[0] or hi + BASELINE > n[-1]:
            continue
        # Widened to token counts the stream was read at (a merged chunk hides the ones inside it).
        i_lo, i_hi = int(np.searchsorted(n, lo, "right")) - 1, int(np.searchsorted(n, hi, "left"))
        i_b0, i_b1 = int(np.searchsorted(n, lo - BASELINE, "right")) - 1, int(np.searchsorted(n, hi + BASELINE, "left"))
        base_tokens = n[i_lo] - n[i_b0] + n[i_b1] - n[i_hi]
        if base_tokens <= 0:
            continue
        per_token = (t[i_lo] - t[i_b0] + t[i_b1] - t[i_hi]) / base_tokens
        excess.append(float(t[i_hi] - t[i_lo] - (n[i_hi] - n[i_lo]) * per_token))
    return float(np.mean(excess)) if excess and 2 * len(excess) >= len(streams) else None


def fit_join_cost(points: Sequence[tuple[int, float]], prefill_s: float) -> tuple[float, float]:
    """(request_step_s, request_step_s_per_seq) from (N decoding, excess s) per arrival, less the
    arrival's own prefill `prefill_s` (the simulator charges that separately): a least-squares line
    in N, both terms clamped at 0 (a negative slope is noise: the cost is then one constant)."""
    if not points:
        return 0.0, 0.0
    n = np.asarray([p[0] for p in points], dtype=float)
    y = np.asarray([p[1] for p in points], dtype=float) - prefill_s
    per_seq = 0.0
    if len(set(n.tolist())) >= 2:
        per_seq = float(np.polyfit(n, y, 1)[0])
    per_seq = min(max(per_seq, 0.0), 1e-3)
    fixed = min(max(float(np.mean(y - per_seq * n)), 0.0), 1.0)
    if fixed == 0.0 and per_seq > 0:  # the line crossed below 0: through the origin instead
        per_seq = min(max(float(np.sum(n * y) / np.sum(n * n)), 0.0), 1e-3)
    return fixed, per_seq
