"""The admission-policy contract: one policy, two clocks.

A policy is pure: every call passes `now` (seconds on the driver's clock), returns the actions the
driver must carry out, reads no clock and does no I/O. The sidecar drives it with the wall clock
and a real engine; the benchmark's simulator drives the same code with virtual time and the
emulated engine.

Driver obligations:
- on a config reload, build the new instance, call its `inherit(old)`, then `adopt` every request
  the old one admitted that still runs, and `submit` again every request still queued in the old
  one (after `cancel` there): one instance then owns every request, so its limits hold;
- call `submit` when a request arrives, `finished` when an admitted request ends (any reason:
  `completed=False` when it was cut off, by the client going away or an engine error, so that a
  partial output is not taken for the request's real length or speed),
  `cancel` when a still-queued request's client goes away, and `observe_engine` when fresh engine
  metrics arrive;
- call `wake(now)` no later than `next_wake()` whenever that is not None (deadline timers,
  the paper's dispatch tick);
- carry out every returned action in order: `Admit` sends the request to the engine (with a
  lower engine priority when `best_effort`), `Reject` answers 429 with Retry-After, `Demote`
  only records that the request lost its SLA guarantee (it stays queued as best effort).
Every submitted request eventually gets exactly one `Admit` or `Reject` unless cancelled.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field


@dataclass(slots=True)
class Request:
    """A request as the policy sees it. Times are absolute, on the driver's clock."""

    id: str
    sla_class: str
    arrival: float
    deadline: float
    max_tokens: int
    expected_tokens: int
    prompt_tokens: int = 0
    on_miss: str = "demote"  # "demote" or "reject"
    ttft_deadline: float | None = None
    tpot_target: float | None = None
    # expected_tokens is the true length (only the benchmarks' saber-oracle reference can know it):
    # the policy plans with it instead of the class's learned estimate.
    exact_length: bool = False
    # Set by the policy:
    best_effort: bool = False
    admitted_at: float | None = None


@dataclass(frozen=True, slots=True)
class Admit:
    request_id: str
    best_effort: bool = False


# The reason of a Reject for a full queue: the driver answers it as queue_full, not as an SLA verdict.
QUEUE_FULL = "queue full"


@dataclass(frozen=True, slots=True)
class Reject:
    request_id: str
    reason: str
    retry_after_s: float = 1.0


@dataclass(frozen=True, slots=True)
class Demote:
    request_id: str
    reason: str


Action = Admit | Reject | Demote


@dataclass(frozen=True, slots=True)
class EngineSnapshot:
    """What the driver knows of the engine: from vLLM's /metrics live, from the model in simulation."""

    running: int
    waiting: int
    kv_cache_usage: float = 0.0
    healthy: bool = True
    # The engine's cumulative counters, where it exports them (None: not exported): engine steps
    # (vllm:iteration_tokens_total's count), prompt and generation tokens processed.
    steps: float | None = None
    prompt_tokens: float | None = None
    generation_tokens: float | None = None


@dataclass(slots=True)
class PolicyStats:
    """Introspection for metrics and reports; cheap to compute."""

    queued_sla: int = 0
    queued_best_effort: int = 0
    running: int = 0
    admission_limit: int | None = None
    predicted_speed: float | None = None
    speed_model_r2: float | None = None
    speed_model_error_ratio: float | None = None
    # The learned engine model (policies that learn one): per-request decode speed by batch size,
    # prefill seconds per prompt token, confidence 0..1, observations it learned from.
    engine_speeds: dict[int, float] | None = None
    engine_prefill_seconds_per_token: float | None = None
    engine_model_confidence: float | None = None
    engine_model_observations: int | None = None
    extra: dict[str, float] = field(default_factory=dict)


class Policy(ABC):
    name: str

    @abstractmethod
    def submit(self, req: Request, now: float) -> list[Action]: ...

    @abstractmethod
    def finished(
        self,
        request_id: str,
        now: float,
        output_tokens: int,
        first_token_at: float | None,
        *,
        completed: bool = True,
        prompt_tokens: int | None = None,
    ) -> list[Action]:
        """An admitted request ended after producing `output_tokens`.

        `prompt_tokens`: its prompt length as the engine counted it (the response's `usage`), when
        the driver knows it; `Request.prompt_tokens` is only the sidecar's estimate at submit.

        `completed` is False when it did not run to its natural end (client disconnect, engine
        error, abort): its slot is free all the same, but `output_tokens` is only what it produced
        before being cut off, so policies must not learn output lengths or speeds from it.
        """

    def first_token(self, request_id: str, now: float) -> list[Action]:
        """An admitted request's first token reached the sidecar (streamed responses only); most
        policies learn nothing from it."""
        return []

    @abstractmethod
    def cancel(self, request_id: str, now: float) -> list[Action]:
        """A queued (not yet admitted) request's client went away."""

    @abstractmethod
    def wake(self, now: float) -> list[Action]: ...

    @abstractmethod
    def next_wake(self) -> float | None: ...

    def observe_engine(self, snapshot: EngineSnapshot, now: float) -> list[Action]:
        return []

    @abstractmethod
    def adopt(self, req: Request, now: float) -> None:
        """Take over a request another instance admitted and that is still running (a config
        reload): count it as running from `now`, as if admitted then, with no action. Its
        `finished` comes to this instance."""

    def inherit(self, old: Policy) -> None:  # noqa: B027 -- a deliberate do-nothing hook, not abstract
        """On a reload, before any `adopt`: take over what `old` learned that still holds under
        this instance's config (default: nothing)."""

    @abstractmethod
    def stats(self) -> PolicyStats: ...
