"""`saber bench sim|live --trace FILE ...`: the trace options and the commands they run."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .argtypes import positive_floats


def add_trace_args(p: argparse.ArgumentParser) -> None:
    from .traces import DEFAULT_MAX_TOKENS_CAP, FORMATS

    g = p.add_argument_group(
        "trace replay", "Replay a request trace instead of a suite. The client sends --max-tokens-cap; the engine "
        "stops at the trace's own output length through a field the gate never reads (hidden lengths). "
        "`--trace code` is the synthetic code trace shipped with the benchmark (Azure format, the published "
        "shape of the Azure 2023 code trace; not its data).")
    g.add_argument("--trace", default=None, metavar="FILE",
                   help="trace file (Azure CSV, BurstGPT CSV or Mooncake JSONL), or `code` for the shipped synthetic one")
    g.add_argument("--trace-format", choices=FORMATS, default=None, help="format (default: detected from the header)")
    g.add_argument("--start", type=float, default=0.0, help="window start, seconds into the trace (default 0)")
    g.add_argument("--count", type=int, default=None, help="requests in the window (default 1000 unless --duration)")
    g.add_argument("--duration", type=float, default=None, help="window length in trace seconds")
    g.add_argument("--speedup", type=positive_floats, default=None,
                   help="comma-separated time compression factors (instead of --rates target mean rates)")
    g.add_argument("--load", type=positive_floats, default=None,
                   help="comma-separated target rates as multiples of the engine's capacity for this mix, e.g. 0.5,1,2,3")
    g.add_argument("--max-tokens-cap", type=int, default=DEFAULT_MAX_TOKENS_CAP,
                   help=f"max_tokens every request sends (default {DEFAULT_MAX_TOKENS_CAP}); true lengths above it are cut")
    g.add_argument("--sla", default=None, metavar="FILE",
                   help="the sidecar's own config YAML (classes, scheduling knobs); default: one class `code`, 2 s e2e, 1 s TTFT")
    g.add_argument("--class-rule", default=None,
                   help="which class a row goes to: FIELD:CLASS@EDGE,...,DEFAULT (numbers) or FIELD:VALUE=CLASS,...,DEFAULT; "
                   "FIELD is prompt_tokens, max_tokens or a trace column (e.g. prompt_tokens:short@2048,long)")


def source_from(args: argparse.Namespace):
    from .trace_bench import TraceSource
    from .traces import SYNTHETIC_CODE_TRACE

    path = str(SYNTHETIC_CODE_TRACE) if args.trace == "code" else args.trace
    count = args.count if args.count is not None else (None if args.duration else 1000)
    return TraceSource(path=path, fmt=args.trace_format, start=args.start, count=count, duration=args.duration,
                       max_tokens=args.max_tokens_cap, sla_path=args.sla, class_rule=args.class_rule)


EVIDENCE_SIM = "sim on the paper profile"


def evidence(mode: str, profile: str | None = None, engine: str = "emulator") -> str:
    """The evidence level a result rests on, named in every output."""
    if mode == "sim":
        return EVIDENCE_SIM if not profile else f"sim on the profile {profile} (calibrated or synthetic: see its description)"
    return "live on real vLLM (CPU)" if engine == "vllm" else "live on the emulator (paper profile)"


def run_sim(args: argparse.Namespace) -> int:
    from .grid import summarize
    from .policies import PAPER_POLICIES, REFERENCES
    from .report import write_all
    from .trace_bench import rates_for, run_trace_grid, trace_meta

    try:
        source = source_from(args)
        source.check()
        rates, info = rates_for(source, args.rates, args.speedup, args.load, args.profile)
        policies = args.policies or [*PAPER_POLICIES, *REFERENCES]
    except (OSError, ValueError) as exc:
        print(f"saber bench sim: {exc}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    outputs = run_trace_grid(source, rates, policies, seeds=args.seeds if args.seeds else 1, jobs=args.jobs,
                             profile=args.profile, progress=not args.no_progress)
    summary = summarize(outputs, {})
    cdf: dict = {}
    cdf_rate = max(rates)
    for o in outputs:
        if o.key.rate == cdf_rate and o.ratios is not None:
            cdf.setdefault(o.key.workload, {}).setdefault(o.key.policy, []).extend(o.ratios)
    elapsed = time.perf_counter() - t0
    summary["meta"] = {"suite": source.label, "mode": "sim", "evidence": evidence("sim", args.profile),
                       "seeds": args.seeds, "runs": len(outputs), "elapsed_s": elapsed,
                       "command": "saber " + " ".join(sys.argv[1:]), "profile": args.profile or "paper (default)",
                       **info, **trace_meta(source)}
    summary["oracle_share"] = oracle_share(summary)
    summary["elapsed_s"] = elapsed
    paths = write_all(Path(args.out), summary, cdf, cdf_rate)
    print(f"evidence: {summary['meta']['evidence']}; trace {source.label}, {info['requests']} requests, "
          f"capacity {info['capacity_rps']:.2f} req/s")
    for b in summary["best_static"]:
        share = summary["oracle_share"].get(str(b["rate"]))
        print(f"  rate {b['rate']:g} ({b['rate'] / info['capacity_rps']:.2f}x capacity): "
              f"best static {100 * b['goodput']:.1f}% ({b['policy']}), saber {100 * (b['goodput'] + b.get('saber_minus_best_static', 0)):.1f}%"
              + (f", saber/oracle {100 * share:.0f}%" if share is not None else ""))
    print(f"{len(outputs)} runs in {elapsed:.1f} s; wrote {', '.join(str(p) for p in paths.values())}")
    return 0


def oracle_share(summary: dict) -> dict[str, float | None]:
    """saber's goodput as a share of saber-oracle's, per rate (None where the oracle has 0)."""
    idx = {(c["rate"], c["policy"]): c["goodput"] for c in summary["cells"]}
    out: dict[str, float | None] = {}
    for (rate, pol), g in idx.items():
        if pol == "saber" and (rate, "saber-oracle") in idx:
            o = idx[(rate, "saber-oracle")]
            out[str(rate)] = g / o if o else None
    return out


async def run_live(args: argparse.Namespace, out: Path) -> int:
    """`saber bench live --trace ...`: the window at each rate, every policy, one fresh sidecar each."""
    from .live import comparison_table, run_cells, write_live
    from .machine import describe_machine
    from .trace_bench import rates_for, trace_meta
    from .trace_live import LiveTrace

    source = source_from(args)
    if args.engine == "vllm" and not args.engine_url:
        from dataclasses import replace

        source = replace(source, max_model_len=4096)  # the tiny model's context
    source.check()
    if args.engine == "vllm":  # capacity measured live, repeats interleaved: trace_live.run_vllm_trace
        from .trace_live import write_vllm_trace

        return await write_vllm_trace(args, source, out)
    rates, info = rates_for(source, args.rates, args.speedup, args.load)
    if args.policies is None:
        args.policies = ["static-50", "saber-paper", "saber"]
    t0 = time.perf_counter()
    trace = LiveTrace(source, engine="vllm" if args.engine == "vllm" else "emulator")
    cells = await run_cells(source.label, rates, args.policies, 1, 0, out, engine=args.engine,
                            engine_url=args.engine_url, trace=trace)
    sim = None
    if args.compare_sim and args.engine == "vllm":
        print("note: --compare-sim skipped: the simulator models the paper profile, not this vLLM CPU engine; "
              "calibrate a profile from it first", file=sys.stderr)
    elif args.compare_sim:
        from .grid import RunKey
        from .trace_bench import run_trace_one

        sim = {(r, p): run_trace_one(source, RunKey(source.label, r, p, 0)).stats.goodput
               for r in rates for p in args.policies}
    meta = {"mode": "live", "evidence": evidence("live", engine=args.engine), "command": "saber " + " ".join(sys.argv[1:]),
            "machine": describe_machine(), "elapsed_s": time.perf_counter() - t0, "engine": args.engine_url or args.engine,
            **info, **trace_meta(source)}
    paths = write_live(out, cells, sim, meta, f"saber bench live: {source.label} ({meta['evidence']})")
    print(f"evidence: {meta['evidence']}")
    print(comparison_table(cells, sim))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
