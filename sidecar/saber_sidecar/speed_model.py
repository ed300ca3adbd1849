"""Per-request generation speed v(L) against the number of requests running at once, L.

Three curve forms, as in the paper (SABER.md):

- usl:      v = a / (1 + s L + k L^2)                       params (a, s, k)
- logistic: v = vmin + (vmax - vmin) / (1 + exp(k (L - L0)))  params (vmax, k, L0, vmin)
- linear:   v = a + b L                                      params (a, b)

`fit_all` fits all three and keeps the best R². The logistic is fitted with `vmin = 0` (the paper's
three-parameter logistic): with a free floor it would fit this kind of data as well as the USL form
and the paper's ranking (usl > logistic > linear) would not reproduce. `vmin` stays in the
parameter list so a hand-written curve may set a floor.

`SpeedModel` is what policies query. Its `speed(L)` is made safe to use beyond the data: it never
rises with L (a curve that turns up, like a USL with negative k at large L, is held flat in total
throughput from its turning point, so per-request speed falls as 1/L), never goes below a small
positive floor, and past the largest L the model was fitted on it extrapolates the same way. With
`online_refit` it keeps a bounded window of (concurrency, speed) samples and refits every
`refit_every` samples, so the curve follows the engine it actually runs on. An online refit keeps
the model's form and uses `fit_online` (closed-form weighted least squares of the linearised curve
and one Gauss-Newton step, well under a millisecond, no scipy); its R² is over the window's samples.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from saber_sidecar.config import SpeedModelConfig

FORMS = ("usl", "logistic", "linear")
PARAM_NAMES = {"usl": ("a", "s", "k"), "logistic": ("vmax", "k", "L0", "vmin"), "linear": ("a", "b")}
MIN_SPEED = 1e-3  # tokens/s; keeps required-time arithmetic finite
TABLE_SIZE = 4097  # speed(L) for integer L below this is one list lookup
ANCHOR_POINTS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def table_speed(table: list[float], L: float) -> float:
    """speed(L) read off a per-request speed table (index = running requests, TABLE_SIZE entries):
    exact at integers, interpolated between them (a time-averaged load), and past the table's end
    at the last entry's total throughput shared by L."""
    i = int(L)
    if i == L and 0 <= i < TABLE_SIZE:
        return table[i]
    if L <= 1:
        return table[1]
    if L >= TABLE_SIZE - 1:
        return max(MIN_SPEED, table[-1] * (TABLE_SIZE - 1) / L)
    lo = table[i]
    return lo + (table[i + 1] - lo) * (L - i)


def _usl(L, a, s, k):
    return a / (1.0 + s * L + k * L * L)


def _logistic(L, vmax, k, L0, vmin=0.0):
    z = np.clip(k * (np.asarray(L, dtype=float) - L0), -700.0, 700.0)
    return vmin + (vmax - vmin) / (1.0 + np.exp(z))


def _linear(L, a, b):
    return a + b * L


CURVES: dict[str, Callable[..., np.ndarray]] = {"usl": _usl, "logistic": _logistic, "linear": _linear}


@dataclass(frozen=True)
class FitResult:
    form: str
    params: tuple[float, ...]
    r2: float
    mse: float

    def to_dict(self) -> dict:
        return {"r2": self.r2, "mse": self.mse, "params": list(self.params)}


@dataclass(frozen=True)
class FitReport:
    results: dict[str, FitResult]  # only the forms that converged
    best: str
    samples: int
    max_concurrency: float

    def to_dict(self) -> dict:
        out: dict = {form: (self.results[form].to_dict() if form in self.results else None) for form in FORMS}
        out["best"] = self.best
        return out


def _score(form: str, params: Sequence[float], L: np.ndarray, v: np.ndarray) -> FitResult:
    pred = np.asarray(CURVES[form](L, *params), dtype=float)
    resid = v - pred
    sse = float(np.sum(resid * resid))
    sst = float(np.sum((v - v.mean()) ** 2))
    mse = sse / len(v)
    r2 = 1.0 - sse / sst if sst > 0 else (1.0 if sse == 0 else 0.0)
    return FitResult(form, tuple(float(p) for p in params), r2, mse)


def fit_form(form: str, L: np.ndarray, v: np.ndarray) -> FitResult | None:
    """Least-squares fit of one form; None when it does not converge to a finite curve."""
    from scipy.optimize import OptimizeWarning, curve_fit  # scipy is heavy; only fitting needs it

    vmax_obs = float(v.max())
    try:
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", OptimizeWarning)
            if form == "linear":
                b, a = np.polyfit(L, v, 1)
                params: tuple[float, ...] = (float(a), float(b))
            elif form == "usl":
                p, _ = curve_fit(_usl, L, v, p0=[vmax_obs, 0.01, 0.0], maxfev=20_000)
                params = tuple(float(x) for x in p)
            elif form == "logistic":
                # vmin fixed at 0 (see module docstring). Fitting log(vmax) keeps Levenberg-Marquardt
                # stable when the data only shows the decaying tail, where vmax runs off to large
                # values; the start point comes from a log-linear fit of that tail.
                slope, _ = np.polyfit(L, np.log(v), 1)
                p, _ = curve_fit(
                    lambda x, ln_vmax, k, L0: _logistic(x, np.exp(ln_vmax), k, L0, 0.0),
                    L,
                    v,
                    p0=[math.log(vmax_obs * 2.0), max(-float(slope), 1e-4), float(L.min())],
                    maxfev=5_000,
                )
                params = (float(np.exp(p[0])), float(p[1]), float(p[2]), 0.0)
            else:
                raise ValueError(f"unknown curve form {form!r}; use one of {', '.join(FORMS)}")
    except (RuntimeError, np.linalg.LinAlgError, ValueError) as exc:
        if "unknown curve form" in str(exc):
            raise
        return None
    result = _score(form, params, L, v)
    if not (math.isfinite(result.r2) and math.isfinite(result.mse)):
        return None
    return result


def _as_arrays(L: Sequence[float], v: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    La = np.asarray(L, dtype=float)
    va = np.asarray(v, dtype=float)
    if La.shape != va.shape or La.ndim != 1:
        raise ValueError("concurrency and speed must be two sequences of the same length")
    if len(La) < 4:
        raise ValueError(f"need at least 4 samples to fit, got {len(La)}")
    if not (np.all(np.isfinite(La)) and np.all(np.isfinite(va))):
        raise ValueError("samples must be finite numbers")
    if np.any(La <= 0) or np.any(va <= 0):
        raise ValueError("concurrency and speed must be positive")
    if len(np.unique(La)) < 3:
        raise ValueError("need samples at 3 or more distinct concurrency levels to fit a curve")
    return La, va


def fit_all(L: Sequence[float], v: Sequence[float]) -> FitReport:
    """Fit every form to (concurrency, speed) samples; the best is the one with the highest R²."""
    La, va = _as_arrays(L, v)
    results = {form: r for form in FORMS if (r := fit_form(form, La, va)) is not None}
    if not results:
        raise ValueError("no curve form converged on these samples")
    best = max(results.values(), key=lambda r: r.r2).form
    return FitReport(results, best, len(La), float(La.max()))


def fit_online(form: str, L: np.ndarray, v: np.ndarray, start: Sequence[float]) -> tuple[float, ...] | None:
    """A cheap least-squares fit of one form, for online refits (well under a millisecond).

    - usl: 1/v = (1 + sL + kL^2)/a is linear in (1/a, s/a, k/a). A residual in 1/v is a residual
      in v scaled by 1/v^2, so rows are weighted by v^2 to approximate least squares in v; one
      Gauss-Newton step on the curve itself then polishes the result (kept only if it helps).
    - linear: ordinary least squares.
    - logistic: Gauss-Newton steps on (vmax, k, L0) from `start` (the current curve), vmin fixed.
    None when the data give no finite curve.
    """
    try:
        with np.errstate(all="ignore"):
            if form == "linear":
                b, a = np.polyfit(L, v, 1)
                params: tuple[float, ...] = (float(a), float(b))
            elif form == "usl":
                w = v * v
                X = np.column_stack((w, w * L, w * L * L))
                c = _solve(X, v)  # w / v = v
                if not c[0] > 0:
                    return None
                params = (1.0 / c[0], c[1] / c[0], c[2] / c[0])
                params = _gauss_newton(form, L, v, params, steps=1)
            elif form == "logistic":
                params = _gauss_newton(form, L, v, tuple(float(p) for p in start), steps=4)
            else:
                raise ValueError(f"unknown curve form {form!r}; use one of {', '.join(FORMS)}")
    except np.linalg.LinAlgError:
        return None
    if not all(math.isfinite(p) for p in params):
        return None
    return params


def _solve(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares by the normal equations: a few columns, so far cheaper than an SVD."""
    return np.linalg.solve(X.T @ X, X.T @ y)


def _jacobian(form: str, L: np.ndarray, p: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The curve and its derivatives in the free parameters (logistic: vmin held fixed)."""
    if form == "usl":
        a, s, k = p
        D = 1.0 + s * L + k * L * L
        f = a / D
        g = f / D
        return f, np.column_stack((1.0 / D, -g * L, -g * L * L))
    vmax, k, L0, vmin = p
    e = np.exp(np.clip(k * (L - L0), -700.0, 700.0))
    u = 1.0 / (1.0 + e)
    f = vmin + (vmax - vmin) * u
    du = -(vmax - vmin) * u * u * e  # d f / d (k (L - L0))
    return f, np.column_stack((u, du * (L - L0), -du * k))


def _gauss_newton(form: str, L: np.ndarray, v: np.ndarray, p: tuple[float, ...], steps: int) -> tuple[float, ...]:
    """Gauss-Newton steps, each kept only if it lowers the squared error (halved up to 4 times)."""
    f, J = _jacobian(form, L, p)
    sse = float(np.sum((v - f) ** 2))
    for _ in range(steps):
        delta = _solve(J, v - f)
        if len(p) == 4:
            delta = np.append(delta, 0.0)  # vmin stays
        for _ in range(5):
            q = tuple(float(x) for x in np.asarray(p) + delta)
            fq, Jq = _jacobian(form, L, q)
            sse_q = float(np.sum((v - fq) ** 2))
            if math.isfinite(sse_q) and sse_q < sse:
                p, f, J, sse = q, fq, Jq, sse_q
                break
            delta = delta / 2.0
        else:
            break
    return p


def read_samples_csv(path: str) -> tuple[list[float], list[float]]:
    """Two numeric columns, concurrency then speed, with an optional header row."""
    import csv

    L: list[float] = []
    v: list[float] = []
    with open(path, newline="") as fh:
        for lineno, row in enumerate(csv.reader(fh), start=1):
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) < 2:
                raise ValueError(f"{path}:{lineno}: expected two columns (concurrency, speed), got {len(row)}")
            try:
                a, b = float(row[0]), float(row[1])
            except ValueError:
                if lineno == 1:
                    continue  # header
                raise ValueError(f"{path}:{lineno}: not numbers: {row[0]!r}, {row[1]!r}") from None
            L.append(a)
            v.append(b)
    return L, v


class SpeedModel:
    """v(L) for the policies: fast, positive, non-increasing in L, optionally refitted online."""

    def __init__(
        self,
        form: str = "usl",
        params: Sequence[float] = (102.55, 0.0300, -0.0001),
        *,
        online_refit: bool = False,
        window: int = 512,
        min_samples: int = 32,
        refit_every: int = 16,
        valid_up_to: float | None = None,
    ) -> None:
        if form not in CURVES:
            raise ValueError(f"unknown curve form {form!r}; use one of {', '.join(FORMS)}")
        self.online_refit = online_refit
        self.min_samples = min_samples
        self.refit_every = max(1, refit_every)
        # A ring buffer of (concurrency, speed): refits read it without building arrays.
        self._window = window
        self._buf = np.empty((window, 2))
        self._count = 0
        self._since_refit = 0
        self.refits = 0
        self.r2: float | None = None
        # RMSE over the window relative to the mean observed speed. Unlike R², it stays meaningful
        # when the gate holds concurrency in a narrow band (little variance left to explain).
        self.error_ratio: float | None = None
        self.last_report: FitReport | None = None
        self._set_curve(form, tuple(float(p) for p in params), valid_up_to)
        # The curve we start from stays the prior for online refits.
        self._prior_array = np.asarray(self._table)
        self._prior_limit = self.valid_up_to

    @classmethod
    def from_config(cls, cfg: SpeedModelConfig, *, online_refit: bool | None = None) -> SpeedModel:
        return cls(
            cfg.form,
            cfg.params,
            online_refit=cfg.online_refit if online_refit is None else online_refit,
            window=cfg.window,
            min_samples=cfg.min_samples,
            refit_every=cfg.refit_every,
        )

    def _set_curve(self, form: str, params: tuple[float, ...], valid_up_to: float | None) -> None:
        expected = len(PARAM_NAMES[form])
        if form == "logistic" and len(params) == 3:
            params = (*params, 0.0)
        if len(params) != expected:
            raise ValueError(f"curve form {form!r} takes {expected} params, got {len(params)}")
        Ls = np.arange(TABLE_SIZE, dtype=float)
        Ls[0] = 1.0  # v(0) is read as v(1): an empty engine runs a new request alone
        with np.errstate(all="ignore"):
            raw = np.asarray(CURVES[form](Ls, *params), dtype=float)
        # The curve is trusted from L=1 up to where it stops falling (or leaves the data, or
        # breaks); past that, total throughput is held at its value there.
        ok = np.isfinite(raw) & (raw > 0)
        limit = TABLE_SIZE - 1
        bad = np.nonzero(~ok[1:])[0]
        if len(bad):
            limit = min(limit, int(bad[0]))  # last good index (offset by the [1:] slice)
        rising = np.nonzero(np.diff(raw[1:]) > 0)[0]
        if len(rising):
            limit = min(limit, int(rising[0]) + 1)
        if valid_up_to is not None:
            limit = min(limit, max(1, int(math.floor(valid_up_to))))
        if limit < 1 or not ok[1]:
            raise ValueError(f"curve {form} {params} gives no positive speed at L=1")
        table = raw.copy()
        tail = np.arange(limit + 1, TABLE_SIZE, dtype=float)
        table[limit + 1 :] = raw[limit] * limit / tail
        table = np.minimum.accumulate(np.maximum(table, MIN_SPEED))
        self.form = form
        self.params = params
        self.valid_up_to = float(limit)
        self._table_array = table
        self._table: list[float] = table.tolist()

    @property
    def table(self) -> list[float]:
        """speed(L) for L = 0 .. TABLE_SIZE-1, for callers that index it directly on hot paths."""
        return self._table

    @property
    def table_array(self) -> np.ndarray:
        """`table` as a numpy array (the same floats), for whole-table arithmetic; do not modify."""
        return self._table_array

    def speed(self, L: float) -> float:
        """Predicted per-request speed (tokens/s) with L requests running."""
        return table_speed(self._table, L)

    @property
    def samples(self) -> int:
        return min(self._count, self._window)

    @property
    def last_sample(self) -> tuple[float, float] | None:
        if not self._count:
            return None
        L, v = self._buf[(self._count - 1) % self._window]
        return float(L), float(v)

    def observe(self, concurrency: float, speed: float) -> bool:
        """Record one finished request's (average concurrency, tokens/s); True when it refitted."""
        if not (concurrency > 0 and speed > 0 and math.isfinite(concurrency) and math.isfinite(speed)):
            return False
        # Two scalar stores: assigning a tuple to the row converts it through a temporary array,
        # which cost more than the rest of `observe` (this runs for every finished request).
        i = self._count % self._window
        buf = self._buf
        buf[i, 0] = concurrency
        buf[i, 1] = speed
        self._count += 1
        self._since_refit += 1
        if not self.online_refit or self.samples < self.min_samples or self._since_refit < self.refit_every:
            return False
        return self.refit() is not None

    def refit(self) -> FitReport | None:
        """Refit the model's own form on the current window; keeps the old curve when it cannot.

        This runs on the request path (every `refit_every` finished requests), so it is cheap:
        a closed-form weighted least squares of the linearised curve plus one Gauss-Newton step
        (`fit_online`), no scipy. The offline `saber fit` compares all three forms with `fit_all`.
        """
        self._since_refit = 0
        n = self.samples
        if n < 4:
            return None
        L, v = self._buf[:n, 0], self._buf[:n, 1]
        aL, av = self._anchors(L, v)
        Lf = np.concatenate((L, aL)) if len(aL) else L
        vf = np.concatenate((v, av)) if len(av) else v
        if np.ptp(Lf) <= 0:
            return None  # every sample at one concurrency level: nothing to learn a slope from
        params = fit_online(self.form, Lf, vf, self.params)
        if params is None:
            return None
        try:
            self._set_curve(self.form, params, valid_up_to=None)
        except ValueError:
            return None
        result = _score(self.form, params, L, v)  # R² on the observed samples, not the anchors
        self.r2 = result.r2
        self.error_ratio = math.sqrt(result.mse) / float(v.mean())
        self.refits += 1
        report = FitReport({self.form: result}, self.form, n, float(L.max()))
        self.last_report = report
        return report

    def _anchors(self, L: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pseudo-samples from the prior curve where the window has no data.

        A gate only sees the concurrency it lets happen; a curve fitted on L in 10..16 alone
        extrapolates wildly (and a pessimistic one keeps the gate from ever learning more). So
        outside the observed range the prior's shape, scaled to the observed level, is added with
        a modest weight: the data decide inside their range, the prior's shape outside it.
        """
        lo, hi = float(L.min()), float(L.max())
        idx = np.clip(np.rint(L), 1, TABLE_SIZE - 1).astype(int)
        scale = float(np.median(v / self._prior_array[idx]))
        points = [x for x in ANCHOR_POINTS if (x < lo * 0.8 or x > hi * 1.25) and x <= self._prior_limit]
        if not points:
            return np.empty(0), np.empty(0)
        repeat = max(1, len(L) // (4 * len(points)))
        aL = np.repeat(np.asarray(points, dtype=float), repeat)
        av = scale * self._prior_array[aL.astype(int)]
        return aL, av
