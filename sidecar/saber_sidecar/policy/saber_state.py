"""The state `SaberPolicy` shares with its mixins, for the type checker only.

`SaberPolicy` (saber.py) is one class assembled from mixins (saber_admit.py, saber_queue.py,
saber_replay.py, saber_load.py) whose methods read the attributes its `__init__` sets and call
each other. Each mixin inherits `_SaberState` only under `TYPE_CHECKING` (at run time it inherits
`object`, as before): this module is never imported at run time, so it costs the hot paths
nothing. A plain class, not a Protocol: mypy reads an attribute a Protocol only declares as
abstract, and an assignment in a mixin as a new definition of it. Keep the annotations in step with `SaberPolicy.__init__` and the methods' signatures.
"""

from __future__ import annotations

from abc import abstractmethod

from saber_sidecar.config import SLAClass
from saber_sidecar.policy.base import Action, EngineSnapshot
from saber_sidecar.policy.engine_model import EngineModel
from saber_sidecar.policy.estimates import OutputEstimate
from saber_sidecar.policy.saber import PlanPrefill
from saber_sidecar.policy.saber_admit import _Run
from saber_sidecar.policy.saber_queue import _Queued
from saber_sidecar.policy.saber_replay import _Plan


class _SaberState:
    # The configuration (`scheduling.saber` and `scheduling`).
    margin: float
    headroom: float
    lookahead: int
    reserve: int
    kv_high: float
    min_recheck: float
    shed: float
    reserve_share: float
    at_risk: float
    be_wait: float
    light_load: float
    max_queue: int
    classes: dict[str, SLAClass]
    # The offered load (saber_load.py).
    _thin: bool
    load_tau: float
    _offered: float
    _offered_t: float
    _offered_start: float | None
    _light: bool
    _light_at: float | None
    _capacity: float
    # The engine model and what bounds the plan.
    model: EngineModel
    _prior_key: tuple[object, ...]
    _seats_config: int
    _seats_seen: int | None
    _last_snapshot: EngineSnapshot | None
    _seats: int
    _batch_seen: float
    _confirmed: int
    _model_error: float
    _cap: int
    _Ae: float
    _A2: float
    _busy: float
    _log_t: list[float]
    _log: list[tuple[float, float, float]]
    _counters: tuple[float, float, float, float, float] | None
    # Output lengths and cold classes.
    _unsized: dict[str, bool]
    _probe_limit: int
    _probes: dict[str, str]
    _estimates: dict[str, OutputEstimate]
    ttft_estimate: float
    # Prompt tokens and prefill.
    _ratio: float
    _usage_ratio_seen: bool
    _ratio_known: bool
    _usage_true: float
    _usage_est: float
    _counters_first: tuple[float, float] | None
    _prefill: PlanPrefill
    _P: float
    _prefill_end: float
    _burst_at: float
    _replays: int
    _resume_at: float | None
    _burst: int
    _cluster_tokens: dict[float, int]
    # The running batch.
    _W: float
    _A: float
    _t: float | None
    _running: dict[str, _Run]
    _by_finish: list[tuple[float, str, float]]
    _ks: list[float]
    _dues: list[float]
    _dues_sorted: list[float]
    _bounds_rate: float
    _bounds_skipped: int
    _sla_running: int
    # The queues.
    _queued: dict[str, _Queued]
    _order: list[tuple[float, int, str, _Queued]]
    _timers: list[tuple[float, int, str, int]]
    _be: list[tuple[float, int, str]]
    _be_reqs: dict[str, _Queued]
    _be_expiry: list[tuple[float, int, str]]
    _seq: int
    _be_admits: float
    _be_t: float
    _be_since: float | None
    _be_moved: float
    _tpot_running: int
    # Caches of the decision.
    _inv: list[float]
    _version: int
    _blocked_at: int
    _inv_for: list[float] | None
    _inv_sliced: dict[int, tuple[list[float], list[float]]]
    _kv_usage: float
    _fresh_need: float
    _limit_table: list[float] | None
    _limit_need: float
    _limit: int

    # Methods one mixin calls on another.
    @abstractmethod
    def _plan(self, now: float) -> _Plan: ...

    @abstractmethod
    def _fits(
        self,
        plan: _Plan,
        expected: float,
        deadline: float | None,
        tpot_speed: float,
        prompt: int = 0,
        span: float = 0.0,
        cold: bool = False,
    ) -> str: ...

    @abstractmethod
    def _miss(self, q: _Queued, now: float, reason: str, out: list[Action]) -> None: ...

    @abstractmethod
    def _hopeless(self, q: _Queued, now: float) -> str | None: ...

    @abstractmethod
    def _warm_up(self, q: _Queued) -> bool: ...

    @abstractmethod
    def _shed_speed(self) -> float: ...

    @abstractmethod
    def _note_best_effort_admit(self, now: float) -> None: ...

    @abstractmethod
    def _fire_timers(self, now: float, out: list[Action]) -> None: ...

    @abstractmethod
    def _expire_best_effort(self, now: float, out: list[Action]) -> None: ...

    @abstractmethod
    def _is_light(self, now: float) -> bool: ...

    @abstractmethod
    def _fresh_limit_cached(self) -> int: ...
