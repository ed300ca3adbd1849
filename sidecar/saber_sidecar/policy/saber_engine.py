"""What `SaberPolicy` (saber.py) knows of its engine, and how it learns it: `EngineView`.

- The engine model (engine_model.py): step time t0 + t1 L + t2 L^2 + c P, learned online from
  completed requests' decode spans and times to first token and from the engine's step counters,
  starting from the configured prior. A decode span's P is what the engine prefilled in it: the
  prompts whose first token came in it, known as the requests around it finish (`note_prefilled`).
  Every admission makes the engine prefill the new prompt, which stalls every running request for
  `prompt_tokens x c` seconds.
- Prompt tokens are the sidecar's estimate (characters / 4); the model is in the engine's tokens.
  `ratio` (engine tokens per estimated token) is learned from `usage` or, without it, from the
  engine's prompt-token counter; `per_token` is c x ratio, what the plan prices an estimated
  prompt token at.
- Safe until learned: a slow-start cap on running (8, then 2x the largest batch completed
  requests ran at, or the engine's step counters showed it running as the model predicted, or,
  before either, a request's first token came as fast as planned at the batch it joined)
  until observations confirm the model, and never more running than the engine's seats
  (`engine_max_num_seqs`, or what its running/waiting metrics show).
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections import deque

from saber_sidecar.policy.base import EngineSnapshot
from saber_sidecar.policy.engine_model import EngineModel
from saber_sidecar.policy.saber_batch import INF, Batch, Run

TTFT_EWMA = 0.2
RATIO_EWMA = 0.1
RATIO_MIN_TOKENS = 2000  # estimated prompt tokens before the engine's counter corrects the estimate
RATIO_IN_FLIGHT = 0.1  # of those, at most this share admitted too recently to be surely counted
INF_SEATS = 1 << 30
SLOW_START_MIN = 8  # batch the gate may plan for before any request has completed
SLOW_START_FACTOR = 2.0  # how far past the largest batch seen (see `batch_seen`) it plans
# Observations (completed requests, busy scrape intervals of the engine's step counters) that
# must confirm the model before the slow-start cap lifts, within this log(observed / predicted)
# (about 25% slower than predicted; faster counts as 0); one within a quarter of that is enough.
SLOW_START_CONFIRM = 4
SLOW_START_ERROR = 0.25
ERROR_EWMA = 0.2
COUNTER_MIN_STEPS = 8  # engine steps in a span worth learning from
# A decode span's prefill (the prompts the engine prefilled between its first and last token) is
# read from the first tokens of the requests around it, which the gate learns as they finish. Its
# row is learned at once, a running request's prefill estimated at its admission plus the TTFT
# estimate; where such estimates could move its step time by more than PENDING_ERROR (requests
# admitted within the recent longest TTFT of the span's start or end), the row is corrected once
# they have finished (given up after PENDING_MAX_FINISHES finishes or PENDING_WAIT_SPANS x its span).
CLUSTER_SHARE = 1.0  # of its cluster-mates admitted after it that the slow-start check counts in a span
PENDING_MAX_FINISHES = 32
PENDING_ERROR = 0.02
PENDING_WAIT_SPANS = 1.0  # (plus the longest TTFT) after it ended
PENDING_KEPT = 1024  # decode rows waiting for their span's prefill
FIRST_TOKENS_KEPT = 4096  # first-token times of finished requests (halved when full)
TTFT_MAX_DECAY = 0.98  # per finish: the recent longest TTFT, the reach of a prefill backlog
COUNTER_SPAN_S = 2.0  # a span of the engine's counters: long next to the bursts it publishes them in
BUSY_SHARE = 0.98  # share of a scrape interval the gate must have had requests running


def _seat_bound(prev: EngineSnapshot, cur: EngineSnapshot) -> bool:
    """Whether requests waited between two scrapes for a seat, not for the token budget: the
    engine made steps and prefilled no prompt tokens meanwhile (True when it exports no counters)."""
    if cur.steps is None or prev.steps is None or cur.prompt_tokens is None or prev.prompt_tokens is None:
        return True
    return cur.steps > prev.steps and cur.prompt_tokens <= prev.prompt_tokens


class EngineView:
    """The engine model, the bounds on the plan while it is unconfirmed, and the learning."""

    def __init__(self, model: EngineModel, batch: Batch, seats: int | None, ttft_prior: float) -> None:
        self.model = model
        self.batch = batch  # its integrals and event log are what the learning reads
        # The engine's seats: vLLM runs at most max_num_seqs at once and queues the rest inside
        # (where no deadline is watched). From the config (the operator sets it from the engine's
        # spec), else learned from the engine's metrics (running while requests wait).
        self.seats_config = seats or INF_SEATS
        self.seats_seen: int | None = None
        self.last_snapshot: EngineSnapshot | None = None
        self.seats = self.seats_config
        # Slow start: until a completed request has run at a batch (or a busy interval of the
        # engine's counters, predicted within SLOW_START_ERROR), the gate plans for at most
        # SLOW_START_FACTOR x the largest batch seen (the model there is still the prior's guess).
        self.batch_seen = 0.0
        self.confirmed = 0  # completed requests whose times were checked against the model
        self.model_error = INF  # their |log(observed / predicted)|, exponentially weighted
        self.streak = 0  # of them in a row, the latest, within SLOW_START_ERROR
        self.miss_end = -INF  # when the latest observation outside it ended
        self.cap = self._compute_cap()
        self.counters: tuple[float, float, float, float, float] | None = None
        self.ttft_estimate = ttft_prior  # admission to first token, exponentially weighted
        self.ratio = 1.0
        self.usage_ratio_seen = False
        self.ratio_known = False
        self.usage_true = self.usage_est = 0.0
        self.counters_first: tuple[float, float] | None = None
        self.per_token = model.per_token  # seconds of engine stall per estimated prompt token
        self.kv_usage = 0.0  # the engine's KV-cache usage, from its metrics
        # When the engine prefilled each finished request's prompt (its first token) and the
        # prompt (estimated tokens), by time; times before `first_floor` were dropped.
        self.first_t: list[float] = []
        self.first_p: list[int] = []
        self.first_floor = -INF
        self.ttft_max = 0.0
        self.finishes = 0
        # Decode rows learned with an estimated prefill, to correct once it is known: (first token,
        # last token, steps, inter-token time, the reach of the backlog then, the model's row,
        # finishes then).
        self.pending: deque[tuple[float, float, int, float, float, tuple[tuple[float, ...], float, int, float], int]] = deque()

    def adopt(self, old: EngineView) -> None:
        """Take over what `old` learned (a reload that keeps the prior)."""
        self.model = old.model
        self.ratio, self.usage_ratio_seen, self.ratio_known = old.ratio, old.usage_ratio_seen, old.ratio_known
        self.sync_prefill()
        self.seats_seen, self.batch_seen = old.seats_seen, old.batch_seen
        self.confirmed, self.model_error, self.streak = old.confirmed, old.model_error, old.streak
        self.miss_end = old.miss_end
        self.cap = self._compute_cap()

    # -- prefill ------------------------------------------------------------------------------

    def prefill_seconds(self, prompt: int, L: int) -> float:
        """Engine time to prefill a prompt (estimated tokens) with L decoding: its tokens' cost and
        the decode part of the steps it is chunked over."""
        model = self.model
        tokens = prompt * self.ratio
        return self.per_token * prompt + tokens / model.chunk * model.step_seconds(L if L > 0 else 1)

    def set_ratio(self, ratio: float) -> None:
        self.ratio = min(max(ratio, 0.05), 20.0)
        self.sync_prefill()

    def sync_prefill(self) -> None:
        """The prefill cost the plan prices estimated prompt tokens at."""
        self.per_token = self.model.per_token * self.ratio

    def note_usage(self, prompt_tokens: int, estimated: int) -> None:
        """The engine's count of a prompt against the sidecar's estimate (characters / 4).
        Token-weighted (sums, not a mean of ratios): short prompts carry a fixed few tokens (BOS,
        template) that would skew it, and long prompts are what prefill costs."""
        self.usage_ratio_seen = self.ratio_known = True
        self.usage_true = self.usage_true * (1 - RATIO_EWMA) + prompt_tokens
        self.usage_est = self.usage_est * (1 - RATIO_EWMA) + estimated
        self.set_ratio(self.usage_true / self.usage_est)

    def note_ttft(self, seconds: float) -> None:
        self.ttft_estimate += TTFT_EWMA * (seconds - self.ttft_estimate)

    def note_prefilled(self, run: Run, now: float, first_token_at: float | None) -> None:
        """A request left the batch (completed or cut off): when the engine prefilled its prompt.

        The engine prefills a prompt in the step that yields its first token (vLLM counts its
        prompt tokens there too). Without a first token (a request not streamed, or one cut off
        before it), a request that ran longer than the TTFT estimate is taken to have been
        prefilled that long after admission."""
        if not self.model.online or run.adopted or not run.req.prompt_tokens:
            return
        self.finishes += 1
        if first_token_at is not None and run.t0 <= first_token_at <= now:
            t = first_token_at
            ttft = t - run.t0
            self.ttft_max = max(ttft, self.ttft_max * TTFT_MAX_DECAY)
        else:
            t = run.t0 + self.ttft_estimate
            if t > now:
                return
        if t < self.first_floor:
            return
        first_t = self.first_t
        if len(first_t) >= FIRST_TOKENS_KEPT:
            half = FIRST_TOKENS_KEPT // 2
            self.first_floor = first_t[half]
            del first_t[:half], self.first_p[:half]
        if not first_t or t >= first_t[-1]:
            first_t.append(t)
            self.first_p.append(run.req.prompt_tokens)
        else:
            i = bisect_right(first_t, t)
            first_t.insert(i, t)
            self.first_p.insert(i, run.req.prompt_tokens)

    def _span_prefill(self, a: float, b: float, reach: float) -> tuple[float, float]:
        """Prompt tokens (estimated) the engine prefilled in (a, b], and how many of them are in doubt.

        Those of finished requests whose first token came in it, and of running ones admitted in
        it at least the recent longest TTFT before `b` (surely prefilled by then). A running
        request admitted within that TTFT before `a`, or before `b`, may or may not have been: it
        counts when its admission plus the TTFT estimate lies in the span, and its prompt is in doubt."""
        t0s = self.batch.run_t0s
        lo = bisect_left(t0s, a - reach)
        i1 = bisect_left(t0s, a)
        i2 = max(i1, bisect_right(t0s, b - reach))
        hi = bisect_left(t0s, b)
        prompts = self.batch.run_prompts
        tokens = sum(prompts[i1:i2]) if i2 > i1 else 0
        doubt = 0
        if lo < i1 or i2 < hi:
            doubt = sum(prompts[lo:i1]) + sum(prompts[i2:hi])
            ttft = self.ttft_estimate
            for i in (*range(lo, i1), *range(i2, hi)):
                if a < t0s[i] + ttft <= b:
                    tokens += prompts[i]
        first_t = self.first_t
        return tokens + sum(self.first_p[bisect_right(first_t, a):bisect_right(first_t, b)]), doubt

    def _weight(self, doubt: float, itl: float, steps: int) -> float:
        """A decode row's weight while `doubt` prompt tokens of its span's prefill are estimated:
        1 while they could move its step time by at most PENDING_ERROR, falling with the square
        beyond (a long span spreads a prompt over many steps; a short one does not)."""
        per_token = self.model.per_token * self.ratio
        if doubt <= 0 or per_token <= 0:
            return 1.0
        r = doubt * per_token / (PENDING_ERROR * itl * steps)
        return 1.0 if r <= 1.0 else 1.0 / (r * r)

    def _learn_decode(self, a: float, b: float, steps: int, mean_L: float, mean_L2: float, itl: float) -> bool:
        """A completed request's decode span (first token at `a`, last at `b`): learned at once, its
        prefill estimated where not yet known (at a weight that says how well), and corrected as
        the requests around it finish."""
        model = self.model
        # How long a prompt may wait for its prefill: the longest recent TTFT, or the prefill
        # backlog the gate predicts now when longer (a burst of admissions).
        reach = max(self.ttft_max, self.batch.prefill_ahead(b))
        tokens, doubt = self._span_prefill(a, b, reach)
        weight = self._weight(doubt, itl, steps)
        changed = model.observe_decode(mean_L, mean_L2, tokens * self.ratio / steps, itl, weight)
        row = model.last_row
        if weight < 1.0 and row is not None:
            if len(self.pending) >= PENDING_KEPT:
                self.pending.popleft()
            self.pending.append((a, b, steps, itl, reach, row, self.finishes))
        return changed

    def _resolve_pending(self, now: float) -> bool:
        """Correct the decode rows learned with an estimated prefill once it is known (or as well
        as it will be: after PENDING_MAX_FINISHES finishes, or PENDING_WAIT_SPANS x its span);
        True when the model changed."""
        pending = self.pending
        model = self.model
        changed = False
        while pending:
            a, b, steps, itl, reach, row, born = pending[0]
            if a < self.first_floor:
                pending.popleft()
                continue
            tokens, doubt = self._span_prefill(a, b, reach)
            weight = self._weight(doubt, itl, steps)
            if weight < 1.0 and self.finishes - born < PENDING_MAX_FINISHES and (
                    now - b < PENDING_WAIT_SPANS * (b - a) + reach):
                break
            pending.popleft()
            if model.revise_decode(row, itl, tokens * self.ratio / steps, weight):
                changed = True
        return changed

    # -- the bounds on the plan ---------------------------------------------------------------

    def _compute_cap(self) -> int:
        """The most requests the gate plans to run: the engine's seats, and while learning, the
        slow-start cap (SLOW_START_FACTOR x `batch_seen`)."""
        seats = self.seats_config if self.seats_seen is None else min(self.seats_config, self.seats_seen)
        self.seats = seats
        if not self.model.online:
            return seats
        if self.confirmed >= SLOW_START_CONFIRM and self.model_error < SLOW_START_ERROR or (
            self.confirmed and self.model_error < SLOW_START_ERROR / 4
        ) or self.streak >= SLOW_START_CONFIRM:
            return seats  # completed requests ran as the model predicted: it may be trusted
        slow = max(SLOW_START_MIN, math.ceil(SLOW_START_FACTOR * self.batch_seen))
        return min(seats, slow)

    def update_cap(self) -> bool:
        """Recompute the planning cap; True when it changed."""
        cap = self._compute_cap()
        if cap != self.cap:
            self.cap = cap
            return True
        return False

    def note_concurrency(self, concurrency: float) -> bool:
        """A completed request ran at this mean batch; True when the planning cap changed."""
        if concurrency > self.batch_seen:
            self.batch_seen = concurrency
            return self.update_cap()
        return False

    def note_first_token(self, run: Run, now: float) -> bool:
        """A running request's first token: True when the slow-start cap grew from it.

        Its time to first token is engine work at the batch it joined (the prompts ahead of it,
        its own, the step in progress) that the plan priced at admission. Seen no slower than
        predicted (within SLOW_START_ERROR), it vouches for that batch as a completed request
        does, long before one completes: waiting for completions held a flat engine at 8 running
        for its first 0.7 s, and the requests queued meanwhile (1 s deadlines) missed. An engine
        slower than the prior (a costly prefill, slow steps) shows it in this very time, so there
        the cap stays until the model has learned it. The model learns nothing here: the row is
        learned when the request finishes, with the prompts around it known (`learn`)."""
        if (not self.model.online or self.confirmed or self.cap >= self.seats or run.adopted
                or run.n0 > self.seats):
            return False
        others = run.n0 - 1
        model = self.model
        ready = run.prefilled if run.prefilled > run.t0 else run.t0
        predicted = ready - run.t0 + model.step_seconds(others) * (1.5 if others else 1.0) + model.ttft_overhead
        observed = now - run.t0
        if not (predicted > 0.0 and 0.0 < observed <= predicted * math.exp(SLOW_START_ERROR)):
            return False
        return self.note_concurrency(float(run.n0))

    def observe_seats(self, snapshot: EngineSnapshot) -> bool:
        """Requests waiting inside the engine while it runs `running`: that is its seat limit
        (vLLM's max_num_seqs, or fewer when its KV cache is full). True when that changed.

        A request just handed over waits until the engine's next step, so one scrape with
        waiting > 0 says nothing; two in a row with the same running count do. Where the engine
        exports its counters, only an interval in which it ran steps and prefilled nothing says
        so: a request also waits while another's long prompt takes the step's whole token budget
        (a slow engine spends seconds in one such step), and reading that as the seat limit held
        a CPU-like engine at 2 running."""
        seen = self.seats_seen
        prev = self.last_snapshot
        if (snapshot.waiting > 0 and snapshot.running > 0 and prev is not None and prev.waiting > 0
                and prev.running == snapshot.running and _seat_bound(prev, snapshot)):
            seen = snapshot.running
        elif seen is not None and snapshot.running > seen:
            seen = snapshot.running
        self.last_snapshot = snapshot
        if seen != self.seats_seen:
            self.seats_seen = seen
            self.cap = self._compute_cap()
            return True
        return False

    def _check_prediction(self, predicted: float, observed: float, start: float, end: float) -> bool:
        """Track how well the model predicted a completed request's times (before learning from it),
        observed from `start` to `end`; True when within SLOW_START_ERROR (or faster).

        Only the unsafe side counts: the slow-start cap guards against a model that is too
        optimistic (an engine slower than planned: admissions that miss). An engine that ran as
        fast or faster than predicted confirms the plan is safe; holding the cap there starves a
        fast engine (a GPU-class engine under the paper prior ran 81% where static caps ran 99%)."""
        if predicted > 0 and observed > 0:
            err = max(0.0, math.log(observed / predicted))
            self.model_error = err if not self.confirmed else self.model_error + ERROR_EWMA * (err - self.model_error)
            # The average still carries the prior's first, large errors for several observations
            # after the model has learned the engine; a run of predictions within the bound
            # confirms the model as it is now, counting only what was observed after the last
            # miss ended (requests that ran alongside it teach the model the same thing at once,
            # and predicting them afterwards is no test of it).
            if err >= SLOW_START_ERROR:
                self.streak = 0
                self.miss_end = max(self.miss_end, end)
            elif start >= self.miss_end:
                self.streak += 1
            self.confirmed += 1
            return err < SLOW_START_ERROR
        return False

    # -- learning -----------------------------------------------------------------------------

    def learn(self, run: Run, now: float, output_tokens: int, first_token_at: float | None,
              prompt_tokens: int | None, limit: int) -> tuple[bool, bool]:
        """Feed one completed request to the engine model; (the model changed, the cap changed).
        `limit`: the batch fresh requests fit in (the operating point the model is sharpest at)."""
        model = self.model
        if not model.online:
            return False, False
        if run.n0 > self.seats:
            return False, False  # it waited inside the engine for a seat: its times are not engine work
        batch = self.batch
        changed = False
        # Prompt tokens in the engine's units: the estimates scaled by the learned ratio, its own
        # prompt as the engine counted it when known.
        ratio = self.ratio
        own = run.req.prompt_tokens
        burst = round((run.burst - own) * ratio + (prompt_tokens if prompt_tokens else own * ratio))
        # A TTFT row needs its prompt tokens in the engine's units: with the engine's counters in
        # view, only once the estimate's error is known (usage, or enough counted tokens).
        ttft_ok = prompt_tokens is not None or self.ratio_known or self.counters_first is None
        # And only a prompt admitted alone (no other prompt within one step of it): in a cluster
        # the engine prefills in its own arrival order, not the gate's, so which prompts a
        # member's first token waited for is not known.
        ttft_ok = ttft_ok and run.burst == own
        if first_token_at is not None and run.t0 <= first_token_at <= now:
            if ttft_ok:
                changed = model.observe_ttft(run.n0, burst, first_token_at - run.t0)
            span = now - first_token_at
            at = batch.state_at(first_token_at) if output_tokens >= 2 and span > 0 else None
            if at is not None:
                steps = output_tokens - 1
                mean_L = (batch.Ae - at[0]) / span
                mean_L2 = (batch.A2 - at[1]) / span
                # The slow-start check prices the span's prefill at the prompts admitted in it
                # and its cluster-mates admitted after it (as before); the row learns the prompts
                # the engine prefilled in it (`_learn_decode`).
                mates = batch.cluster_tokens.get(run.cluster, run.burst) - run.burst
                p_admitted = batch.P - at[2] + CLUSTER_SHARE * max(0, mates)
                self._check_prediction(model.step_seconds(mean_L, p_admitted * ratio / steps), span / steps,
                                       first_token_at, now)
                if self._learn_decode(first_token_at, now, steps, mean_L, mean_L2, span / steps):
                    changed = True
            if self._resolve_pending(now):
                changed = True
        else:
            at = batch.state_at(run.t0)
            duration = now - run.t0
            if at is not None and duration > 0 and ttft_ok:
                mean_L = (batch.Ae - at[0]) / duration
                mean_L2 = (batch.A2 - at[1]) / duration
                span_prefill = (batch.P - at[2] - run.burst) * ratio
                others = run.n0 - 1
                predicted = (model.step_seconds(others, burst) * (1.5 if others else 1.0)
                             + (output_tokens - 1) * model.step_seconds(mean_L, span_prefill / max(1, output_tokens - 1)))
                self._check_prediction(predicted, duration, run.t0, now)
                changed = model.observe_request(run.n0, burst, mean_L, mean_L2, span_prefill,
                                                output_tokens, duration)
        cap_changed = self.update_cap()
        if changed:
            model.set_operating_point(max(1, limit))
            self.sync_prefill()
        return changed, cap_changed

    def observe_counters(self, snapshot: EngineSnapshot, now: float, limit: int) -> tuple[bool, bool]:
        """The engine's own step counters (vLLM's iteration histogram, token counters): over an
        interval in which the gate had requests running throughout, busy seconds per step at the
        mean decode batch and prefill per step: a direct observation of the step-time model.
        (The model changed, the cap changed); the batch has been advanced to `now`."""
        if snapshot.steps is None or snapshot.prompt_tokens is None or snapshot.generation_tokens is None:
            return False, False
        batch = self.batch
        batch.advance(now, self.model, self.seats)
        if self.counters_first is None:
            self.counters_first = (snapshot.prompt_tokens, batch.P)
        elif not self.usage_ratio_seen:
            # The gate is the engine's only client: prompt tokens the engine counted over those
            # the gate estimated, since the first scrape, are the estimate's error.
            # (Prompts admitted in the last two TTFTs may not be prefilled yet: not counted.)
            # Those may or may not be in the engine's count: only while they are a small share of
            # the total is the ratio known to within that share (early in a burst of long prompts
            # it read 2.1 for an estimate that was exact, and every prefill learned was doubled).
            at = batch.state_at(now - 2.0 * max(self.ttft_estimate, 0.01))
            d_engine = snapshot.prompt_tokens - self.counters_first[0]
            d_gate = (at[2] if at is not None else 0.0) - self.counters_first[1]
            in_flight = batch.P - (at[2] if at is not None else self.counters_first[1])
            if d_gate >= RATIO_MIN_TOKENS and d_engine > 0 and in_flight <= RATIO_IN_FLIGHT * d_gate:
                self.set_ratio(d_engine / d_gate)
                self.ratio_known = True
        cur = (now, snapshot.steps, snapshot.prompt_tokens, snapshot.generation_tokens, batch.busy)
        prev = self.counters
        if prev is None:
            self.counters = cur
            return False, False
        dt = now - prev[0]
        dsteps, dprompt, dgen, dbusy = cur[1] - prev[1], cur[2] - prev[2], cur[3] - prev[3], cur[4] - prev[4]
        if dt > 0 and dbusy >= BUSY_SHARE * dt and dsteps >= 0 and (dt < COUNTER_SPAN_S or dsteps < COUNTER_MIN_STEPS):
            # Busy so far: the span grows (the engine publishes its counters in bursts), and until
            # it holds enough steps: on a slow engine one step prefilling a full token budget
            # takes seconds, and cutting spans at a fixed length left it no counter rows at all.
            return False, False
        self.counters = cur
        if dt <= 0 or dsteps < COUNTER_MIN_STEPS or dprompt < 0 or dgen < 0 or dbusy < BUSY_SHARE * dt:
            return False, False  # too few steps, a counter reset, or the engine idle part of the time
        L = max(1.0, dgen / dsteps)
        held = self._check_prediction(self.model.step_seconds(L, dprompt / dsteps), dbusy / dsteps, prev[0], now)
        # The engine ran this batch (its mean decode batch over the interval) as the model
        # predicted: the slow-start cap may grow from it as from a completed request's. Waiting
        # for completions held a slow engine at 8 running for its first long request's whole run
        # (16 s on the paper's curve 3.3x slower, a queue of 64 built behind it). A prediction
        # that failed there grows nothing: the model is still wrong at that batch (a prefill cost
        # 10x the prior's stalls the batch far more than planned).
        if held and L > self.batch_seen:
            self.batch_seen = L
        cap_changed = self.update_cap()
        if self.model.observe_steps(dsteps, dbusy, dgen, dprompt):
            self.model.set_operating_point(max(1, limit))
            self.sync_prefill()
            return True, cap_changed
        return False, cap_changed
