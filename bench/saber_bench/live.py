"""Live runs: real processes on loopback, the same arrivals as the simulator.

An engine (the emulator with its paper-calibrated profile, or a real vLLM CPU server) is started
once; for every policy a fresh sidecar process is started in front of it with that policy's
config, and an asyncio client replays the run's arrivals against the sidecar: each request is
sent at its scheduled time as a streamed `/v1/completions` call with header `x-saber-sla-class`,
and its end-to-end time is measured from the scheduled arrival to the last token.
The paper's tasks generate exactly `max_tokens` (`ignore_eos`), as in the simulator.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from .metrics import RequestRecord, combine_seeds, run_stats
from .ports import ServerStartError, await_listen_url, log_tail
from .workloads import PAPER_REQUESTS, RequestSpec, make_workload

CLASS_HEADER = "x-saber-sla-class"
OUTCOME_HEADER = "x-saber-outcome"
# Longest a single request may take before the client gives up and records an error (no hangs).
REQUEST_TIMEOUT_S = 120.0


class LiveError(RuntimeError):
    """A live run could not be set up (a process did not start, a port was not answered)."""


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    url: str
    log_path: Path

    def stop(self, timeout: float = 10.0) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)

    def tail(self, n: int = 20) -> str:
        return log_tail(self.log_path, n)


async def _spawn(name: str, args: list[str], log_dir: Path) -> Proc:
    """`saber <args> --host 127.0.0.1 --port 0`; its URL is read from its "listening on" line, so
    the port is the one it bound itself (no free-port race)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    log = open(log_path, "w")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    popen = subprocess.Popen(
        [sys.executable, "-m", "saber_cli", *args, "--host", "127.0.0.1", "--port", "0"], stdout=log,
        stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL,
    )
    log.close()
    proc = Proc(name, popen, "", log_path)
    try:
        proc.url = await await_listen_url(popen, log_path, name=name)
    except ServerStartError as exc:
        proc.stop()
        raise LiveError(str(exc)) from exc
    except BaseException:
        proc.stop()
        raise
    return proc


async def wait_ready(proc: Proc, path: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while time.monotonic() < deadline:
            if proc.popen.poll() is not None:
                raise LiveError(f"{proc.name} exited with code {proc.popen.returncode}:\n{proc.tail()}")
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                async with session.get(proc.url + path) as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.1)
    proc.stop()
    raise LiveError(f"{proc.name} did not answer {proc.url}{path} within {timeout:.0f} s:\n{proc.tail()}")


async def start_emulator(log_dir: Path, extra_args: tuple[str, ...] = ()) -> Proc:
    """The emulator with its defaults: the paper-calibrated profile and the engine limits the simulator uses."""
    proc = await _spawn("emulator", ["emulator", *extra_args], log_dir)
    await wait_ready(proc, "/health")
    return proc


async def start_sidecar(engine_url: str, config_path: Path, log_dir: Path, name: str) -> Proc:
    proc = await _spawn(name, ["sidecar", "--engine-url", engine_url, "--config", str(config_path),
                               "--log-level", "WARNING"], log_dir)
    await wait_ready(proc, "/readyz")
    return proc


def write_config(policy: str, workload: str, path: Path) -> Path:
    import yaml

    from .policies import config_for_workload

    config = config_for_workload(policy, workload)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    return path


async def engine_model(engine_url: str) -> str:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        async with session.get(engine_url + "/v1/models") as resp:
            data = await resp.json()
    return data["data"][0]["id"]


async def _one(session: aiohttp.ClientSession, url: str, model: str, spec: RequestSpec, ignore_eos: bool | None,
               t0: float, rec: RequestRecord, lags: list[float]) -> None:
    delay = t0 + spec.arrival - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)
    lags.append(time.perf_counter() - (t0 + spec.arrival))
    body = {"model": model, "prompt": spec.prompt, "max_tokens": spec.max_tokens, "stream": True,
            "stream_options": {"include_usage": True}}
    if ignore_eos is None:
        # Hidden length (trace replay): the engine stops at it; the gate sees only max_tokens.
        from .trace_bench import HIDDEN_LENGTH_XARG

        body["vllm_xargs"] = {HIDDEN_LENGTH_XARG: spec.output_tokens}
    elif ignore_eos:
        body["ignore_eos"] = True
    else:
        # The true length must come from the engine itself; min_tokens asks for at least it.
        body["min_tokens"] = spec.output_tokens
    tokens = 0
    try:
        async with session.post(url + "/v1/completions", json=body, headers={CLASS_HEADER: spec.sla_class}) as resp:
            outcome = resp.headers.get(OUTCOME_HEADER, "")
            if resp.status == 429:
                rec.rejected = True
                await resp.read()
                return
            if resp.status != 200:
                rec.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return
            rec.demoted = outcome == "demoted"
            rec.admitted_at = time.perf_counter() - t0
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                # A chunk with text, or the finish of a request whose last token was EOS (no text).
                if any(c.get("text") or c.get("finish_reason") for c in chunk.get("choices", [])):
                    now = time.perf_counter() - t0
                    tokens += 1
                    if rec.first_token_at is None:
                        rec.first_token_at = now
                    rec.finished_at = now
                usage = chunk.get("usage")
                if usage:
                    tokens = usage.get("completion_tokens", tokens)
            rec.output_tokens = tokens
            if rec.finished_at is None:
                rec.error = "no tokens"
    except (TimeoutError, aiohttp.ClientError) as exc:
        rec.error = f"{type(exc).__name__}: {exc}"
        rec.finished_at = None


async def replay(url: str, model: str, specs: list[RequestSpec], ignore_eos: bool | None = True,
                 progress: str | None = None) -> tuple[list[RequestRecord], dict]:
    """Send every request at its scheduled time; returns one record per request (times from t0)."""
    records = [RequestRecord(s.id, s.sla_class, s.arrival, s.sla_s, ttft_slo_s=s.ttft_s, tpot_slo_s=s.tpot_s) for s in specs]
    lags: list[float] = []
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(specs), unit="req", desc=progress, leave=True)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        t0 = time.perf_counter() + 0.2

        async def run(spec, rec):
            await _one(session, url, model, spec, ignore_eos, t0, rec, lags)
            if bar:
                bar.update()

        await asyncio.gather(*(run(s, r) for s, r in zip(specs, records)))
    if bar:
        bar.close()
    info = {"send_lag_max_s": max(lags, default=0.0), "send_lag_p99_s": float(sorted(lags)[int(0.99 * (len(lags) - 1))]) if lags else 0.0}
    return records, info


async def run_cells(workload: str, rates: list[float], policies: list[str], seeds: int, n: int,
                    out: Path, engine: str = "emulator", engine_url: str | None = None, trace=None) -> list[dict]:
    """Run every (rate, policy, seed) live; returns cells like the simulator's (mean over seeds).
    `trace` (a `trace_live.LiveTrace`) replaces the workload's requests, configs and engine flags."""
    from .policies import check_policy

    for p in policies:
        check_policy(p)
    if workload == "humaneval" and engine == "emulator" and engine_url is None:
        print("note: the emulator draws output lengths itself; humaneval's true lengths are only asked for "
              "with min_tokens, so live and simulated lengths differ", file=sys.stderr)
    logs = out / "logs"
    engine_proc = None
    vllm = None
    # SIGTERM cancels the run like Ctrl-C does, so the processes started here are always stopped.
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None  # we are inside a coroutine
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        if engine_url is None:
            if engine == "emulator":
                print("starting the emulator (paper-calibrated profile) ...", flush=True)
                engine_proc = await start_emulator(logs, trace.emulator_args if trace else ())
                engine_url = engine_proc.url
            else:
                vllm, engine_url = await (trace.start_vllm(out) if trace else _start_vllm(out))
        model = await engine_model(engine_url)
        cells = []
        for rate in rates:
            for policy in policies:
                runs, infos, ratios = [], [], []
                for seed in range(seeds):
                    specs = await trace.specs(rate, engine_url) if trace else make_workload(workload, rate, seed, n)
                    cfg = (trace.write_config(policy, out / "configs" / f"{policy}.yaml") if trace
                           else write_config(policy, workload, out / "configs" / f"{policy}.yaml"))
                    sidecar = await start_sidecar(engine_url, cfg, logs, f"sidecar-{policy}")
                    try:
                        records, info = await replay(
                            sidecar.url, model, specs, ignore_eos=trace.ignore_eos if trace else workload != "humaneval",
                            progress=f"{workload} {rate:g} req/s {policy} seed {seed}",
                        )
                    finally:
                        sidecar.stop()
                    _dump_records(out / "requests" / f"{workload}-{rate:g}-{policy}-{seed}.jsonl", records)
                    runs.append(run_stats(records))
                    infos.append(info)
                    ratios += [e / r.sla_s if (e := r.e2e) is not None else math.inf for r in records]  # set iff served
                cell: dict[str, Any] = {"workload": workload, "rate": rate, "policy": policy, "seeds": seeds,
                                        "mode": "live"}
                cell.update(combine_seeds(runs))
                cell["errors"] = sum(r.unfinished for r in runs)
                cell["send_lag_max_s"] = max(i["send_lag_max_s"] for i in infos)
                cell["ratios"] = ratios
                cells.append(cell)
                print(f"  {policy:>12}: goodput {100 * cell['goodput']:.0f}%  e2e p50 {cell['e2e_p50']:.2f} s  "
                      f"rejected {cell['rejected']:.0f}  demoted {cell['demoted']:.0f}  "
                      f"(client send lag max {1000 * cell['send_lag_max_s']:.0f} ms)", flush=True)
        return cells
    finally:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGTERM)
        if engine_proc is not None:
            engine_proc.stop()
        if vllm is not None:
            vllm.stop()


def _dump_records(path: Path, records: list[RequestRecord]) -> None:
    """Per-request outcomes of a live run, one JSON object a line (for diagnosis against the simulator)."""
    from dataclasses import asdict

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(asdict(r)) + "\n")


async def _start_vllm(out: Path):
    """A real vLLM CPU server with the tiny random-weight model (built once, cached under out/)."""
    try:
        from . import vllm_cpu
    except ImportError as exc:
        raise LiveError(f"the vLLM CPU launcher is not available ({exc}); use --engine emulator or --engine-url") from exc
    print("building/starting the vLLM CPU server (tiny model; about 30 s) ...", flush=True)
    try:
        (out / "logs").mkdir(parents=True, exist_ok=True)
        model_dir = await asyncio.to_thread(vllm_cpu.build_tiny_model, out / "vllm-model")
        server = vllm_cpu.VLLMServer(model_dir, max_num_seqs=256, max_model_len=4096,
                                     log_path=out / "logs" / "vllm.log")
        await asyncio.to_thread(server.start)
    except (RuntimeError, OSError) as exc:
        raise LiveError(f"could not start vLLM: {exc}") from exc
    return server, server.base_url


def simulate_cells(workload: str, rates: list[float], policies: list[str], seeds: int, n: int) -> dict:
    """The simulator on the same arrivals, for comparison: (rate, policy) -> goodput."""
    from .grid import RunKey, run_one

    out = {}
    for rate in rates:
        for policy in policies:
            gs = []
            for seed in range(seeds):
                if n != PAPER_REQUESTS:
                    gs.append(_sim_n(workload, rate, policy, seed, n))
                else:
                    gs.append(run_one(RunKey(workload, rate, policy, seed)).stats.goodput)
            out[(rate, policy)] = sum(gs) / len(gs)
    return out


def _sim_n(workload: str, rate: float, policy: str, seed: int, n: int) -> float:
    from .policies import build_policy, config_for_workload, request_builder
    from .sim import default_engine, simulate

    specs = make_workload(workload, rate, seed, n)
    config = config_for_workload(policy, workload)
    result = simulate(specs, build_policy(policy, config, seed), default_engine(seed=seed),
                      request_builder(policy, config))
    return run_stats(result.records).goodput


def comparison_table(cells: list[dict], sim: dict | None) -> str:
    from .report import markdown_table

    head = ["rate", "policy", "goodput %"] + (["sim goodput %", "live − sim"] if sim else []) + [
        "attainment % by class", "e2e p50/p95 s", "TTFT p50 s", "rejected", "demoted"]
    rows = []
    for c in cells:
        row = [f"{c['rate']:g}", c["policy"], f"{100 * c['goodput']:.0f}"]
        if sim:
            s = sim.get((c["rate"], c["policy"]))
            row += [f"{100 * s:.0f}" if s is not None else "–",
                    f"{100 * (c['goodput'] - s):+.0f}" if s is not None else "–"]
        att = ", ".join(f"{k} {100 * v:.0f}" for k, v in c["attainment"].items())
        row += [att, f"{c['e2e_p50']:.2f}/{c['e2e_p95']:.2f}", f"{c['ttft_p50']:.3f}", f"{c['rejected']:.0f}",
                f"{c['demoted']:.0f}"]
        rows.append(row)
    return markdown_table(head, rows)


def plot_live(out: Path, cells: list[dict], sim: dict | None, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from .report import save_figure

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    labels = [f"{c['policy']}\n{c['rate']:g} req/s" if len({x['rate'] for x in cells}) > 1 else c["policy"] for c in cells]
    x = np.arange(len(cells))
    ax1.bar(x - (0.2 if sim else 0), [100 * c["goodput"] for c in cells], 0.4 if sim else 0.6, label="live",
            color=["tab:blue" if c["policy"] == "saber" else "grey" for c in cells])
    if sim:
        ax1.bar(x + 0.2, [100 * sim.get((c["rate"], c["policy"]), math.nan) for c in cells], 0.4, label="sim",
                color="none", edgecolor="black", hatch="//")
        ax1.legend(fontsize=8)
    ax1.set_xticks(x, labels, fontsize=8)
    ax1.set_ylabel("goodput (% meeting SLA)")
    ax1.set_ylim(0, 100)
    ax1.set_title(title)
    ax1.grid(axis="y", alpha=0.3)
    for c in cells:
        vals = np.sort(np.minimum(np.asarray(c["ratios"], dtype=float), 10.0))
        ax2.step(vals, np.arange(1, len(vals) + 1) / len(vals), where="post", label=f"{c['policy']} {c['rate']:g}",
                 lw=2 if c["policy"] == "saber" else 1.2)
    ax2.axvline(1.0, color="red", lw=0.8, ls="--")
    ax2.set_xscale("log")
    ax2.set_xlim(0.05, 10)
    ax2.set_xlabel("e2e / SLA (rejected shown at 10)")
    ax2.set_ylabel("share of requests")
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    return save_figure(fig, out / "live.png")


def write_live(out: Path, cells: list[dict], sim: dict | None, meta: dict, title: str) -> dict[str, Path]:
    from .report import _clean

    out.mkdir(parents=True, exist_ok=True)
    summary = {
        "meta": meta,
        "cells": [{k: v for k, v in c.items() if k != "ratios"} | (
            {"sim_goodput": sim.get((c["rate"], c["policy"]))} if sim else {}) for c in cells],
    }
    path = out / "summary.json"
    path.write_text(json.dumps(_clean(summary), indent=1) + "\n")
    png = plot_live(out, cells, sim, title)
    table = comparison_table(cells, sim)
    md = out / "report.md"
    md.write_text(f"# {title}\n\n- evidence: **{meta.get('evidence', '?')}**\n- command: `{meta.get('command')}`\n- machine: {meta.get('machine')}\n"
                  f"- elapsed: {meta.get('elapsed_s', 0):.0f} s\n\n{table}\n\n![live]({png.name})\n")
    return {"summary": path, "plot": png, "report": md}


async def run_live_cli(args, out: Path) -> int:
    from .machine import describe_machine

    t0 = time.perf_counter()
    args.rates = args.rates or [15.0]
    cells = await run_cells(args.workload, args.rates, args.policies, args.seeds, args.requests, out,
                            engine=args.engine, engine_url=args.engine_url)
    sim = simulate_cells(args.workload, args.rates, args.policies, args.seeds, args.requests) if args.compare_sim else None
    from .trace_cli import evidence

    meta = {"mode": "live", "evidence": evidence("live", engine="vllm" if args.engine == "vllm" else "emulator"),
            "command": "saber " + " ".join(sys.argv[1:]), "machine": describe_machine(),
            "elapsed_s": time.perf_counter() - t0, "engine": args.engine_url or args.engine}
    paths = write_live(out, cells, sim, meta, f"saber bench live: {args.workload}")
    print(comparison_table(cells, sim))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def best_static_in_sim(workload: str, rate: float, seed: int = 0) -> str:
    """The static cap (10..100) with the best simulated goodput on these arrivals, chosen after the fact."""
    from .policies import STATIC_CAPS

    scores = simulate_cells(workload, [rate], [f"static-{n}" for n in STATIC_CAPS], 1, PAPER_REQUESTS)
    return max(scores, key=lambda k: (scores[k], -int(k[1].split("-")[1])))[1]


async def run_demo(workload: str, rate: float, statics: list[str], out: Path, trace_panel: bool = True) -> int:
    """One heavy cell live, static caps vs saber on the same arrivals; a table, a plot, a summary.

    `statics` may name `best`: the best static cap for this very cell, picked in simulation after
    the fact (what a perfectly tuned `max_num_seqs` would get), so saber is shown against the best
    a static setting can do, not a strawman.
    """
    from .machine import describe_machine

    t0 = time.perf_counter()
    policies = [best_static_in_sim(workload, rate) if s == "best" else s for s in statics]
    policies = list(dict.fromkeys([*policies, "saber"]))
    print(f"saber demo: {workload} at {rate:g} req/s ({PAPER_REQUESTS} requests), {', '.join(policies)}, live on "
          "loopback: client -> saber sidecar -> engine emulator (paper-calibrated Qwen2.5-Coder-3B profile)",
          flush=True)
    cells = await run_cells(workload, [rate], policies, 1, PAPER_REQUESTS, out)
    sim = simulate_cells(workload, [rate], policies, 1, PAPER_REQUESTS)
    meta = {"mode": "demo", "evidence": "live on the emulator (paper profile)", "command": f"saber bench demo --workload {workload} --rate {rate:g} "
            f"--static {','.join(statics)}", "machine": describe_machine(), "elapsed_s": time.perf_counter() - t0}
    paths = write_live(out, cells, sim, meta, f"saber demo: {workload} at {rate:g} req/s")
    print()
    print(comparison_table(cells, sim))
    saber = next(c for c in cells if c["policy"] == "saber")
    print()
    for c in cells:
        if c["policy"] != "saber":
            print(f"saber vs {c['policy']}: {100 * (saber['goodput'] - c['goodput']):+.0f} points of goodput "
                  "on the same arrivals")
    if trace_panel:
        from .trace_live import demo_trace_panel, plot_demo

        tcells, tsim, ttitle = await demo_trace_panel(out / "trace", statics)
        write_live(out / "trace", tcells, tsim, dict(meta, elapsed_s=time.perf_counter() - t0), f"saber demo: {ttitle}")
        print()
        print(comparison_table(tcells, tsim))
        paths["plot"] = plot_demo(out, [(cells, sim, f"{workload} at {rate:g} req/s (paper mix)"), (tcells, tsim, ttitle)])
    print(f"({time.perf_counter() - t0:.0f} s) Plot: {paths['plot']}  Summary: {paths['summary']}")
    return 0
