"""`saber bench ...`: sim, live, demo, and the component benchmarks. Heavy imports stay inside."""

from __future__ import annotations

import argparse
import sys

from .argtypes import names, positive_floats
from .machine import describe_machine

COMPONENT_PERF = {
    "emulator": "saber_bench.perf.emulator",
    "sidecar": "saber_bench.perf.sidecar",
    "operator": "saber_bench.perf.operator",
}


def _add_demo_parser(parent: argparse._SubParsersAction) -> None:
    d = parent.add_parser("demo", help="live: one heavy cell, static caps vs saber, table and plot (< 3 min)")
    d.add_argument("--workload", default="W1", help="workload (default W1, the heavy mix)")
    d.add_argument("--rate", type=float, default=15.0, help="request rate (default 15 req/s)")
    d.add_argument("--static", type=names, default=["static-256", "best"],
                   help="comma-separated static caps to compare with; `best` is the best cap 10..100 for this "
                   "cell, picked in simulation after the fact (default static-256,best: vLLM's default cap "
                   "and the best tuned one)")
    d.add_argument("--out", default="out/demo", help="output folder (default out/demo)")
    d.add_argument("--no-trace-panel", action="store_true",
                   help="skip the second panel (a code-trace window replayed with hidden output lengths)")
    d.set_defaults(func=_demo)


def register(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser(
        "bench",
        help="benchmarks: the simulated paper grid, live runs, the demo, component benchmarks",
        description="Measure saber against static caps and the paper's algorithm: `sim` (virtual time, "
        "the shipped policy code over the emulator's engine model), `live` (real processes on loopback), "
        "`demo` (one heavy live cell), and the emulator/sidecar/operator component benchmarks.",
    )
    bench.set_defaults(func=lambda args: (bench.print_help(), 2)[1])
    sub = bench.add_subparsers(dest="bench_command", metavar="SUBCOMMAND")

    s = sub.add_parser("sim", help="run a suite in virtual time (the paper grid in about a minute)")
    s.add_argument("--suite", default="paper",
                   help="paper, humaneval, shapes, all, smoke or robustness (default paper)")
    s.add_argument("--seeds", type=int, default=3, help="seeds per cell (default 3)")
    s.add_argument("--out", default="out/bench-sim", help="output folder (default out/bench-sim)")
    s.add_argument("--workloads", type=names, default=None, help="comma-separated subset of the suite's workloads")
    s.add_argument("--rates", type=positive_floats, default=None, help="comma-separated rates (req/s) instead of the suite's")
    s.add_argument("--policies", type=names, default=None,
                   help="comma-separated policies: static-N, saber-paper, saber, saber-oracle")
    s.add_argument("--jobs", type=int, default=None, help="worker processes (default: all cores)")
    s.add_argument("--profile", default=None,
                   help="engine latency profile: built-in name, JSON or YAML file (default: the paper-calibrated one); "
                   "measure one with `saber calibrate`, or build one with `saber emulator calibrate`")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    _trace_args(s)
    s.set_defaults(func=_sim)

    lv = sub.add_parser("live", help="run chosen cells live: load generator -> sidecar -> emulator (or vLLM)")
    lv.add_argument("--workload", default=None,
                    help="W1, W2, W3, humaneval, bursty, ramp, steady (default W1); with --engine vllm it selects "
                    "the old functional run on that workload instead of the scaled proof")
    lv.add_argument("--rates", type=positive_floats, default=None, help="comma-separated rates (default 15)")
    lv.add_argument("--policies", type=names, default=None,
                    help="comma-separated policies (default static-50,saber-paper,saber; with --engine vllm: "
                    "static-8,16,32,64, saber-paper, saber, saber-warm, saber-calibrated)")
    lv.add_argument("--seeds", type=int, default=None, help="seeds per cell (default 1; --engine vllm: 3)")
    lv.add_argument("--requests", type=int, default=None,
                    help="requests per run (paper mixes, humaneval; default 100; --engine vllm: 200)")
    lv.add_argument("--engine", choices=["emulator", "vllm"], default="emulator",
                    help="emulator (paper-calibrated, default) or a real vLLM CPU server: then, without --workload, "
                    "the real-engine proof (calibrate it, scale the workload to it, loads 0.5x..2x its capacity; "
                    "docs/BENCHMARKS.md)")
    lv.add_argument("--loads", type=positive_floats, default=None,
                    help="--engine vllm: comma-separated loads in multiples of the calibrated capacity "
                    "(default 0.5,1,1.5,2)")
    lv.add_argument("--warmup", type=int, default=None,
                    help="--engine vllm: requests through saber-warm's sidecar before it is measured (default 100)")
    lv.add_argument("--max-num-seqs", type=int, default=64, help="--engine vllm: vLLM's own cap (default 64)")
    lv.add_argument("--quick", action="store_true",
                    help="--engine vllm: a tiny end-to-end run (2 loads, 4 policies, 1 seed, 40 requests)")
    lv.add_argument("--engine-url", default=None, help="use an engine already running at this URL")
    lv.add_argument("--compare-sim", action="store_true", help="also simulate the same cells and compare goodput")
    lv.add_argument("--out", default="out/bench-live", help="output folder (default out/bench-live)")
    _trace_args(lv)
    lv.set_defaults(func=_live)

    rs = sub.add_parser(
        "resim", help="simulate a real-vLLM proof run's cells again, offline, on its calibrated profile varied",
        description="Rebuilds the arrivals of a `saber bench live --engine vllm` run (RUN_DIR: its --out folder) "
        "and simulates its cells and capacity probes again on the profile it calibrated, as calibrated and with "
        "one field varied, to see how a change to the simulator's engine model moves the agreement with the "
        "live cells (seconds instead of a 20-minute live run). Unvaried, it gives the run's own sim numbers.")
    rs.add_argument("run_dir", metavar="RUN_DIR", help="the --out folder of a `saber bench live --engine vllm` run")
    rs.add_argument("--vary", default=None,
                    help="FIELD=V1,V2,...: a profile field set to each value in turn, or scaled with xF "
                    "(e.g. request_step_s=0.002,0.004 or context_s_per_token=x1.25 or decode_step_s=x1.1)")
    rs.add_argument("--tokenizer", default=None,
                    help="the served model's tokenizer.json (default RUN_DIR/vllm-model/tokenizer.json)")
    rs.add_argument("--out", default="out/bench-resim", help="output folder (default out/bench-resim)")
    rs.set_defaults(func=_resim)

    # `saber demo` (the README's first command) and `saber bench demo` are the same command.
    for parent in (sub, subparsers):
        _add_demo_parser(parent)

    for name, module in COMPONENT_PERF.items():
        # No option prefix of its own, so every argument (--help included) is passed on untouched.
        c = sub.add_parser(name, help=f"the {name}'s own benchmark ({module})", add_help=False,
                           prefix_chars="\x00",
                           description=f"Delegates to {module}.main(argv); arguments after `{name}` go to it.")
        c.add_argument("rest", nargs="*")
        c.set_defaults(func=_component(module))


def _evidence(mode: str, profile: str | None = None, engine: str = "emulator") -> str:
    from .trace_cli import evidence

    return evidence(mode, profile, engine)


def _trace_args(p: argparse.ArgumentParser) -> None:
    from .trace_cli import add_trace_args

    add_trace_args(p)


def _component(module: str):
    def run(args: argparse.Namespace) -> int:
        import importlib

        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name and module.startswith(exc.name):
                print(f"saber bench: {module} is not available in this installation ({exc}); "
                      "its component benchmark has not been written or installed yet", file=sys.stderr)
                return 2
            raise
        main = getattr(mod, "main", None)
        if main is None:
            print(f"saber bench: {module} has no main(argv) function", file=sys.stderr)
            return 2
        return int(main(list(args.rest)) or 0)

    return run



def _sim(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from .grid import SUITES, expand, run_grid, summarize
    from .report import write_all

    if args.trace:
        from .trace_cli import run_sim

        return run_sim(args)
    if args.suite == "robustness":  # its own grid: engine profiles that differ from the gate's prior
        from .robustness import run_cli

        return run_cli(args)
    suite = SUITES.get(args.suite)
    if suite is None:
        print(f"saber bench sim: unknown suite {args.suite!r}; choose one of {', '.join(SUITES)}", file=sys.stderr)
        return 2
    try:
        keys = expand(suite, args.seeds, args.workloads, args.rates, args.policies)
    except ValueError as exc:
        print(f"saber bench sim: {exc}", file=sys.stderr)
        return 2
    cdf_rate = suite.cdf_rate if suite.cdf_rate in {k.rate for k in keys} else max(k.rate for k in keys)
    t0 = time.perf_counter()
    if args.profile:
        from saber_emulator.profile import load_profile

        try:
            load_profile(args.profile)  # fail here with a clear message, not in a pool worker
        except (OSError, ValueError) as exc:
            print(f"saber bench sim: cannot load profile {args.profile!r}: {exc}", file=sys.stderr)
            return 2
    outputs, bounds = run_grid(keys, jobs=args.jobs, cdf_rate=cdf_rate, progress=not args.no_progress,
                               profile=args.profile)
    elapsed = time.perf_counter() - t0
    summary = summarize(outputs, bounds)
    cdf: dict = {}
    for o in outputs:
        if o.ratios is not None:
            cdf.setdefault(o.key.workload, {}).setdefault(o.key.policy, []).extend(o.ratios)
    summary["meta"] = {
        "suite": suite.name, "mode": "sim", "seeds": args.seeds, "runs": len(outputs),
        "elapsed_s": elapsed, "run_cpu_s": sum(o.elapsed_s for o in outputs),
        "machine": describe_machine(), "command": "saber " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("saber") else
        f"saber bench sim --suite {suite.name} --seeds {args.seeds} --out {args.out}",
        "cdf_rate": cdf_rate, "profile": args.profile or "paper-qwen2.5-coder-3b (default)",
        "evidence": _evidence("sim", args.profile),
    }
    summary["elapsed_s"] = elapsed
    out = Path(args.out)
    paths = write_all(out, summary, cdf, cdf_rate)
    print(f"evidence: {summary['meta']['evidence']}")
    _print_targets(summary)
    print(f"{len(outputs)} runs in {elapsed:.1f} s; wrote {', '.join(str(p) for p in paths.values())}")
    return 0


def _print_targets(summary: dict) -> None:
    for w, e in summary.get("targets", {}).get("workloads", {}).items():
        paper = f" (paper +{e['paper_gain_points']})" if "paper_gain_points" in e else ""
        red = e.get("cv_reduction")
        print(
            f"{w}: mean gain vs best static {e['mean_gain_points']:+.1f} pts{paper}; "
            f"saber >= best static-1pt in every cell: {e['saber_ge_best_static_every_cell']}; "
            f">= saber-paper-1pt: {e['saber_ge_saber_paper_every_cell']}; "
            f"CV {e['cv_saber']:.3f} vs best static {e['cv_best_static']:.3f}"
            + (f" ({100 * abs(red):.0f}% {'lower' if red >= 0 else 'higher'})" if red is not None and red == red else "")
        )


def _resim(args: argparse.Namespace) -> int:
    from .resim import run_cli

    return run_cli(args)


def _live(args: argparse.Namespace) -> int:
    import asyncio
    from pathlib import Path

    from .live import LiveError, run_live_cli

    if args.trace:
        from .trace_cli import run_live

        runner = run_live(args, Path(args.out))
    elif args.engine == "vllm" and args.workload is None:  # the real-engine proof, workload scaled to the engine
        from .live_vllm import run_cli

        runner = run_cli(args)
    else:
        for name, default in (("workload", "W1"), ("rates", [15.0]), ("policies", ["static-50", "saber-paper", "saber"]),
                              ("seeds", 1), ("requests", 100)):
            if getattr(args, name) is None:
                setattr(args, name, default)
        runner = run_live_cli(args, Path(args.out))
    try:
        return asyncio.run(runner)
    except (LiveError, ValueError) as exc:
        print(f"saber bench live: {exc}", file=sys.stderr)
        return 1


def _demo(args: argparse.Namespace) -> int:
    import asyncio
    from pathlib import Path

    from .live import LiveError, run_demo

    try:
        return asyncio.run(run_demo(args.workload, args.rate, args.static, Path(args.out),
                                    trace_panel=not args.no_trace_panel))
    except (LiveError, ValueError) as exc:
        print(f"saber bench demo: {exc}", file=sys.stderr)
        return 1
