"""Live trace replay: the trace's requests sent to a sidecar in front of the emulator or real vLLM.

The client sends `max_tokens` (the cap) and `vllm_xargs.saber_output_tokens` (the trace's length);
the emulator stops there itself, and real vLLM does through the `StopAtLength` logits processor
(vllm_stop.py) that `start_vllm` loads. Against real vLLM each prompt is fitted with the engine's
own `/tokenize` and `/detokenize`, so it has exactly the trace's prompt tokens.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp

from .capacity import PROBE_STEPS
from .trace_bench import TraceSource
from .traces import synth_prompt
from .vllm_server import CPU_MAX_NUM_BATCHED_TOKENS
from .workloads import RequestSpec

LOGITS_PROCESSOR = "saber_bench.vllm_stop:StopAtLength"


@dataclass
class LiveTrace:
    source: TraceSource
    engine: str = "emulator"
    # vLLM's own cap (--max-num-seqs) when this harness starts vLLM; saber's configs are told it
    # (scheduling.engine_max_num_seqs), as the operator tells a deployed sidecar.
    max_num_seqs: int | None = None
    _fitted: dict = field(default_factory=dict, repr=False)  # (id, prompt tokens) -> prompt fitted by /tokenize

    @property
    def ignore_eos(self) -> bool | None:
        """What live.replay sends: None = the hidden length in vllm_xargs; True = the true length as max_tokens."""
        return True if self.source.visible_lengths else None

    @property
    def emulator_args(self) -> tuple[str, ...]:
        return ("--max-model-len", str(self.source.max_model_len))

    def write_config(self, policy: str, path: Path) -> Path:
        import yaml

        path.parent.mkdir(parents=True, exist_ok=True)
        cfg = self.source.config(policy)
        if self.max_num_seqs and policy.startswith("saber"):
            cfg = cfg.model_copy(update={"scheduling": cfg.scheduling.model_copy(
                update={"engine_max_num_seqs": self.max_num_seqs})})
            cfg = type(cfg).model_validate(cfg.model_dump())  # re-validated as a whole
        path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        return path

    async def specs(self, rate: float, engine_url: str) -> list[RequestSpec]:
        specs = self.source.specs(rate=rate)
        if self.engine == "vllm":
            # Fitted once per request: only the arrival times change with the rate.
            todo = [s for s in specs if (s.id, s.prompt_tokens) not in self._fitted]
            for s in await fit_prompts(engine_url, todo) if todo else []:
                self._fitted[(s.id, s.prompt_tokens)] = s.prompt
            specs = [replace(s, prompt=self._fitted[(s.id, s.prompt_tokens)]) for s in specs]
        return specs

    async def start_vllm(self, out: Path):
        from . import vllm_cpu
        from .live import LiveError

        print("building/starting the vLLM CPU server (tiny model, StopAtLength logits processor) ...", flush=True)
        try:
            (out / "logs").mkdir(parents=True, exist_ok=True)
            model_dir = await asyncio.to_thread(vllm_cpu.build_tiny_model, out / "vllm-model")
            server = stop_at_length_vllm(model_dir, max_num_seqs=self.max_num_seqs or 256,
                                         max_model_len=self.source.max_model_len, log_path=out / "logs" / "vllm.log",
                                         extra_args=["--max-num-batched-tokens", str(CPU_MAX_NUM_BATCHED_TOKENS),
                                                     # every run pays its prefills: the policies replay
                                                     # the same prompts, and a cache hit would make the
                                                     # later runs' prefills free
                                                     "--no-enable-prefix-caching"])
            await asyncio.to_thread(server.start)
        except (RuntimeError, OSError) as exc:
            raise LiveError(f"could not start vLLM: {exc}") from exc
        return server, server.base_url


def _vllm_server_class():
    from .vllm_server import VLLMServer

    class _Server(VLLMServer):
        """vLLM with the StopAtLength logits processor; its package is put on the engine's path."""

        def __init__(self, *args, **kwargs):
            kwargs["extra_args"] = [*kwargs.get("extra_args", ()), "--logits-processors", LOGITS_PROCESSOR]
            super().__init__(*args, **kwargs)

        def environment(self):
            env = super().environment()
            env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
            return env

    return _Server


def stop_at_length_vllm(*args, **kwargs):
    """A `VLLMServer` (same arguments) that loads the StopAtLength logits processor."""
    return _vllm_server_class()(*args, **kwargs)


async def fit_prompts(engine_url: str, specs: list[RequestSpec]) -> list[RequestSpec]:
    """Each prompt re-made with exactly `prompt_tokens` tokens of the engine's tokenizer."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        model = (await (await session.get(engine_url + "/v1/models")).json())["data"][0]["id"]
        out = []
        for i, s in enumerate(specs):
            out.append(replace(s, prompt=await fit_prompt(session, engine_url, model, s.prompt_tokens, i)))
        return out


async def fit_prompt(session: aiohttp.ClientSession, url: str, model: str, n: int, salt: int) -> str:
    async def tok(text: str) -> list[int]:
        async with session.post(url + "/tokenize", json={"model": model, "prompt": text,
                                                          "add_special_tokens": False}) as r:
            r.raise_for_status()
            return (await r.json())["tokens"]

    async def detok(ids: list[int]) -> str:
        async with session.post(url + "/detokenize", json={"model": model, "tokens": ids}) as r:
            r.raise_for_status()
            return (await r.json())["prompt"]

    ids = await tok(synth_prompt(2 * n + 16, salt))
    k = n
    for _ in range(6):  # detokenize/retokenize can merge or split a token at the cut; adjust
        text = await detok(ids[:k])
        m = len(await tok(text))
        if m == n:
            return text
        k += n - m
    raise RuntimeError(f"could not fit a prompt of exactly {n} tokens (got {m})")


# The demo's second panel: a window of the shipped code trace at this multiple of the engine's
# capacity for the window's mix, output lengths hidden from the gate.
DEMO_TRACE_COUNT = 150
DEMO_TRACE_LOAD = 0.75


def best_static_for_trace(source: TraceSource, rate: float) -> str:
    """The static cap (10..100) with the best simulated goodput on this window, after the fact."""
    from .grid import RunKey
    from .policies import STATIC_CAPS
    from .trace_bench import run_trace_one

    scores = {f"static-{n}": run_trace_one(source, RunKey(source.label, rate, f"static-{n}", 0)).stats.goodput
              for n in STATIC_CAPS}
    return max(scores, key=lambda p: (scores[p], -int(p.split("-")[1])))


async def demo_trace_panel(out: Path, statics: list[str]) -> tuple[list[dict], dict, str]:
    """Run the demo's code-trace panel live on the emulator; returns its cells, sim goodputs, title."""
    from .grid import RunKey
    from .live import run_cells
    from .trace_bench import capacity_rps, run_trace_one

    source = TraceSource(count=DEMO_TRACE_COUNT)
    rate = round(DEMO_TRACE_LOAD * capacity_rps(source.specs()), 2)
    policies = [best_static_for_trace(source, rate) if s == "best" else s for s in statics]
    policies = list(dict.fromkeys([*policies, "saber"]))
    title = (f"code trace (synthetic, Azure format): {DEMO_TRACE_COUNT} requests at {rate:g} req/s "
             f"({DEMO_TRACE_LOAD:g}x capacity), lengths hidden")
    print(f"\nsaber demo, panel 2: {title}; {', '.join(policies)}", flush=True)
    cells = await run_cells(source.label, [rate], policies, 1, 0, out, trace=LiveTrace(source))
    sim = {(rate, p): run_trace_one(source, RunKey(source.label, rate, p, 0)).stats.goodput for p in policies}
    return cells, sim, title


def plot_demo(out: Path, panels: list[tuple[list[dict], dict, str]]) -> Path:
    """Goodput bars per panel (live, with the simulator's value hatched beside it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from .report import save_figure

    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.9), squeeze=False)
    for ax, (cells, sim, title) in zip(axes[0], panels):
        x = np.arange(len(cells))
        ax.bar(x - 0.2, [100 * c["goodput"] for c in cells], 0.4, label="live (emulator)",
               color=["tab:blue" if c["policy"] == "saber" else "grey" for c in cells])
        ax.bar(x + 0.2, [100 * sim.get((c["rate"], c["policy"]), float("nan")) for c in cells], 0.4, label="sim",
               color="none", edgecolor="black", hatch="//")
        ax.set_xticks(x, [c["policy"] for c in cells], fontsize=8)
        ax.set_ylim(0, 100)
        ax.set_ylabel("goodput (% meeting SLA)")
        ax.set_title(title, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    return save_figure(fig, out / "demo.png")


# --- Rates relative to a live engine's capacity (real vLLM has no profile to compute it from) ------

# The pass-through sidecar that measures capacity caps far above vLLM's own cap, so the engine's
# own scheduler is what is measured (as live_vllm's calibration does).
PASSTHROUGH_FACTOR = 4


def burst_throughput(records) -> dict:
    """The window sent all at once (every arrival 0): requests served per second of the makespan,
    the engine's throughput for this mix when it is kept full. Rejected or failed requests are not
    served. It only starts the capacity search: a short window at once is no steady state."""
    done = [r.finished_at for r in records if r.served]
    if not done:
        raise RuntimeError(f"capacity probe: none of {len(records)} requests was served")
    makespan = max(done)
    return {"throughput_rps": len(done) / makespan, "served": len(done), "requests": len(records),
            "makespan_s": makespan}


async def measure_capacity(engine_url: str, model: str, specs_at, trace: LiveTrace, out: Path,
                           ignore_eos: bool | None, max_num_seqs: int, steps: int = PROBE_STEPS) -> dict:
    """The engine's capacity on this window (`capacity.search_capacity`, vLLM's own cap behind a
    pass-through sidecar, cap `PASSTHROUGH_FACTOR` x max_num_seqs, judged on the window's SLOs).
    `specs_at(rate)` gives the window at a rate. The search starts at the rate the window sent all
    at once was served (`burst_throughput`)."""
    from .capacity import search_capacity
    from .live import replay, start_sidecar
    from .metrics import run_stats

    cfg = trace.write_config(f"static-{PASSTHROUGH_FACTOR * max_num_seqs}", out / "configs" / "capacity-probe.yaml")
    sidecar = await start_sidecar(engine_url, cfg, out / "logs", "sidecar-capacity-probe")
    try:
        base = await specs_at(1.0)
        records, _ = await replay(sidecar.url, model, [replace(s, arrival=0.0) for s in base], ignore_eos=ignore_eos)
        burst = burst_throughput(records)
        print(f"capacity probe: the window at once, {burst['served']} served in {burst['makespan_s']:.1f} s", flush=True)

        async def probe(rate: float) -> dict:
            specs = await specs_at(rate)
            records, lag = await replay(sidecar.url, model, specs, ignore_eos=ignore_eos)
            return {"goodput": run_stats(records).goodput, "window_s": max((s.arrival for s in specs), default=0.0),
                    "send_lag_max_s": lag["send_lag_max_s"], "load1": load1()}

        found = await search_capacity(probe, burst["throughput_rps"], steps=steps)
    finally:
        sidecar.stop()
    return {**found, "burst": burst}


def load1() -> float:
    """The machine's 1-minute load average (recorded beside each live run: the machine is shared)."""
    import os

    return os.getloadavg()[0]


def spread(values: list[float]) -> dict:
    """Mean, population std, min and max of per-repeat values (goodput, as fractions or points)."""
    import statistics

    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


async def run_vllm_trace(source: TraceSource, policies: list[str], repeats: int, out: Path, *,
                         rates: list[float] | None = None, loads: list[float] | None = None,
                         max_num_seqs: int = 64, engine_url: str | None = None) -> tuple[list[dict], dict]:
    """The trace window on real vLLM, hidden lengths, at `rates` or at `loads` x the capacity
    measured live on this window; `repeats` runs of every policy on the same arrivals, each behind a
    fresh sidecar, policies in a rotated order per repeat (a slow minute of the shared machine then
    falls on different policies). Returns cells (means over repeats) and what the rates mean."""
    from .live import _dump_records, engine_model, replay, start_sidecar
    from .metrics import combine_seeds, run_stats
    from .policies import check_policy

    for p in policies:
        check_policy(p)
    if (rates is None) == (loads is None):
        raise ValueError("give one of rates and loads")
    trace = LiveTrace(source, engine="vllm", max_num_seqs=max_num_seqs)
    server = None
    info: dict = {"max_num_seqs": max_num_seqs, "repeats": repeats}
    try:
        if engine_url is None:
            server, engine_url = await trace.start_vllm(out)
            info["vllm_start_s"] = server.start_seconds
        model = await engine_model(engine_url)
        if loads is not None:
            async def specs_at(rate: float) -> list[RequestSpec]:
                return await trace.specs(rate, engine_url)

            info["capacity"] = await measure_capacity(engine_url, model, specs_at, trace, out, trace.ignore_eos,
                                                      max_num_seqs)
            info["load1_capacity_probe"] = load1()
            rates = [round(x * info["capacity"]["capacity_rps"], 2) for x in loads]
            info["loads"] = dict(zip((f"{r:g}" for r in rates), loads))
        assert rates is not None
        cells = []
        for rate in rates:
            specs = await trace.specs(rate, engine_url)
            runs: dict[str, list] = {p: [] for p in policies}
            extra: dict[str, dict[str, list]] = {p: {"lag": [], "load1": [], "ratios": []} for p in policies}
            for rep in range(repeats):
                order = policies[rep % len(policies):] + policies[:rep % len(policies)]
                for policy in order:
                    cfg = trace.write_config(policy, out / "configs" / f"{policy}.yaml")
                    sidecar = await start_sidecar(engine_url, cfg, out / "logs", f"sidecar-{policy}")
                    try:
                        records, lag = await replay(sidecar.url, model, specs, ignore_eos=trace.ignore_eos,
                                                    progress=f"{rate:g} req/s {policy} repeat {rep}")
                    finally:
                        sidecar.stop()
                    _dump_records(out / "requests" / f"{rate:g}-{policy}-{rep}.jsonl", records)
                    runs[policy].append(run_stats(records))
                    extra[policy]["lag"].append(lag["send_lag_max_s"])
                    extra[policy]["load1"].append(load1())
                    extra[policy]["ratios"] += [e / r.sla_s if (e := r.e2e) is not None else math.inf for r in records]
            for policy in policies:
                cell: dict[str, Any] = {"workload": source.label, "rate": rate, "policy": policy, "seeds": repeats,
                                        "mode": "live",
                        "load": (info.get("loads") or {}).get(f"{rate:g}")}
                cell.update(combine_seeds(runs[policy]))
                cell["goodput_spread"] = spread(cell["goodput_per_seed"])
                cell["errors"] = sum(r.unfinished for r in runs[policy])
                cell["send_lag_max_s"] = max(extra[policy]["lag"])
                cell["send_lag_max_per_repeat"] = extra[policy]["lag"]
                cell["load1_per_repeat"] = extra[policy]["load1"]
                cell["ratios"] = extra[policy]["ratios"]
                cells.append(cell)
                print(f"  {rate:g} req/s {policy:>12}: goodput {100 * cell['goodput']:.1f}% "
                      f"(repeats {', '.join(f'{100 * g:.0f}' for g in cell['goodput_per_seed'])})  "
                      f"rejected {cell['rejected']:.0f}  TTFT p50 {cell['ttft_p50']:.3f} s", flush=True)
        return cells, info
    finally:
        if server is not None:
            server.stop()


def repeats_table(cells: list[dict]) -> str:
    """Markdown: per rate and policy the mean goodput over repeats, its spread, and the per-repeat values."""
    from .report import markdown_table

    head = ["rate", "load", "policy", "goodput % mean", "std", "min–max", "per repeat", "TTFT p50 s", "e2e p50/p95 s",
            "rejected (mean)", "demoted (mean)", "client send lag max s", "machine load (1 min)"]
    rows = []
    for c in cells:
        s = c["goodput_spread"]
        rows.append([
            f"{c['rate']:g}", f"{c['load']:g}x" if c.get("load") else "–", c["policy"], f"{100 * s['mean']:.1f}",
            f"{100 * s['std']:.1f}", f"{100 * s['min']:.0f}–{100 * s['max']:.0f}",
            "/".join(f"{100 * g:.0f}" for g in c["goodput_per_seed"]), f"{c['ttft_p50']:.3f}",
            f"{c['e2e_p50']:.2f}/{c['e2e_p95']:.2f}", f"{c['rejected']:.1f}", f"{c.get('demoted', 0):.1f}",
            f"{c['send_lag_max_s']:.2f}",
            f"{min(c['load1_per_repeat']):.1f}–{max(c['load1_per_repeat']):.1f}" if c.get("load1_per_repeat") else "–"])
    return markdown_table(head, rows)


def targets_vs_best_static(cells: list[dict], policy: str = "saber") -> list[dict]:
    """Per rate: the best static cap by mean goodput (ties toward lower latency, as
    metrics.best_static_key), and `policy` − best in points; issue 11's live target is −2."""
    from .metrics import best_static_key

    out = []
    for rate in dict.fromkeys(c["rate"] for c in cells):
        here = [c for c in cells if c["rate"] == rate]
        statics = [c for c in here if c["policy"].startswith("static-")]
        mine = next((c for c in here if c["policy"] == policy), None)
        if not statics or mine is None:
            continue
        best = max(statics, key=best_static_key)
        out.append({"rate": rate, "load": mine.get("load"), "best_static": best["policy"],
                    "best_static_goodput": best["goodput"], policy: mine["goodput"],
                    "minus_best_points": 100 * (mine["goodput"] - best["goodput"]),
                    "met_minus_2": mine["goodput"] >= best["goodput"] - 0.02 - 1e-9})
    return out


VLLM_TRACE_POLICIES = ("static-4", "static-8", "static-16", "static-32", "static-64", "saber")


async def write_vllm_trace(args, source: TraceSource, out: Path) -> int:
    """`saber bench live --engine vllm --trace ...`: run_vllm_trace, then summary.json and report.md."""
    import json
    import sys
    import time

    from .live import write_live
    from .machine import describe_machine
    from .trace_bench import rates_for, trace_meta
    from .trace_cli import evidence

    rates = loads = None
    if args.load:
        if args.rates or args.speedup:
            raise ValueError("give one of --rates, --speedup and --load")
        loads = list(args.load)
    else:
        rates, _ = rates_for(source, args.rates, args.speedup, None)
    policies = list(args.policies or VLLM_TRACE_POLICIES)
    if args.compare_sim:
        print("note: --compare-sim skipped: the simulator models the paper profile, not this vLLM CPU engine",
              file=sys.stderr)
    repeats = args.seeds or 3  # `--seeds`' documented default with --engine vllm
    t0 = time.perf_counter()
    cells, info = await run_vllm_trace(source, policies, repeats, out, rates=rates, loads=loads,
                                       max_num_seqs=args.max_num_seqs, engine_url=args.engine_url)
    targets = targets_vs_best_static(cells)
    meta = {"mode": "live", "evidence": evidence("live", engine="vllm") + ", tiny random-weight Llama, StopAtLength",
            "command": "saber " + " ".join(sys.argv[1:]), "machine": describe_machine(),
            "elapsed_s": time.perf_counter() - t0, "engine": args.engine_url or "vllm", **info, **trace_meta(source)}
    title = f"saber bench live: {source.label} ({meta['evidence']})"
    paths = write_live(out, cells, None, meta, title)
    summary = json.loads(paths["summary"].read_text())
    summary["targets"] = targets
    paths["summary"].write_text(json.dumps(summary, indent=1, default=float) + "\n")
    lines = [f"- {'met' if t['met_minus_2'] else 'NOT met'} at {t['rate']:g} req/s"
             + (f" ({t['load']:g}x)" if t.get("load") else "")
             + f": saber {100 * t['saber']:.1f}% vs best static {100 * t['best_static_goodput']:.1f}% "
             f"({t['best_static']}), {t['minus_best_points']:+.1f} points" for t in targets]
    table = repeats_table(cells)
    with open(paths["report"], "a") as f:
        f.write(f"\nPer repeat ({repeats} repeats, same arrivals, policies rotated per repeat):\n\n{table}\n\n"
                "saber ≥ best static − 2 points (issue 11, live on real vLLM):\n\n" + "\n".join(lines) + "\n")
    print(f"evidence: {meta['evidence']}")
    print(table)
    print("\n".join(lines))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
