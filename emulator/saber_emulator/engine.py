"""The engine model: step-level continuous batching as in vLLM's V1 scheduler, in virtual time.

Pure: no asyncio, no clock, no I/O. The caller owns time. A simulator drives it as

    out = engine.step(t)          # None when there is nothing to run
    t += out.duration             # the step's results happen at out.end
and the real-time server does the same, sleeping until `out.end` before delivering tokens.

Scheduling, per step (vLLM V1, chunked prefill always on):
1. Running requests first, in admission order. Each asks for the tokens it has not computed yet:
   1 for a decode, the rest of its prompt (up to the step's remaining token budget) for a prefill.
   When the KV cache has too few free blocks, the newest running request (fcfs) or the
   lowest-priority one (priority policy) is preempted: its blocks are freed, its progress is
   dropped (recompute) and it goes back to the head of the waiting queue.
2. If nothing was preempted this step, waiting requests are admitted in queue order while fewer
   than `max_num_seqs` run, token budget remains, their (first chunk of) prompt fits in the
   free blocks and they are ready: the profile's `request_overhead_s` (HTTP, relay, tokenising)
   has passed since they arrived. With nothing running and nobody ready, `step` returns None and
   `next_ready_time()` says when to call it again.
A request entering the batch for the first time adds the profile's `request_step_s` to the step.
A request whose computed tokens catch up with its known tokens samples one new token at the end of
the step; the first one ends its prefill (time to first token).
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .profile import LatencyProfile

FinishReason = Literal["stop", "length", "abort"]


class OutputLengthConfig(BaseModel):
    """How many tokens a request generates when it does not ignore EOS (always capped by max_tokens)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["max", "uniform", "lognormal"] = Field(
        default="uniform",
        description="max: always max_tokens; uniform: integer uniform in "
        "[ceil(low_fraction * max_tokens), max_tokens]; lognormal: median `median_tokens`, shape `sigma`.",
    )
    low_fraction: float = Field(default=0.5, ge=0.0, le=1.0, description="Lower bound of `uniform`, as a share of max_tokens.")
    median_tokens: float = Field(default=200.0, gt=0.0, le=1e7, description="Median of `lognormal`.")
    sigma: float = Field(default=0.8, gt=0.0, le=10.0, description="Shape of `lognormal` (std of the log).")


class EngineConfig(BaseModel):
    """The engine's limits; names follow vLLM's flags."""

    model_config = ConfigDict(extra="forbid")

    max_num_seqs: int = Field(default=256, ge=1, le=100_000, description="At most this many requests run at once.")
    max_num_batched_tokens: int = Field(default=8192, ge=1, le=10_000_000, description="Token budget of one step.")
    max_model_len: int = Field(default=4096, ge=2, le=10_000_000, description="Prompt + output tokens of one request.")
    num_gpu_blocks: int = Field(default=8192, ge=1, le=100_000_000, description="KV cache size in blocks.")
    block_size: int = Field(default=16, ge=1, le=1024, description="Tokens per KV block.")
    scheduling_policy: Literal["fcfs", "priority"] = Field(
        default="fcfs", description="fcfs: queue order; priority: lower `priority` first, then arrival."
    )
    output_len: OutputLengthConfig = Field(default_factory=OutputLengthConfig)

    @model_validator(mode="after")
    def _fits_cache(self) -> EngineConfig:
        capacity = self.num_gpu_blocks * self.block_size
        if self.max_model_len > capacity:
            raise ValueError(
                f"max_model_len {self.max_model_len} exceeds the KV cache capacity "
                f"({self.num_gpu_blocks} blocks x {self.block_size} = {capacity} tokens); "
                "raise num_gpu_blocks or lower max_model_len"
            )
        return self


@dataclass(slots=True)
class EngineRequest:
    """A request handed to the engine. `output_tokens=None`: the engine draws it from the seed."""

    id: str
    prompt_tokens: int
    max_tokens: int
    output_tokens: int | None = None
    priority: int = 0
    arrival_time: float = 0.0
    min_tokens: int = 0
    ignore_eos: bool = False


@dataclass(slots=True)
class FinishedRequest:
    """A request that left the engine, with its timeline on the engine's clock."""

    id: str
    reason: FinishReason
    prompt_tokens: int
    output_tokens: int
    arrival_time: float
    first_scheduled_time: float | None
    first_token_time: float | None
    finish_time: float
    num_preemptions: int


@dataclass(slots=True)
class StepResult:
    """What one step did. Everything in it happens at `end` = `start` + `duration`."""

    start: float
    duration: float
    new_tokens: dict[str, int]
    first_token: list[str]
    finished: list[FinishedRequest]
    preempted: list[str]
    token_intervals: list[float]
    ttfts: list[float]
    num_decode_seqs: int
    num_prefill_tokens: int
    num_scheduled_tokens: int
    context_tokens: int

    @property
    def end(self) -> float:
        return self.start + self.duration


@dataclass(slots=True)
class EngineCounters:
    """Monotone totals, as vLLM's counters report them."""

    prompt_tokens: int = 0
    generation_tokens: int = 0
    preemptions: int = 0
    steps: int = 0
    finished: dict[str, int] = field(default_factory=lambda: {"stop": 0, "length": 0, "abort": 0})


@dataclass(slots=True, eq=False)
class _Req:
    spec: EngineRequest
    target: int
    seq: int
    num_computed: int = 0
    num_output: int = 0
    num_blocks: int = 0
    num_preemptions: int = 0
    running: bool = False
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float = 0.0


class _WaitingQueue:
    """FCFS deque, or a heap ordered by (priority, arrival, seq) for the priority policy."""

    def __init__(self, policy: str) -> None:
        self._fcfs = policy == "fcfs"
        self._dq: deque[_Req] = deque()
        self._heap: list[tuple[int, float, int, _Req]] = []

    def __len__(self) -> int:
        return len(self._dq) if self._fcfs else len(self._heap)

    def push(self, r: _Req) -> None:
        if self._fcfs:
            self._dq.append(r)
        else:
            heapq.heappush(self._heap, (r.spec.priority, r.spec.arrival_time, r.seq, r))

    def push_front(self, r: _Req) -> None:
        if self._fcfs:
            self._dq.appendleft(r)
        else:
            self.push(r)

    def peek(self) -> _Req:
        return self._dq[0] if self._fcfs else self._heap[0][3]

    def pop(self) -> _Req:
        return self._dq.popleft() if self._fcfs else heapq.heappop(self._heap)[3]

    def items(self) -> list[_Req]:
        return list(self._dq) if self._fcfs else [e[3] for e in self._heap]

    def remove(self, r: _Req) -> None:
        if self._fcfs:
            self._dq.remove(r)
        else:
            self._heap = [e for e in self._heap if e[3] is not r]
            heapq.heapify(self._heap)


class EngineCore:
    """The continuous-batching engine in virtual time. Deterministic for a seed."""

    def __init__(self, config: EngineConfig, profile: LatencyProfile, seed: int = 0) -> None:
        self.config = config
        self.profile = profile
        self._rng = random.Random(seed)
        self._reqs: dict[str, _Req] = {}
        self._running: list[_Req] = []
        self._waiting = _WaitingQueue(config.scheduling_policy)
        self._free_blocks = config.num_gpu_blocks
        self._seq = 0
        self.counters = EngineCounters()

    # ---- state -------------------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def kv_cache_usage(self) -> float:
        """Share of KV blocks in use, 0..1 (vllm:kv_cache_usage_perc)."""
        return 1.0 - self._free_blocks / self.config.num_gpu_blocks

    @property
    def has_work(self) -> bool:
        return bool(self._running) or len(self._waiting) > 0

    def next_ready_time(self) -> float | None:
        """When the first waiting request becomes ready to enter a batch (None: nobody waits)."""
        if not len(self._waiting):
            return None
        wait = self.profile.request_overhead_s
        return min(r.spec.arrival_time for r in self._waiting.items()) + wait

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._reqs

    def output_length(self, request_id: str) -> int:
        """The number of tokens this request will generate (drawn or given at add time)."""
        return self._reqs[request_id].target

    # ---- requests ------------------------------------------------------------------------------
    def draw_output_length(self, max_tokens: int, min_tokens: int = 0) -> int:
        cfg = self.config.output_len
        low = max(1, min_tokens)
        if cfg.kind == "max":
            n = max_tokens
        elif cfg.kind == "uniform":
            n = self._rng.randint(max(low, math.ceil(cfg.low_fraction * max_tokens)), max_tokens) if max_tokens >= low else max_tokens
        else:
            n = round(self._rng.lognormvariate(math.log(cfg.median_tokens), cfg.sigma))
        return max(low, min(n, max_tokens))

    def add_request(self, req: EngineRequest) -> None:
        """Queue a request. Raises ValueError on a request the engine could never serve."""
        if req.id in self._reqs:
            raise ValueError(f"duplicate request id {req.id!r}")
        if req.prompt_tokens < 1 or req.max_tokens < 1:
            raise ValueError("prompt_tokens and max_tokens must be >= 1")
        if req.prompt_tokens + req.max_tokens > self.config.max_model_len:
            raise ValueError(
                f"prompt_tokens + max_tokens = {req.prompt_tokens + req.max_tokens} exceeds "
                f"max_model_len {self.config.max_model_len}"
            )
        if req.output_tokens is not None:
            if not 1 <= req.output_tokens <= req.max_tokens:
                raise ValueError(f"output_tokens must be in [1, max_tokens={req.max_tokens}]")
            target = req.output_tokens
        elif req.ignore_eos:
            target = req.max_tokens
        else:
            target = self.draw_output_length(req.max_tokens, min(req.min_tokens, req.max_tokens))
        self._seq += 1
        r = _Req(spec=req, target=target, seq=self._seq)
        self._reqs[req.id] = r
        self._waiting.push(r)

    def abort(self, request_id: str, now: float | None = None) -> FinishedRequest | None:
        """Drop a request wherever it is and free its slot and blocks. None if unknown or done."""
        r = self._reqs.pop(request_id, None)
        if r is None:
            return None
        if r.running:
            self._running.remove(r)
            r.running = False
        else:
            self._waiting.remove(r)
        self._free_blocks += r.num_blocks
        r.num_blocks = 0
        self.counters.finished["abort"] += 1
        return self._finished(r, "abort", r.last_token_time if now is None else now)

    # ---- the step ------------------------------------------------------------------------------
    def step(self, now: float) -> StepResult | None:
        """Schedule and run one step starting at `now`. None when there is nothing to run."""
        if not self._running and not len(self._waiting):
            return None
        cfg = self.config
        bs = cfg.block_size
        budget = cfg.max_num_batched_tokens
        scheduled: dict[_Req, int] = {}
        preempted: list[str] = []
        running = self._running

        i = 0
        while i < len(running) and budget > 0:
            r = running[i]
            n = min(r.spec.prompt_tokens + r.num_output - r.num_computed, budget)
            need = -(-(r.num_computed + n) // bs) - r.num_blocks
            self_preempted = False
            while need > self._free_blocks:
                victim = self._pick_victim()
                vi = running.index(victim)
                running.pop(vi)
                if victim in scheduled:
                    budget += scheduled.pop(victim)
                if vi < i:
                    i -= 1
                self._preempt(victim)
                preempted.append(victim.spec.id)
                if victim is r:
                    self_preempted = True
                    break
            if self_preempted:
                continue
            self._free_blocks -= need
            r.num_blocks += need
            scheduled[r] = n
            budget -= n
            i += 1

        new_requests = 0
        overhead = self.profile.request_overhead_s
        if not preempted:
            waiting = self._waiting
            while len(waiting) and budget > 0 and len(running) < cfg.max_num_seqs:
                r = waiting.peek()
                # Not yet through the serving stack's fixed per-request path (a preempted request was).
                if overhead and r.first_scheduled_time is None and r.spec.arrival_time + overhead > now + 1e-12:
                    break
                n = min(r.spec.prompt_tokens + r.num_output - r.num_computed, budget)
                need = -(-(r.num_computed + n) // bs) - r.num_blocks
                if need > self._free_blocks:
                    break
                waiting.pop()
                self._free_blocks -= need
                r.num_blocks += need
                r.running = True
                running.append(r)
                if r.first_scheduled_time is None:
                    r.first_scheduled_time = now
                    new_requests += 1
                scheduled[r] = n
                budget -= n

        if not scheduled:
            return None

        num_decode = 0
        prefill_tokens = 0
        context = 0
        for r, n in scheduled.items():
            context += r.num_computed
            if n == 1 and r.num_output > 0 and r.num_computed == r.spec.prompt_tokens + r.num_output - 1:
                num_decode += 1
            else:
                prefill_tokens += n
        duration = self.profile.step_time(num_decode, prefill_tokens, context, new_requests)
        end = now + duration

        new_tokens: dict[str, int] = {}
        first: list[str] = []
        intervals: list[float] = []
        ttfts: list[float] = []
        finished: list[FinishedRequest] = []
        counters = self.counters
        for r, n in scheduled.items():
            r.num_computed += n
            if r.num_computed < r.spec.prompt_tokens + r.num_output:
                continue  # a prefill chunk that did not reach the end of the prompt
            r.num_output += 1
            new_tokens[r.spec.id] = 1
            if r.first_token_time is None:
                r.first_token_time = end
                first.append(r.spec.id)
                ttfts.append(end - r.spec.arrival_time)
                counters.prompt_tokens += r.spec.prompt_tokens
            else:
                intervals.append(end - r.last_token_time)
            r.last_token_time = end
            if r.num_output >= r.target:
                reason: FinishReason = "length" if r.num_output >= r.spec.max_tokens else "stop"
                finished.append(self._finished(r, reason, end))
        counters.generation_tokens += len(new_tokens)
        counters.steps += 1
        if finished:
            for f in finished:
                r = self._reqs.pop(f.id)
                r.running = False
                self._free_blocks += r.num_blocks
                r.num_blocks = 0
                counters.finished[f.reason] += 1
            self._running = [r for r in running if r.running]

        return StepResult(
            start=now,
            duration=duration,
            new_tokens=new_tokens,
            first_token=first,
            finished=finished,
            preempted=preempted,
            token_intervals=intervals,
            ttfts=ttfts,
            num_decode_seqs=num_decode,
            num_prefill_tokens=prefill_tokens,
            num_scheduled_tokens=sum(scheduled.values()),
            context_tokens=context,
        )

    def _pick_victim(self) -> _Req:
        if self.config.scheduling_policy == "priority":
            return max(self._running, key=lambda r: (r.spec.priority, r.spec.arrival_time, r.seq))
        return self._running[-1]

    def _preempt(self, r: _Req) -> None:
        self._free_blocks += r.num_blocks
        r.num_blocks = 0
        r.num_computed = 0
        r.running = False
        r.num_preemptions += 1
        self.counters.preemptions += 1
        self._waiting.push_front(r)

    def _finished(self, r: _Req, reason: FinishReason, when: float) -> FinishedRequest:
        return FinishedRequest(
            id=r.spec.id,
            reason=reason,
            prompt_tokens=r.spec.prompt_tokens,
            output_tokens=r.num_output,
            arrival_time=r.spec.arrival_time,
            first_scheduled_time=r.first_scheduled_time,
            first_token_time=r.first_token_time,
            finish_time=when,
            num_preemptions=r.num_preemptions,
        )
