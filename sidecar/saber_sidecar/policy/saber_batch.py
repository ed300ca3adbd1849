"""The running batch, for `SaberPolicy` (saber.py): every admitted request until it finishes.

All running requests advance at the engine model's v(L) while L run, so one running integral
W(t) = ∫ v(L) dt gives each one's tokens so far (W(now) - W(admitted)) and so its remaining
tokens: a request is kept as k, the W at which it is predicted to finish, and the batch keeps the
k's sorted (with their deadlines less the margin, INF where unprotected) as flat lists, which is
what the feasibility check (saber_replay.py) replays. Every admission makes the engine prefill its
prompt, which stalls every running request for `prompt tokens x c` seconds: charged to W here.

It also keeps, for learning the engine (saber_engine.py), ∫ min(L, seats) dt, its square, the
time anything ran, a log of those integrals at each event, and the admission times and prompts
of the running requests (whose first tokens the gate does not know yet).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from dataclasses import dataclass
from typing import TYPE_CHECKING

from saber_sidecar.policy.base import Request

if TYPE_CHECKING:
    from saber_sidecar.policy.engine_model import EngineModel
    from saber_sidecar.policy.saber_engine import EngineView

INF = float("inf")
LOG_MAX = 1 << 15  # events kept in the integrals' log (halved when full)
CLUSTERS_KEPT = 4096  # prompt-token totals of recent clusters, for learning from decode spans
REAL_DECAY = 0.95  # per completed request: the worth of planned progress follows ~20 of them


@dataclass(slots=True)
class Run:
    req: Request
    k: float  # W at which it is predicted to finish: W(admitted) + expected tokens
    a0: float  # ∫L dt at admission, for the request's average concurrency
    t0: float
    sla: bool
    tpot_speed: float
    p0: float = 0.0  # prompt tokens admitted before it (the running total), for its prefill stalls
    n0: int = 1  # requests running once it was admitted
    burst: int = 0  # prompt tokens admitted at the same instant up to and including it: one prefill step
    adopted: bool = False  # taken over from another instance (a reload): its times teach nothing
    cluster: float = -1.0  # when its cluster (prompts admitted within one step of each other) began
    w0: float = 0.0  # W at admission: W - w0 is the plan's count of its tokens so far
    prefilled: float = -INF  # when the plan had the engine done prefilling its prompt (and those ahead)


class Batch:
    """The running requests, in predicted finishing order, and the integrals over time they need."""

    __slots__ = ("running", "by_finish", "ks", "dues", "dues_sorted", "W", "A", "t", "sla_running",
                 "tpot_running", "P", "prefill_end", "burst_at", "burst", "cluster_tokens", "Ae", "A2",
                 "busy", "log_t", "log", "run_t0s", "run_prompts", "real_tokens", "real_w")

    def __init__(self) -> None:
        self.running: dict[str, Run] = {}
        # (k, id, deadline less margin, INF for best effort) of running requests, by k
        self.by_finish: list[tuple[float, str, float]] = []
        # The same k's and deadlines, as flat lists for the replay. An admission replaces them by
        # copies (a decision's plan holds the old ones and prices later candidates against them).
        self.ks: list[float] = []
        self.dues: list[float] = []
        self.dues_sorted: list[float] = []  # the finite ones, ascending: the plan's `min_due` in O(1)
        # The running integrals: W = ∫ v(L) dt (tokens per request), A = ∫ L dt, up to `t`.
        self.W = 0.0
        self.A = 0.0
        self.t: float | None = None
        self.sla_running = 0
        self.tpot_running = 0  # running SLA requests with a TPOT target
        self.P = 0.0  # prompt tokens admitted so far
        self.prefill_end = -INF  # when the engine is predicted to have prefilled every admitted prompt
        # Prompts admitted within one engine step of each other (a cluster) are prefilled together.
        self.burst_at = -INF
        self.burst = 0
        self.cluster_tokens: dict[float, int] = {}
        # Engine-seat integrals for learning: ∫ min(L, seats) dt, ∫ min(L, seats)^2 dt, and the
        # time the gate had something running (for the engine's step counters).
        self.Ae = 0.0
        self.A2 = 0.0
        self.busy = 0.0
        # (t, (∫min(L, seats) dt, ∫min(L, seats)^2 dt, prompt tokens admitted)) at each event.
        self.log_t: list[float] = []
        self.log: list[tuple[float, float, float]] = []
        # Admission times of the running requests, ascending, and their prompts (estimated tokens):
        # a decode span's prefill is only known once those admitted around it have reported their
        # first tokens (EngineView.learn).
        self.run_t0s: list[float] = []
        self.run_prompts: list[int] = []
        # Completed requests' output tokens and their planned progress at the end (W - w0),
        # decayed per finish: how many tokens the plan's W has really been worth (`progress`).
        self.real_tokens = 0.0
        self.real_w = 0.0

    def advance(self, now: float, model: EngineModel, seats: int) -> None:
        """Move the integrals on to `now` (L has been constant since the last event)."""
        if self.t is None:
            self.t = now
            self.log_t.append(now)
            self.log.append((0.0, 0.0, 0.0))
            return
        dt = now - self.t
        if dt > 0:
            L = len(self.running)
            if L:
                table = model.table
                self.W += (table[L] if L < len(table) else model.speed(L)) * dt
                self.A += L * dt
                Le = L if L < seats else seats
                self.Ae += Le * dt
                self.A2 += Le * Le * dt
                self.busy += dt
            self.t = now
            log_t = self.log_t
            if len(log_t) >= LOG_MAX:
                del log_t[: LOG_MAX // 2], self.log[: LOG_MAX // 2]
            log_t.append(now)
            self.log.append((self.Ae, self.A2, self.P))

    def state_at(self, t: float) -> tuple[float, float, float] | None:
        """(∫min(L, seats) dt, ∫min(L, seats)^2 dt, prompt tokens admitted) at time t, from the log."""
        log_t = self.log_t
        i = bisect_right(log_t, t) - 1
        if i < 0:
            return None
        a = self.log[i]
        if i + 1 >= len(log_t):
            return a
        b = self.log[i + 1]
        f = (t - log_t[i]) / (log_t[i + 1] - log_t[i])
        return a[0] + (b[0] - a[0]) * f, a[1] + (b[1] - a[1]) * f, b[2]

    def add(self, req: Request, expected: int, tpot_speed: float, due: float, now: float, engine: EngineView) -> Run:
        """Start `req` now: `expected` tokens to go, protected until `due` (INF: unprotected)."""
        sla = not req.best_effort
        k = self.W + expected
        running = self.running
        run = Run(req, k, self.A, now, sla, tpot_speed if sla else 0.0, self.P, len(running) + 1)
        run.w0 = self.W
        running[req.id] = run
        t0s = self.run_t0s
        if t0s and now < t0s[-1]:  # (time never runs backwards; kept sorted all the same)
            i = bisect_right(t0s, now)
            t0s.insert(i, now)
            self.run_prompts.insert(i, req.prompt_tokens)
        else:
            t0s.append(now)
            self.run_prompts.append(req.prompt_tokens)
        key = (k, req.id, due)
        by_finish = self.by_finish
        ks = self.ks
        # Where `key` goes in `by_finish`: a float bisection on k, and only among equal k's (rare)
        # one on the tuples.
        i = bisect_left(ks, k)
        if i < len(ks) and ks[i] == k:
            i = bisect_left(by_finish, key, i, bisect_right(ks, k, i))
        by_finish.insert(i, key)
        # Into copies: the decision's plan holds the old lists and prices later candidates
        # against them (cheaper than copying at every plan; admissions are rarer).
        self.ks = ks = ks.copy()
        ks.insert(i, k)
        self.dues = dues = self.dues.copy()
        dues.insert(i, due)
        if due < INF:
            insort(self.dues_sorted, due)
        prompt = req.prompt_tokens
        if prompt:
            model = engine.model
            # Requests admitted within one engine step of each other are prefilled in the same
            # step (or queue behind each other), so the first token of each waits for all their
            # prompts: that running sum is what its TTFT is regressed on.
            if now - self.burst_at > model.table[len(running)] ** -1:
                self.burst_at, self.burst = now, 0
            self.burst += prompt
            run.burst = self.burst
            run.cluster = self.burst_at  # the cluster's total so far is `cluster_tokens[cluster]`
            self.cluster_tokens[self.burst_at] = self.burst
            if len(self.cluster_tokens) > CLUSTERS_KEPT:
                del self.cluster_tokens[next(iter(self.cluster_tokens))]
            # Its prefill holds up every running request (itself included) for a moment.
            self.P += prompt
            start = self.prefill_end if self.prefill_end > now else now
            self.prefill_end = start + engine.prefill_seconds(prompt, len(running))
            run.prefilled = self.prefill_end
            self.W -= model.speed(len(running)) * (engine.per_token * prompt)
        if sla:
            self.sla_running += 1
        if run.tpot_speed:
            self.tpot_running += 1
        return run

    def remove(self, request_id: str) -> Run | None:
        """Take a finished (or cut-off) request out of the batch; None if it is not running."""
        run = self.running.pop(request_id, None)
        if run is None:
            return None
        # Its entry: the first with its k (a float bisection: cheaper than comparing tuples), then
        # past any others with the same k.
        by_finish = self.by_finish
        ks = self.ks
        i = bisect_left(ks, run.k)
        while by_finish[i][1] != request_id:
            i += 1
        due = self.dues[i]
        del by_finish[i], ks[i], self.dues[i]
        t0s, prompts = self.run_t0s, self.run_prompts
        j = bisect_left(t0s, run.t0)
        prompt = run.req.prompt_tokens
        while j + 1 < len(t0s) and prompts[j] != prompt and t0s[j + 1] == run.t0:
            j += 1  # (any entry with its time and prompt: only the multiset is read)
        del t0s[j], prompts[j]
        if due < INF:
            dues_sorted = self.dues_sorted
            del dues_sorted[bisect_left(dues_sorted, due)]
        if run.sla:
            self.sla_running -= 1
        if run.tpot_speed:
            self.tpot_running -= 1
        return run

    def note_realised(self, run: Run, output_tokens: int) -> None:
        """A request completed with `output_tokens`: what its planned progress was worth."""
        planned = self.W - run.w0
        if planned > 0:
            self.real_tokens = self.real_tokens * REAL_DECAY + output_tokens
            self.real_w = self.real_w * REAL_DECAY + planned

    def progress(self, sla_class: str) -> list[float]:
        """The tokens so far (capped by `max_tokens`) of the running requests of a class: what
        each has produced at least, for its class's length estimate (estimates.py). Planned
        progress scaled by what it has really been worth for the requests that completed (at
        most 1: an unconfirmed model can plan 3-5x the tokens the engine made, and the
        estimate wants a lower bound); nothing before any has completed."""
        if self.real_w <= 0:
            return []
        W = self.W
        worth = min(1.0, self.real_tokens / self.real_w)
        return [min((W - r.w0) * worth, r.req.max_tokens) for r in self.running.values()
                if r.req.sla_class == sla_class and not r.adopted]

    def max_tpot(self) -> float:
        """The highest speed a running TPOT target needs."""
        return max((r.tpot_speed for r in self.running.values()), default=0.0)

    def prefill_ahead(self, now: float) -> float:
        """Seconds until the prompts admitted so far are predicted to be prefilled."""
        end = self.prefill_end
        return end - now if end > now else 0.0
