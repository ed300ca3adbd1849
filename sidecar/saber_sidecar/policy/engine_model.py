"""The engine model the `saber` gate plans with, learned online from the engine it runs on.

One linear model of an engine step (vLLM's continuous batching, chunked prefill):

    step seconds = t0 + t1 L + t2 L^2 + c P

with L sequences decoding in the step and P prompt tokens prefilled in it. A request decoding
among L others makes one token a step, so its speed is v(L) = 1 / (t0 + t1 L + t2 L^2): the
paper's USL form a / (1 + s L + k L^2), with a = 1/t0, s = t1/t0, k = t2/t0. `c` is the prefill
cost per prompt token (what an admission stalls the batch for). A fifth parameter `o` is the
constant part of time to first token that is not engine work (HTTP, tokenising, scheduling).

Everything the gate observes is a linear function of theta = (t0, t1, t2, c, o), so one least
squares learns all of it (`_Rows` documents each kind of row):
- a completed request's decode span (first to last token): its mean inter-token time is one
  step at its mean batch, plus the prompts the engine prefilled meanwhile, spread over its steps
  (the policy may learn it with that prefill estimated and correct it later: `revise_decode`);
- its time to first token: the rest of the step in progress, then the step(s) that prefill the
  prompt tokens admitted with it (in chunks of the engine's token budget), plus `o`;
- an interval between two scrapes of vLLM's metrics while the engine was busy: its mean step
  time (busy seconds / steps) at its mean decode batch (generation tokens / steps) and its mean
  prefill per step (prompt tokens / steps).

The fit is a ridge ("Bayesian") least squares with the configured prior as its mean: the prior
counts as `PRIOR_WEIGHT` observations per parameter (a diagonal precision, so it pulls each
parameter toward its prior value but adds no pseudo-samples of the prior's *shape*: where data
exist they decide, and outside their range the prior's curvature, not its level, extrapolates).
Rows are weighted by 1/y^2 (relative errors: a 10 ms step and a 1 s TTFT count alike); data
decay by `FORGET` per row, so the model follows an engine that changes; sufficient statistics
make each observation O(1) and a solve (every `SOLVE_EVERY` rows) a 5x5 system.

`confidence` is the data's share of the estimate at the batch the gate plans at: 1 -
var_posterior / var_prior of the predicted step time there (0: the prior alone; near 1: data
dominate); the prefill cost has its own. The policy uses it to stay on the safe side while the
model is unlearned (see saber.py: a slow-start cap on running that opens as data confirm it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from saber_sidecar.speed_model import MIN_SPEED, TABLE_SIZE, table_speed

if TYPE_CHECKING:
    from saber_sidecar.config import SchedulingConfig

MIN_STEP_S = 1e-5
MAX_PREFILL_S_PER_TOKEN = 0.05
N = 5  # t0, t1, t2, c, o
PRIOR_WEIGHT = 2.0  # observations' worth of belief in the prior
PRIOR_HALF_LIFE_ROWS = 8.0  # rows after which the prior counts half as much
RIDGE_SHARE = 0.01  # of PRIOR_WEIGHT design rows per parameter: holds directions no data inform
FORGET = 0.995  # per row: about 200 rows of memory, so the model follows a changing engine
SOLVE_EVERY = 16  # rows between solves once past the first 16 (a solve and its table: ~0.2 ms)
CHUNK_TOKENS = 2048  # prompt tokens one engine step prefills at most (vLLM's token budget), for TTFT rows
# The design over which "one observation's worth" of each parameter is measured: decode rows at
# the batch sizes a gate uses, TTFT rows with typical prompts.
_DESIGN_L = (1, 2, 4, 8, 16, 32, 64)
_DESIGN_P = (256, 1024)
EXPORTED_BATCHES = (1, 2, 4, 8, 16, 32, 64)
OUTLIER_CONFIDENCE = 0.5
OUTLIER_FACTOR = 10.0
FLAT_TOLERANCE = 1e-9  # relative: a step time that falls by less than this with L is flat, not falling


def prior_from_speeds(batches: Sequence[float], speeds: Sequence[float]) -> tuple[float, float, float]:
    """(t0, t1, t2) of the quadratic step time closest (in relative error) to 1 / speed at each batch."""
    L = np.asarray(batches, dtype=float)
    y = 1.0 / np.asarray(speeds, dtype=float)
    if len(L) == 1:
        return float(y[0]), 0.0, 0.0
    cols = [np.ones_like(L), L] + ([L * L] if len(np.unique(L)) >= 3 else [])
    X = np.column_stack(cols) / y[:, None]
    theta, *_ = np.linalg.lstsq(X, np.ones_like(L), rcond=None)
    t = [float(x) for x in theta] + [0.0] * (3 - len(theta))
    return t[0], t[1], t[2]


class EngineModel:
    """Step time and prefill cost of the engine, learned online; what `SaberPolicy` plans with.

    The policy's hot paths read `table` (per-request decode speed v(L) for L = 0..TABLE_SIZE-1,
    non-increasing; v(0) reads as v(1)), `table_array` and `per_token` (prefill seconds per token).
    """

    def __init__(
        self,
        step: tuple[float, float, float],
        prefill_s_per_token: float,
        *,
        online: bool = True,
        chunk_tokens: int = CHUNK_TOKENS,
        table: Sequence[float] | None = None,
        overhead_s: float = 0.0,
    ) -> None:
        t0, t1, t2 = (float(x) for x in step)
        if not all(math.isfinite(x) for x in (t0, t1, t2, prefill_s_per_token)):
            raise ValueError("engine model prior must be finite numbers")
        if t0 + t1 + t2 <= 0 or prefill_s_per_token < 0:
            raise ValueError(f"engine model prior gives no positive step time at L=1: {step}")
        self.online = online
        self.chunk = max(1, chunk_tokens)
        self.prior = np.array([t0, t1, t2, float(prefill_s_per_token), float(overhead_s)])
        self.theta = self.prior.copy()
        self._th = tuple(float(x) for x in self.theta)  # theta as floats, for the per-row paths
        self._conf_cache: dict[int, float] = {}
        self._P0 = np.diag(self._prior_precision())
        # Sufficient statistics of the weighted rows: S = sum w x x^T, b = sum w x y, and the
        # relative residuals' second moment for the error ratio.
        self._S = [[0.0] * N for _ in range(N)]
        self._b = [0.0] * N
        self._yy = 0.0
        self._wy = 0.0
        self._wsum = 0.0
        self._wsum_rows = 0.0  # rows seen (decayed, by weight): the data's size
        self._since = 0
        self._rows = 0  # rows ever added (their decay since is FORGET ** (rows now - rows then))
        # The last row added: (x, its weight over y^2, rows then, its weight), for `revise_decode`.
        self.last_row: tuple[tuple[float, ...], float, int, float] | None = None
        self.observations = 0
        self.refits = 0
        self.r2: float | None = None
        self.error_ratio: float | None = None
        self.confidence = 0.0
        self.prefill_confidence = 0.0
        self._conf_at = 1.0
        self._prior_step: np.ndarray | None = None
        self._top = 0.0  # the largest mean decode batch a row has observed
        self._set_table()
        if table is not None:
            # The configured curve itself, exactly, until the first solve: with learning off (or
            # before any observation) the gate plans with the curve it was given, to the bit.
            if len(table) != TABLE_SIZE:
                raise ValueError(f"a speed table has {TABLE_SIZE} entries, got {len(table)}")
            self._table = list(table)
            self._table_array = np.asarray(self._table)
        # The prior's shape (its step time at each batch), for batches past those the data reach.
        self._prior_step = 1.0 / np.asarray(self._table)

    @classmethod
    def from_speed_table(cls, table: Sequence[float], prefill_s_per_token: float, **kw: Any) -> EngineModel:
        """From a per-request speed curve (e.g. `SpeedModel.table`), fitted at the design's batch sizes."""
        Ls = [L for L in _DESIGN_L if L < len(table)]
        return cls(prior_from_speeds(Ls, [table[L] for L in Ls]), prefill_s_per_token, table=table, **kw)

    # -- what the policy reads ---------------------------------------------------------------

    @property
    def table(self) -> list[float]:
        return self._table

    @property
    def table_array(self) -> np.ndarray:
        return self._table_array

    def speed(self, L: float) -> float:
        return table_speed(self._table, L)

    def step_seconds(self, L: float, prefill_tokens: float = 0.0) -> float:
        t0, t1, t2, c, _ = self._th
        step = t0 + t1 * L + t2 * L * L
        return (step if step > MIN_STEP_S else MIN_STEP_S) + c * prefill_tokens

    @property
    def per_token(self) -> float:
        return self._per_token

    def seconds(self, prompt_tokens: float) -> float:
        return self._per_token * prompt_tokens

    @property
    def ttft_overhead(self) -> float:
        return max(0.0, float(self.theta[4]))

    # -- observations ------------------------------------------------------------------------

    def observe_decode(self, mean_L: float, mean_L2: float, prefill_per_step: float, itl: float,
                       weight: float = 1.0) -> bool:
        """A completed request's mean inter-token time over its decode span; True when re-solved.

        `mean_L`, `mean_L2`: the time-averaged batch (and its square) it decoded in; `prefill_per_step`:
        prompt tokens others prefilled during the span over its steps (output tokens - 1)."""
        self.last_row = None
        if not (mean_L >= 1.0 and itl > 0.0 and math.isfinite(itl) and prefill_per_step >= 0.0):
            return False
        return self._row((1.0, mean_L, max(mean_L2, mean_L * mean_L), prefill_per_step, 0.0), itl, weight)

    def revise_decode(self, row: tuple[tuple[float, ...], float, int, float], y: float, prefill_per_step: float,
                      weight: float = 1.0) -> bool:
        """Correct a decode row added earlier (`last_row` after its `observe_decode`, `y` its
        inter-token time) once its span's prefill is known better: it is taken out of the
        statistics at its decayed weight and put back with the new prefill per step and weight.
        The estimate follows at the next solve; returns False (nothing re-solved yet)."""
        x, w, at, weight0 = row
        if not self.online or prefill_per_step < 0.0 or weight0 <= 0.0:
            return False
        decay = FORGET ** (self._rows - at)
        if decay < 1e-6:
            return False
        f0 = w * decay
        f1 = f0 * weight / weight0
        new = (x[0], x[1], x[2], prefill_per_step, x[4])
        S, b = self._S, self._b
        for i in range(N):
            Si = S[i]
            for j in range(i, N):
                Si[j] += f1 * new[i] * new[j] - f0 * x[i] * x[j]
            b[i] += (f1 * new[i] - f0 * x[i]) * y
        self._yy += (f1 - f0) * y * y
        self._wy += (f1 - f0) * y
        self._wsum += f1 - f0
        self._wsum_rows += decay * (weight - weight0)
        # Solved with the next row, on the rows' schedule (a solve costs ~0.2 ms): a correction
        # adds no row.
        return False

    def observe_ttft(self, L: int, burst_tokens: int, ttft: float, weight: float = 1.0) -> bool:
        """Admission to first token of a request admitted with L running (itself included) and
        `burst_tokens` prompt tokens admitted within one step of it, its own among them."""
        if not (ttft > 0.0 and math.isfinite(ttft) and burst_tokens >= 0):
            return False
        others = max(0, L - 1)  # the requests decoding while its prompt is prefilled
        steps = max(1, math.ceil(burst_tokens / self.chunk))
        k = steps + (0.5 if others else 0.0)  # plus, on a busy engine, half the step in progress
        # The decode part of those steps is taken from the current estimate (decode spans and
        # step counters learn it far better than a TTFT, which is mostly prefill and overhead);
        # the row learns the prefill cost and the overhead.
        t0, t1, t2 = self._th[0], self._th[1], self._th[2]
        decode = k * max(MIN_STEP_S, t0 + t1 * others + t2 * others * others)
        rest = ttft - decode
        if rest <= 0.05 * ttft:
            return False  # all of it explained by the decode estimate (or less): nothing to learn
        # Weighted by the TTFT's own size (a relative error of the TTFT), times the decode
        # estimate's confidence there: while the step time is the prior's guess, so is `rest`.
        key = others or 1
        conf = self._conf_cache.get(key)
        if conf is None:
            conf = self._conf_cache[key] = self.confidence_at(key)
        w = weight * (rest / ttft) ** 2 * max(0.05, conf)
        return self._row((0.0, 0.0, 0.0, float(burst_tokens), 1.0), rest, w)

    def observe_steps(self, steps: float, busy_s: float, generation_tokens: float, prompt_tokens: float,
                      weight: float = 1.0) -> bool:
        """An interval between two scrapes of the engine's counters in which it was busy `busy_s`."""
        if not (steps >= 1 and busy_s > 0.0 and generation_tokens >= 0 and prompt_tokens >= 0):
            return False
        L = max(1.0, generation_tokens / steps)
        return self._row((1.0, L, L * L, prompt_tokens / steps, 0.0), busy_s / steps, weight)

    def _row(self, x: tuple[float, ...], y: float, weight: float) -> bool:
        if not self.online:
            return False
        # Relative weights, against the larger of the observation and half the current prediction:
        # one absurdly small observation (a clock or counter glitch) must not outweigh the rest.
        # Once the model is confident, an observation 10x off its prediction is dropped as a glitch.
        t = self._th
        pred = x[0] * t[0] + x[1] * t[1] + x[2] * t[2] + x[3] * t[3] + x[4] * t[4]
        if self.confidence > OUTLIER_CONFIDENCE and pred > 0 and not (pred / OUTLIER_FACTOR < y < pred * OUTLIER_FACTOR):
            return False
        if x[0] > 0.0 and x[1] > self._top * x[0]:
            self._top = x[1] / x[0]
        ref = y if y > 0.5 * pred else 0.5 * pred
        w = weight / (ref * ref)
        self._rows += 1
        self.last_row = (x, w, self._rows, weight)
        lam = FORGET
        S, b = self._S, self._b
        for i in range(N):
            xi = x[i]
            Si = S[i]
            wxi = w * xi
            for j in range(i, N):
                Si[j] = Si[j] * lam + wxi * x[j]
            b[i] = b[i] * lam + wxi * y
        self._yy = self._yy * lam + w * y * y
        self._wy = self._wy * lam + w * y
        self._wsum = self._wsum * lam + w
        self._wsum_rows = self._wsum_rows * lam + weight
        self.observations += 1
        self._since += 1
        if self._since < SOLVE_EVERY and self.observations > SOLVE_EVERY:
            return False
        return self.solve()

    def solve(self) -> bool:
        """Re-estimate theta from the prior and the rows so far; True when it changed."""
        self._since = 0
        S = np.array(self._S)
        S = np.triu(S) + np.triu(S, 1).T
        b = np.array(self._b)
        # The prior counts as `weight` rows of the data seen: a g-prior, precision
        # (weight / rows) x the data's own information matrix, so in every direction the data
        # inform the estimate is (rows x fit + weight x prior) / (rows + weight),
        # whatever the prior's error (in the data's units: a prior 28x too fast is not 28^2 x more
        # certain). `weight` starts at PRIOR_WEIGHT and halves by PRIOR_HALF_LIFE_ROWS rows:
        # the prior is only a start (a linear pool with a fixed weight would keep a prior 28x off
        # biasing the estimate by weight/rows x 28). A small ridge in the design's units (at the current estimate) holds the
        # directions the data leave open (no prompt variation: c; a narrow batch range: the
        # curvature) at their prior values, so a curve learned on L in 10..16 extrapolates with
        # the prior's curvature, not with noise.
        n = self._wsum_rows
        weight = PRIOR_WEIGHT * PRIOR_HALF_LIFE_ROWS / (PRIOR_HALF_LIFE_ROWS + n)
        P0 = (weight / n) * S if n > 0 else np.zeros_like(S)
        P0 = P0 + np.diag(RIDGE_SHARE * self._prior_precision(self.theta))
        self._P0 = P0
        target = b + P0 @ self.prior
        A = S + P0
        pinned: dict[int, float] = {}
        theta = None
        for _ in range(N):
            A_p, t_p = A.copy(), target.copy()
            for j, value in pinned.items():  # active set: a parameter at its bound
                A_p[j, :] = 0.0
                A_p[:, j] = 0.0
                A_p[j, j] = 1.0
                t_p = t_p - A[:, j] * value
                t_p[j] = value
            try:
                theta = np.linalg.solve(A_p, t_p)
            except np.linalg.LinAlgError:
                return False
            if not np.all(np.isfinite(theta)):
                return False
            # t0 > 0, t1 >= 0 (a bigger batch never makes a step faster), c >= 0, o >= 0.
            low = {0: MIN_STEP_S, 1: 0.0, 3: 0.0, 4: 0.0}
            broken = [j for j, lo in low.items() if j not in pinned and theta[j] < lo]
            if not broken:
                break
            for j in broken:
                pinned[j] = low[j]
        assert theta is not None
        theta[3] = min(theta[3], MAX_PREFILL_S_PER_TOKEN)
        self.theta = theta
        self._th = tuple(float(x) for x in theta)
        self._conf_cache = {}
        self.refits += 1
        # Fit quality over the (weighted, relative) rows, from the statistics.
        if self._wsum > 0:
            sse = max(0.0, float(self._yy - 2.0 * theta @ b + theta @ S @ theta))
            mean = self._wy / self._wsum
            sst = float(self._yy - self._wsum * mean * mean)
            self.error_ratio = math.sqrt(sse / self._wsum_rows) if self._wsum_rows > 0 else None
            self.r2 = 1.0 - sse / sst if sst > 0 else None
        try:
            self._Ainv: np.ndarray | None = np.linalg.inv(A)
        except np.linalg.LinAlgError:
            self._Ainv = None
        self._update_confidence()
        self._set_table()
        return True

    # -- confidence --------------------------------------------------------------------------

    def confidence_at(self, L: float) -> float:
        """The data's share of the predicted step time at batch L (0: prior only, 1: data only)."""
        Ainv = getattr(self, "_Ainv", None)
        if Ainv is None:
            return 0.0
        x = np.array([1.0, L, L * L, 0.0, 0.0])
        return self._share(x, Ainv)

    def _share(self, x: np.ndarray, Ainv: np.ndarray) -> float:
        try:
            prior_var = float(x @ np.linalg.solve(self._P0, x))
        except np.linalg.LinAlgError:
            return 0.0
        post_var = float(x @ Ainv @ x)
        return float(min(1.0, max(0.0, 1.0 - post_var / prior_var))) if prior_var > 0 else 0.0

    def set_operating_point(self, L: float) -> None:
        """The batch the gate plans at, where `confidence` is reported."""
        L = max(1.0, float(L))
        if L != self._conf_at:
            self._conf_at = L
            self._update_confidence()

    def _update_confidence(self) -> None:
        Ainv = getattr(self, "_Ainv", None)
        if Ainv is None:
            return
        self.confidence = self.confidence_at(self._conf_at)
        self.prefill_confidence = self._share(np.array([0.0, 0.0, 0.0, 1.0, 0.0]), Ainv)

    # -- internals ---------------------------------------------------------------------------

    def _prior_precision(self, theta: np.ndarray | None = None) -> np.ndarray:
        """PRIOR_WEIGHT times each parameter's mean weighted square over the design rows, the
        weights (1/y^2) taken at `theta`'s step times (default: the prior's)."""
        rows: list[tuple[float, float, float, float, float]] = []
        for L in _DESIGN_L:
            rows.append((1.0, L, L * L, 0.0, 0.0))
        for L in (1, 8):
            for P in _DESIGN_P:
                others = L - 1
                k = 1.0 + (0.5 if others else 0.0)
                rows.append((k, k * others, k * others * others, float(P), 1.0))
        X = np.array(rows)
        t0, t1, t2, c, _ = self.prior if theta is None else theta
        c = max(c, 1e-7)
        y = np.array([max(1e-4, x[0] * t0 + x[1] * t1 + x[2] * t2 + x[3] * c) for x in X])
        w = 1.0 / (y * y)
        lam = PRIOR_WEIGHT * (w[:, None] * X * X).mean(axis=0)
        out: np.ndarray = np.maximum(lam, 1e-300)
        return out

    def data_range(self) -> tuple[float, float] | None:
        """The batch sizes the decode data cover: their weighted mean L, and (weighted mean of
        L^4)^(1/4), which leans to the top of their range; None before any decode row."""
        s00, s01, s22 = self._S[0][0], self._S[0][1], self._S[2][2]
        return (s01 / s00, (s22 / s00) ** 0.25) if s00 > 0 and s22 > 0 else None

    def _set_table(self) -> None:
        t0, t1, t2, c, _ = (float(x) for x in self.theta)
        Ls = np.arange(TABLE_SIZE, dtype=float)
        Ls[0] = 1.0
        step = t0 + t1 * Ls + t2 * Ls * Ls
        covered = self.data_range()
        peak = -t1 / (2.0 * t2) if t2 < 0 else math.inf
        if covered is not None and 0.5 * covered[0] < peak <= covered[1]:
            # The data show the step time levelling off inside their own range (a flat engine:
            # a small model bound by per-step overhead), so past the peak it holds there, rather
            # than growing with L as the throughput-flat rule below assumes of a range no data
            # reach. A peak below the bulk of the data (t1 pinned at 0 by a fit confounded with
            # prefill) is not such evidence and keeps the cautious rule.
            step[Ls > peak] = t0 + t1 * peak + t2 * peak * peak
        ok = np.isfinite(step) & (step > MIN_STEP_S)
        limit = TABLE_SIZE - 1
        bad = np.nonzero(~ok[1:])[0]
        if len(bad):
            limit = min(limit, int(bad[0]))
        # Falling: by more than rounding (an exactly flat curve, e.g. a calibrated small model,
        # fits with t1 ~ -1e-19, and reading that as a peak at L = 3 priced L = 64 at 21x its step).
        falling = np.nonzero(np.diff(step[1:]) < -FLAT_TOLERANCE * step[2:])[0]
        if len(falling):
            top = int(falling[0]) + 1
            if covered is not None and top < covered[1]:
                # A fit falling inside the batches its data cover (t1 pinned at 0, t2 < 0: a fit
                # confounded with prefill, or a flat engine's noise) is still evidence up to their
                # reach: there the step holds at its peak (the running maximum below), and the
                # cautious rule starts past it. Starting it at the peak (L = 1 or 2) priced the
                # batches the data had just shown at 8-16x their observed step (a flat engine:
                # 84-184 ms against 11 ms observed), and the gate ran one request at a time.
                top = min(TABLE_SIZE - 1, int(covered[1]))
            limit = min(limit, top)
        limit = max(1, limit)
        step[1 : limit + 1] = np.maximum.accumulate(np.maximum(step[1 : limit + 1], MIN_STEP_S))
        base = step[limit] if ok[limit] else max(MIN_STEP_S, t0 + t1 + t2)
        if limit < TABLE_SIZE - 1:
            step[limit + 1 :] = base * Ls[limit + 1 :] / limit
        step[1:] = np.maximum.accumulate(np.maximum(step[1:], MIN_STEP_S))
        step[0] = step[1]
        if self._top > 0 and self._prior_step is not None:
            # Past the largest batch the data have seen, the fit's curvature is a guess (a few
            # batches' worth of data fits a knee as convexity) and so is the prior's: the step is
            # the lower of the fit's and the prior's shape scaled to the fit at that edge. A gate
            # whose prior has the engine's shape but not its speed (or whose fit is flat where
            # the prior rises) still plans, and so learns, the batches it has not run yet.
            edge = min(TABLE_SIZE - 2, max(1, math.ceil(self._top)))
            prior = self._prior_step
            step[edge + 1 :] = np.minimum(step[edge + 1 :], prior[edge + 1 :] * (step[edge] / prior[edge]))
        table = np.maximum(1.0 / step, MIN_SPEED)
        self._table_array = table
        self._table = table.tolist()
        self._per_token = float(c)

    def speeds_at(self, batches: Sequence[int] = EXPORTED_BATCHES) -> dict[int, float]:
        return {L: self._table[L] for L in batches}

    def observe_request(self, L: int, burst_tokens: int, mean_L: float, mean_L2: float, span_prefill: float,
                        output_tokens: int, duration: float, weight: float = 1.0) -> bool:
        """A completed request seen only whole (not streamed): admission to last token is its TTFT
        row plus (output_tokens - 1) decode steps at its mean batch, with `span_prefill` prompt
        tokens others prefilled meanwhile."""
        if not (duration > 0.0 and math.isfinite(duration) and output_tokens >= 1 and mean_L >= 1.0):
            return False
        others = max(0, L - 1)
        steps = max(1, math.ceil(burst_tokens / self.chunk))
        k = steps + (0.5 if others else 0.0)
        d = output_tokens - 1
        row = (k + d, k * others + d * mean_L, k * others * others + d * max(mean_L2, mean_L * mean_L),
               float(burst_tokens) + max(0.0, span_prefill), 1.0)
        return self._row(row, duration, weight)


def engine_model_for(sched: SchedulingConfig) -> EngineModel:
    """The engine model a `SchedulingConfig` starts from: its `engine_profile` when set (a
    calibrated engine: decode table and prefill cost), else the speed curve of `speed_model` and
    the built-in prefill cost `DEFAULT_PREFILL_SECONDS_PER_TOKEN`. Raises ValueError for a prior that gives no
    positive speed."""
    online = sched.speed_model.online_refit
    profile = sched.engine_profile
    if profile is not None:
        Ls = sorted({*_DESIGN_L, *profile.decode_batch_sizes})
        Ls = [L for L in Ls if L <= max(64, profile.decode_batch_sizes[-1])]
        step = prior_from_speeds(Ls, [profile.speed(L) for L in Ls])
        # A calibrated profile also measured the fixed latency outside the engine (HTTP, the relay,
        # tokenising): the TTFT overhead term starts there instead of at 0.
        return EngineModel(step, profile.prefill_s_per_token, online=online, overhead_s=profile.request_overhead_s)
    from saber_sidecar.config import DEFAULT_PREFILL_SECONDS_PER_TOKEN
    from saber_sidecar.speed_model import SpeedModel

    curve = SpeedModel.from_config(sched.speed_model, online_refit=False)
    return EngineModel.from_speed_table(curve.table, DEFAULT_PREFILL_SECONDS_PER_TOKEN, online=online)
