"""Emulator performance benchmark: is the emulator ever the bottleneck of what it emulates?

    python -m saber_bench.perf.emulator --streams 200 --out DIR

Runs the emulator in its own process pinned to one core (core 0) and a load generator in this
process on the other cores. Two phases:
1. throughput: `--streams` concurrent streams on a flat profile of `--step-ms` per step, so the model
   itself offers streams * 1000 / step_ms tokens/s; reports what clients actually received.
2. fidelity: 50 streams on the default (paper) profile; reports the error between each step's
   model duration and the real interval between its deliveries.
Writes DIR/emulator_perf.json and prints a summary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from saber_bench.measuring import percentile

STEP_LOG_ENV = "SABER_EMULATOR_PERF_STEPLOG"



# ---- child: the emulator process -----------------------------------------------------------------
async def _child_main(args: argparse.Namespace) -> None:
    from saber_emulator.engine import EngineConfig, OutputLengthConfig
    from saber_emulator.profile import LatencyProfile, load_profile
    from saber_emulator.server import EmulatorServer, EmulatorSettings

    if args.flat_ms:
        profile = LatencyProfile(name=f"flat-{args.flat_ms}ms", decode_batch_sizes=[1],
                                 decode_step_s=[args.flat_ms / 1000], prefill_s_per_token=0.0)
    else:
        profile = load_profile(None)
    engine = EngineConfig(max_num_seqs=max(256, args.streams), max_model_len=args.max_tokens + 64,
                          num_gpu_blocks=args.streams * ((args.max_tokens + 64) // 16 + 2) + 16,
                          output_len=OutputLengthConfig(kind="max"))
    server = EmulatorServer(EmulatorSettings(port=0, model="perf", engine=engine), profile=profile)
    server.step_log = []
    port = await server.start()
    print(port, flush=True)
    loop = asyncio.get_running_loop()
    cpu0 = time.process_time()
    await loop.run_in_executor(None, sys.stdin.read)  # the parent closes stdin when done
    cpu = time.process_time() - cpu0
    await server.stop()
    Path(args.step_log).write_text(json.dumps({"steps": server.step_log, "cpu_s": cpu,
                                               "tokens": server.engine.counters.generation_tokens}))


# ---- parent: the load generator ------------------------------------------------------------------
async def _one_stream(session, url: str, max_tokens: int) -> tuple[float, float, int]:
    body = {"model": "perf", "prompt": "x" * 64, "max_tokens": max_tokens, "stream": True, "ignore_eos": True}
    first = last = 0.0
    count = 0
    async with session.post(url, json=body) as resp:
        resp.raise_for_status()
        async for data in resp.content.iter_any():
            n = data.count(b'"text":"') - data.count(b'"text":""')
            if n:
                last = time.perf_counter()
                if not count:
                    first = last
                count += n
    return first, last, count


async def _load(port: int, streams: int, max_tokens: int) -> dict:
    import aiohttp

    url = f"http://127.0.0.1:{port}/v1/completions"
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as session:
        t0 = time.perf_counter()
        res = await asyncio.gather(*(_one_stream(session, url, max_tokens) for _ in range(streams)))
        wall = time.perf_counter() - t0
    tokens = sum(r[2] for r in res)
    steady_start = max(r[0] for r in res)  # every stream is decoding from here
    steady_end = min(r[1] for r in res)
    return {"wall_s": wall, "tokens": tokens, "complete_streams": sum(r[2] == max_tokens for r in res),
            "tokens_per_s": tokens / wall, "steady_window_s": steady_end - steady_start}


def _phase(name: str, streams: int, max_tokens: int, step_ms: float | None, out: Path) -> dict:
    step_log = out / f"steplog_{name}.json"
    cmd = [sys.executable, "-m", "saber_bench.perf.emulator", "--child", "--streams", str(streams),
           "--max-tokens", str(max_tokens), "--step-log", str(step_log)]
    if step_ms:
        cmd += ["--flat-ms", str(step_ms)]
    if hasattr(os, "sched_setaffinity"):
        cmd = ["taskset", "-c", "0"] + cmd
    child = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdin is not None  # both piped just above
    try:
        port = int(child.stdout.readline())
        load = asyncio.run(_load(port, streams, max_tokens))
    finally:
        child.stdin.close()
        child.wait(timeout=30)
    child_report = json.loads(step_log.read_text())
    step_log.unlink()
    log = child_report["steps"]
    cpu_per_token = child_report["cpu_s"] / max(1, child_report["tokens"])
    # Skip the ramp (prefills and the first decode of each stream); measure full-batch decode steps.
    steady = log[5:-5] if len(log) > 20 else log
    errors_ms = [abs(actual - model) * 1000 for model, actual in steady]
    model_interval = statistics.mean(m for m, _ in steady)
    return {
        "phase": name, "streams": streams, "max_tokens": max_tokens,
        "profile": f"flat {step_ms} ms/step" if step_ms else "paper-qwen2.5-coder-3b",
        **load,
        "model_tokens_per_s": streams / model_interval,
        "steps": len(log),
        # CPU the emulator process spent per streamed token (engine + HTTP), and the token rate one
        # otherwise idle core could sustain at that cost: robust to other load on a shared machine.
        "emulator_cpu_s": child_report["cpu_s"],
        "emulator_cpu_us_per_token": cpu_per_token * 1e6,
        "one_core_capacity_tokens_per_s": 1.0 / cpu_per_token if cpu_per_token else None,
        "model_step_ms": model_interval * 1000,
        "actual_step_ms_mean": statistics.mean(a for _, a in steady) * 1000,
        "step_error_ms": {"mean": statistics.mean(errors_ms), "p50": percentile(errors_ms, 50),
                          "p99": percentile(errors_ms, 99), "max": max(errors_ms)},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m saber_bench.perf.emulator", description=__doc__.split("\n")[0])
    p.add_argument("--streams", type=int, default=200, help="concurrent streams in the throughput phase")
    p.add_argument("--step-ms", type=float, nargs="+", default=[20.0, 10.0],
                   help="flat step times of the throughput phases, ms (default 20 10: 10k and 20k tokens/s at 200 streams)")
    p.add_argument("--max-tokens", type=int, default=1000, help="tokens per stream in the throughput phase")
    p.add_argument("--fidelity-streams", type=int, default=50)
    p.add_argument("--fidelity-tokens", type=int, default=300)
    p.add_argument("--out", default="perf-results", help="folder for emulator_perf.json")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--step-log", help=argparse.SUPPRESS)
    p.add_argument("--flat-ms", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--cprofile", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        if args.cprofile:  # developer aid: where the emulator process spends its time
            import cProfile

            cProfile.runctx("asyncio.run(_child_main(args))", globals(), {"args": args}, args.cprofile)
        else:
            asyncio.run(_child_main(args))
        return 0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cpus = os.cpu_count() or 1
    if hasattr(os, "sched_setaffinity") and cpus > 1:
        os.sched_setaffinity(0, set(range(1, cpus)))  # keep the load generator off core 0
    results: dict[str, Any] = {
        "host": {"python": platform.python_version(), "cpus": os.cpu_count(), "machine": platform.machine()},
        "command": "python -m saber_bench.perf.emulator " + " ".join(argv if argv is not None else sys.argv[1:]),
        "throughput": [_phase(f"throughput-{ms:g}ms", args.streams, args.max_tokens, ms, out) for ms in args.step_ms],
        "fidelity": _phase("fidelity", args.fidelity_streams, args.fidelity_tokens, None, out),
    }
    (out / "emulator_perf.json").write_text(json.dumps(results, indent=2) + "\n")
    for r in results["throughput"] + [results["fidelity"]]:
        e = r["step_error_ms"]
        print(f"{r['phase']}: {r['streams']} streams ({r['profile']}), {r['complete_streams']} complete; "
              f"{r['tokens_per_s']:.0f} tokens/s received vs {r['model_tokens_per_s']:.0f} modelled; "
              f"step {r['model_step_ms']:.2f} ms modelled, {r['actual_step_ms_mean']:.2f} ms actual; "
              f"|error| mean {e['mean']:.3f} p50 {e['p50']:.3f} p99 {e['p99']:.3f} max {e['max']:.3f} ms; "
              f"emulator CPU {r['emulator_cpu_us_per_token']:.1f} us/token "
              f"(one core: {r['one_core_capacity_tokens_per_s']:.0f} tokens/s)")
    print(f"wrote {out / 'emulator_perf.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
