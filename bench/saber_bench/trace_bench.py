"""Trace replay in the benchmark: a window of a trace, scaled to target rates, under every policy.

The client side of a trace request sends only `max_tokens` (the cap); the engine stops at the
trace's output length through a channel the gate never reads:
- sim: `EngineRequest.output_tokens` (the policy gets a `Request` built by the sidecar's own
  `request_for` from the cap; that dataclass has no field for the true length);
- emulator: the request body's `vllm_xargs: {"saber_output_tokens": N}`, which the emulator honours
  and the sidecar forwards untouched;
- real vLLM: the same `vllm_xargs` read by the logits processor `saber_bench.vllm_stop:StopAtLength`
  (loaded with `--logits-processors`), which forces EOS once N tokens are out.

SLA classes come from `--sla FILE` (the sidecar's own config YAML, so a user benchmarks the config
they deploy) or the default code-completion class below; `--class-rule` puts each row in a class.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from saber_sidecar.config import SchedulingConfig, SidecarConfig, SLAClass, load_config

from .grid import RunKey, RunOutput
from .metrics import run_stats
from .parallel import workers
from .traces import (
    DEFAULT_MAX_TOKENS_CAP,
    SYNTHETIC_CODE_TRACE,
    ClassRule,
    TraceRow,
    mean_rate,
    read_trace,
    scale,
    to_specs,
    window,
)
from .workloads import RequestSpec

# The request-body field the emulator and the vLLM logits processor read; the sidecar never does.
HIDDEN_LENGTH_XARG = "saber_output_tokens"
# Engine context for trace runs: the code trace's prompts reach ~7.8k tokens.
TRACE_MAX_MODEL_LEN = 8192

# A code-completion class when no --sla file is given: an IDE waits at most 2 s for a completion and
# wants its first token within 1 s. Chosen once from the use case, not tuned on results.
DEFAULT_CODE_CLASS = SLAClass(name="code", deadline_seconds=2.0, ttft_seconds=1.0)


@dataclass(frozen=True)
class TraceSource:
    """Everything that defines the requests of a trace run (picklable, for pool workers)."""

    path: str = str(SYNTHETIC_CODE_TRACE)
    fmt: str | None = None
    start: float = 0.0
    count: int | None = 1000
    duration: float | None = None
    max_tokens: int = DEFAULT_MAX_TOKENS_CAP
    sla_path: str | None = None
    class_rule: str | None = None
    max_model_len: int = TRACE_MAX_MODEL_LEN
    # True: each request sends its true length as max_tokens with ignore_eos (what `vllm bench serve`
    # does with a timed trace), so the gate sees it; False (default): the cap is sent, lengths hidden.
    visible_lengths: bool = False

    @property
    def label(self) -> str:
        return "trace:" + Path(self.path).stem

    def rows(self) -> list[TraceRow]:
        return _rows(self.path, self.fmt, self.start, self.count, self.duration)

    def base_config(self) -> SidecarConfig:
        if self.sla_path:
            return load_config(self.sla_path)
        return SidecarConfig(classes=[DEFAULT_CODE_CLASS], default_class=DEFAULT_CODE_CLASS.name)

    def config(self, policy: str) -> SidecarConfig:
        """The user's config with the policy under test: static-N replaces the scheduling by a cap;
        saber and saber-paper keep every other scheduling setting of the file."""
        from .policies import check_policy

        check_policy(policy)
        base = self.base_config()
        if policy.startswith("static-"):
            sched = SchedulingConfig(policy="static", static_max_concurrency=int(policy.split("-")[1]))
        else:
            sched = base.scheduling.model_copy(update={"policy": "saber-paper" if policy == "saber-paper" else "saber"})
        return base.model_copy(update={"scheduling": sched})

    def specs(self, rate: float | None = None, speedup: float | None = None) -> list[RequestSpec]:
        rows = self.rows()
        if rate is not None or speedup is not None:
            rows = scale(rows, rate=rate, speedup=speedup)
        cfg = self.base_config()
        rule = ClassRule.parse(self.class_rule) if self.class_rule else None
        deadlines = {c.name: c.deadline_seconds for c in cfg.classes}
        specs = to_specs(rows, self.max_tokens, rule, cfg.default_class, deadlines,
                         max_prompt_tokens=self.max_model_len - self.max_tokens - 1)
        slos = {c.name: (c.ttft_seconds, c.tpot_seconds) for c in cfg.classes}
        from dataclasses import replace

        return [replace(s, ttft_s=slos[s.sla_class][0], tpot_s=slos[s.sla_class][1],
                        max_tokens=s.output_tokens if self.visible_lengths else s.max_tokens) for s in specs]

    def check(self) -> None:
        """Fail early, in the parent process, with the trace's own error message."""
        self.specs()
        if self.class_rule:
            unknown = ClassRule.parse(self.class_rule).classes() - {c.name for c in self.base_config().classes}
            if unknown:
                raise ValueError(f"class rule names classes not in the SLA config: {', '.join(sorted(unknown))}")


@lru_cache(maxsize=8)
def _rows(path: str, fmt: str | None, start: float, count: int | None, duration: float | None) -> list[TraceRow]:
    return window(read_trace(path, fmt), start, count, duration)


def capacity_rps(specs: Sequence[RequestSpec], profile=None, batch: int = 60) -> float:
    """Requests per second the engine completes for this mix at a full batch of `batch` decoding:
    1 / (mean prompt x prefill cost + mean true output x step(batch) / batch). Rates are quoted as
    multiples of it ("1x capacity")."""
    from saber_emulator.profile import load_profile

    prof = profile or load_profile(None)
    n = len(specs)
    prompt = sum(s.prompt_tokens for s in specs) / n
    out = sum(s.output_tokens for s in specs) / n
    per_req = prompt * prof.prefill_s_per_token + out * prof.decode_time(batch) / batch
    return 1.0 / per_req


def run_trace_one(source: TraceSource, key: RunKey, profile: str | None = None) -> RunOutput:
    """One simulated run of a trace window at `key.rate` (a target mean rate, req/s)."""
    from saber_emulator.profile import load_profile

    from .policies import build_policy, request_builder
    from .sim import default_engine, simulate

    t0 = time.perf_counter()
    specs = source.specs(rate=key.rate)
    config = source.config(key.policy)
    policy = build_policy(key.policy, config, key.seed)
    engine = default_engine(load_profile(profile), seed=key.seed, max_model_len=source.max_model_len)
    result = simulate(specs, policy, engine, request_builder(key.policy, config),
                      engine_priority=config.scheduling.engine_priority)
    stats = run_stats(result.records)
    stats.extra.update(engine_steps=result.engine_steps, preemptions=result.preemptions)
    return RunOutput(key, stats, time.perf_counter() - t0,
                     [e / r.sla_s if (e := r.e2e) is not None else math.inf for r in result.records])  # set iff served


def _task(args) -> RunOutput:
    return run_trace_one(*args)


def run_trace_grid(source: TraceSource, rates: Sequence[float], policies: Sequence[str], seeds: int = 1,
                   jobs: int | None = None, profile: str | None = None, progress: bool = True) -> list[RunOutput]:
    keys = [RunKey(source.label, float(r), p, s) for r in rates for p in policies for s in range(seeds)]
    tasks = [(source, k, profile) for k in keys]
    with workers(jobs, len(tasks), "saber bench sim (trace)", progress) as w:
        outputs = list(w.map(_task, tasks))
    return outputs


def rates_for(source: TraceSource, rates: Sequence[float] | None, speedups: Sequence[float] | None,
              loads: Sequence[float] | None, profile: str | None = None) -> tuple[list[float], dict]:
    """Target mean rates from --rates, --speedup (times the window's own rate) or --load (times the
    engine's capacity for this mix); returns them and what they mean."""
    from saber_emulator.profile import load_profile

    specs = source.specs()
    native = mean_rate(source.rows())
    cap = capacity_rps(specs, load_profile(profile))
    if sum(x is not None for x in (rates, speedups, loads)) > 1:
        raise ValueError("give one of --rates, --speedup and --load")
    if speedups:
        out = [native * s for s in speedups]
    elif loads:
        out = [cap * x for x in loads]
    elif rates:
        out = list(rates)
    else:
        out = [native]
    info: dict[str, Any] = {"trace_mean_rate": native, "capacity_rps": cap, "requests": len(specs),
            }
    out = [round(r, 3) for r in out]
    info["load_multiples"] = {f"{r:g}": r / cap for r in out}
    return out, info


def trace_meta(source: TraceSource) -> dict:
    import numpy as np

    specs = source.specs()
    pr = np.array([s.prompt_tokens for s in specs])
    out = np.array([s.output_tokens for s in specs])
    synthetic = Path(source.path).resolve() == SYNTHETIC_CODE_TRACE.resolve()
    return {
        "trace": source.path, "synthetic": synthetic, "window": {"start": source.start, "count": source.count,
                                                                  "duration": source.duration},
        "max_tokens_cap": source.max_tokens, "sla": source.sla_path or "default code class (2 s e2e, 1 s TTFT)",
        "class_rule": source.class_rule, "prompt_tokens_p50_p90": [float(np.median(pr)), float(np.percentile(pr, 90))],
        "output_tokens_p50_p90": [float(np.median(out)), float(np.percentile(out, 90))],
        "hidden_lengths": "clients send max_tokens; the engine stops at the trace's length (sim: "
                          "EngineRequest.output_tokens; live: vllm_xargs.saber_output_tokens)",
    }
