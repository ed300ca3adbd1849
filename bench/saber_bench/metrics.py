"""From per-request records to the numbers of a cell, and the paper's variability metric.

Rules (the same for every policy, so all are compared on the same population of requests):
- A request meets its SLA iff it was not rejected and `finish - arrival <= sla` (arrival is the
  scheduled arrival time) and, where its class sets them, its TTFT (`first token - arrival`) and its
  TPOT (`(e2e - TTFT) / (output tokens - 1)`, 0 for one token) are within their SLOs: the
  definitions of `vllm bench serve --goodput ttft:.. tpot:.. e2el:..` and of aiperf's goodput. Goodput is the share of all requests of the run that meet their SLA:
  a rejected request, or one that never finished, is a miss.
- The variability metric uses every request of the run. A served request (demoted ones included,
  with their real end-to-end time) enters with `e2e / sla`. A rejected or unfinished request has no
  end-to-end time; it enters as a miss no better than the worst served request of the same run:
  `max(1, largest served e2e/sla)`. So rejecting cannot lower a policy's latency numbers.
- Latency percentiles (e2e, TTFT) are over served requests only; the counts of rejected and
  demoted requests are reported beside them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from .measuring import percentile


@dataclass(slots=True)
class RequestRecord:
    """What happened to one request. Times in seconds on the run's clock (0 = start of run)."""

    id: str
    sla_class: str
    arrival: float
    sla_s: float
    rejected: bool = False
    demoted: bool = False
    admitted_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    output_tokens: int = 0
    error: str | None = None
    ttft_slo_s: float | None = None  # the class's TTFT SLO, if any
    tpot_slo_s: float | None = None  # the class's TPOT SLO (s per output token after the first), if any

    @property
    def served(self) -> bool:
        return not self.rejected and self.finished_at is not None and self.error is None

    @property
    def e2e(self) -> float | None:
        # served implies finished_at is set; the second test says so to the type checker
        return self.finished_at - self.arrival if self.served and self.finished_at is not None else None

    @property
    def ttft(self) -> float | None:
        return self.first_token_at - self.arrival if self.served and self.first_token_at is not None else None

    @property
    def tpot(self) -> float | None:
        """vLLM bench serve's TPOT: (e2e - TTFT) / (output tokens - 1); 0 for a one-token output."""
        e2e, ttft = self.e2e, self.ttft
        if e2e is None or ttft is None:
            return None
        return (e2e - ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else 0.0

    def misses(self) -> tuple[str, ...]:
        """Why the request missed: any of rejected, unfinished, e2e, ttft, tpot (empty: it met its SLA)."""
        if self.rejected:
            return ("rejected",)
        e2e = self.e2e
        if e2e is None:
            return ("unfinished",)
        out = []
        if e2e > self.sla_s + 1e-9:
            out.append("e2e")
        if self.ttft_slo_s is not None and (self.ttft is None or self.ttft > self.ttft_slo_s + 1e-9):
            out.append("ttft")
        if self.tpot_slo_s is not None and (self.tpot is None or self.tpot > self.tpot_slo_s + 1e-9):
            out.append("tpot")
        return tuple(out)

    @property
    def met(self) -> bool:
        return not self.misses()


@dataclass(slots=True)
class RunStats:
    """The numbers of one run (one workload, rate, policy and seed)."""

    n: int
    goodput: float
    met: int
    rejected: int
    demoted: int
    unfinished: int
    attainment: dict[str, float]
    e2e_p50: float
    e2e_p95: float
    e2e_p99: float
    ttft_p50: float
    ttft_p95: float
    ttft_p99: float
    mean_e2e_over_sla: float
    throughput_rps: float
    throughput_tok_s: float
    makespan_s: float
    extra: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)



def run_stats(records: Sequence[RequestRecord]) -> RunStats:
    n = len(records)
    served = [r for r in records if r.served]
    e2e = [e for r in served if (e := r.e2e) is not None]  # every served record has one
    ttft = [r.ttft for r in served if r.ttft is not None]
    met = sum(r.met for r in records)
    by_class: dict[str, list[bool]] = {}
    for r in records:
        by_class.setdefault(r.sla_class, []).append(r.met)
    ratios = [e / r.sla_s for r in served if (e := r.e2e) is not None]
    worst = max([1.0, *ratios])
    population = ratios + [worst] * (n - len(served))
    start = min((r.arrival for r in records), default=0.0)
    end = max((r.finished_at for r in served if r.finished_at is not None), default=start)
    makespan = max(end - start, 1e-9)
    return RunStats(
        n=n,
        goodput=met / n if n else math.nan,
        met=met,
        rejected=sum(r.rejected for r in records),
        demoted=sum(r.demoted for r in records),
        unfinished=sum(1 for r in records if not r.rejected and not r.served),
        attainment={k: sum(v) / len(v) for k, v in sorted(by_class.items())},
        e2e_p50=percentile(e2e, 50),
        e2e_p95=percentile(e2e, 95),
        e2e_p99=percentile(e2e, 99),
        ttft_p50=percentile(ttft, 50),
        ttft_p95=percentile(ttft, 95),
        ttft_p99=percentile(ttft, 99),
        mean_e2e_over_sla=float(np.mean(population)) if population else math.nan,
        throughput_rps=len(served) / makespan,
        throughput_tok_s=sum(r.output_tokens for r in served) / makespan,
        makespan_s=makespan,
        extra=miss_counts(records),
    )


MISS_KINDS = ("rejected", "unfinished", "e2e", "ttft", "tpot")


def miss_counts(records: Sequence[RequestRecord]) -> dict[str, float]:
    """Requests missing each SLO (`miss_e2e`, ...); one request can miss several."""
    out = {f"miss_{k}": 0.0 for k in MISS_KINDS}
    for r in records:
        for k in r.misses():
            out[f"miss_{k}"] += 1
    return out


# Fields averaged over seeds to give a cell's numbers; counts are averaged too (per run).
_MEAN_FIELDS = (
    "goodput", "rejected", "demoted", "unfinished", "e2e_p50", "e2e_p95", "e2e_p99", "ttft_p50",
    "ttft_p95", "ttft_p99", "mean_e2e_over_sla", "throughput_rps", "throughput_tok_s",
)


def _nanmean(values: Iterable[float]) -> float:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(vals)) if vals else math.nan


def combine_seeds(runs: Sequence[RunStats]) -> dict:
    """A cell's numbers: the mean over its seeds, plus the per-seed goodputs."""
    if not runs:
        raise ValueError("no runs to combine")
    cell: dict = {f: _nanmean(getattr(r, f) for r in runs) for f in _MEAN_FIELDS}
    classes = sorted({k for r in runs for k in r.attainment})
    cell["attainment"] = {k: _nanmean(r.attainment.get(k, math.nan) for r in runs) for k in classes}
    cell["goodput_per_seed"] = [r.goodput for r in runs]
    cell["goodput_std"] = float(np.std([r.goodput for r in runs]))
    extra_keys = sorted({k for r in runs for k in r.extra})
    for k in extra_keys:
        cell[k] = _nanmean(r.extra.get(k, math.nan) for r in runs)
    return cell


def coefficient_of_variation(values: Sequence[float]) -> float:
    """Population std / mean (the paper's latency variability over rates)."""
    vals = np.asarray([v for v in values if not math.isnan(v)], dtype=float)
    if len(vals) == 0 or vals.mean() == 0:
        return math.nan
    return float(vals.std() / vals.mean())


def best_static_key(cell: dict) -> tuple[float, float, int]:
    """Order of static cells for "best static": goodput, then the lower mean e2e/SLA, then the
    smaller cap. Breaking goodput ties toward the worse latency (as an earlier version did by
    preferring the smaller cap) inflates best static's CV and so saber's claimed CV reduction."""
    lat = cell.get("mean_e2e_over_sla")
    lat = math.inf if lat is None or (isinstance(lat, float) and math.isnan(lat)) else lat
    return (cell["goodput"], -lat, -int(cell["policy"].split("-")[1]))


def cv_comparison(cv: dict[str, float], policy: str = "saber") -> dict:
    """`policy`'s CV against every single static cap and against the per-rate best static, as
    reductions (1 - cv_policy / cv_other; negative: the policy is less steady)."""
    mine = cv.get(policy, math.nan)

    def red(other: float) -> float:
        return 1 - mine / other if other and not math.isnan(other) and not math.isnan(mine) else math.nan

    caps = {p: v for p, v in cv.items() if p.startswith("static-")}
    steadiest = min(caps, key=lambda p: caps[p]) if caps else None
    return {
        "cv_reduction_vs_cap": {p: red(v) for p, v in caps.items()},
        "cv_steadiest_cap": steadiest,
        "cv_reduction_vs_steadiest_cap": red(caps[steadiest]) if steadiest else math.nan,
    }
