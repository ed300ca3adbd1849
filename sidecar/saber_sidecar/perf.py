"""Proxy overhead benchmark: the same streaming load sent to the engine directly and via the sidecar.

    python -m saber_sidecar.perf --out DIR [--streams 200] [--duration 15] [--rounds 2]

Starts the emulator and the sidecar as separate processes on loopback, then runs a closed-loop
load generator (`--streams` workers, each sending streamed completions back to back) against
each target in turn, alternating direct and via-sidecar runs so drift hits both alike. Per
request it records the time to the first streamed chunk and the number of SSE events. It runs
twice: with the `static` policy at a cap no load reaches (pure proxy overhead) and with the
`saber` policy under deadlines it always meets (overhead of our decision code). Writes
DIR/sidecar_perf.json and prints a summary. Targets: added TTFT p50 <= 1 ms and p99 <= 5 ms,
relayed tokens/s >= 0.95 of direct.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np

MODEL = "Qwen/Qwen2.5-Coder-3B-Instruct"
PROMPT = "Write a Python function that parses an ISO 8601 date and returns the weekday. " * 4

STATIC = """
classes:
  - name: bench
    deadline_seconds: 3600
default_class: bench
scheduling:
  policy: static
  static_max_concurrency: 4096
  max_queue: 100000
"""

SABER = """
classes:
  - name: bench
    deadline_seconds: 3600
default_class: bench
scheduling:
  policy: saber
  max_queue: 100000
"""

# The same without online refits: separates the decision code's cost from the curve fitting's.
SABER_NO_REFIT = SABER + """  speed_model:
    online_refit: false
"""
CONFIGS = {"static": STATIC, "saber": SABER, "saber-no-refit": SABER_NO_REFIT}

TARGETS = {"added_ttft_p50_ms": 1.0, "added_ttft_p99_ms": 5.0, "tokens_per_second_ratio": 0.95}


@dataclass
class Run:
    target: str
    ttft_s: list[float] = field(default_factory=list)
    queue_ms: list[float] = field(default_factory=list)  # the sidecar's x-saber-queue-ms (time in the gate)
    tokens: int = 0
    requests: int = 0
    errors: int = 0
    wall_s: float = 0.0

    def summary(self) -> dict:
        t = np.asarray(self.ttft_s) * 1000
        q = np.asarray(self.queue_ms)
        return {
            "target": self.target,
            "requests": self.requests,
            "errors": self.errors,
            "tokens": self.tokens,
            "wall_s": round(self.wall_s, 3),
            "tokens_per_second": round(self.tokens / self.wall_s, 1) if self.wall_s else 0.0,
            "ttft_p50_ms": round(float(np.percentile(t, 50)), 3) if len(t) else None,
            "ttft_p99_ms": round(float(np.percentile(t, 99)), 3) if len(t) else None,
            **({"gate_queue_p50_ms": round(float(np.percentile(q, 50)), 3),
                "gate_queue_p99_ms": round(float(np.percentile(q, 99)), 3)} if len(q) else {}),
        }


def added_ci(direct_ms: np.ndarray, via_ms: np.ndarray, q: float, reps: int = 400,
             seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of percentile(via, q) - percentile(direct, q), each arm resampled alone.

    Arrivals fall at random points of the engine's steps, so each request's TTFT carries up to a
    step of quantisation; the interval says how far the measured difference could move with
    another sample of the same size.
    """
    rng = np.random.default_rng(seed)
    diffs = np.empty(reps)
    for i in range(reps):
        d = rng.choice(direct_ms, size=len(direct_ms))
        v = rng.choice(via_ms, size=len(via_ms))
        diffs[i] = np.percentile(v, q) - np.percentile(d, q)
    low, high = np.percentile(diffs, [2.5, 97.5])
    return round(float(low), 3), round(float(high), 3)


async def load(url: str, streams: int, duration_s: float, max_tokens: int, target: str,
               jitter_s: float = 0.0) -> Run:
    """`streams` workers, each sending the next streamed completion when one ends.

    With `jitter_s` > 0 each worker first waits a random time in [0, jitter_s] (the same seeded
    sequence for every target): requests then arrive at random points of the engine's step
    schedule, as independent clients' do, instead of right at a step's end. Closed-loop arrivals
    synchronised to steps turn any extra hop into a whole missed step.
    """
    run = Run(target)
    body = json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": max_tokens, "stream": True,
                       "ignore_eos": True}).encode()
    headers = {"Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
        started = time.perf_counter()
        stop_at = started + duration_s

        async def worker(index: int) -> None:
            rng = random.Random(index)
            while time.perf_counter() < stop_at:
                if jitter_s > 0:
                    await asyncio.sleep(rng.uniform(0.0, jitter_s))
                sent = time.perf_counter()
                try:
                    async with session.post(url + "/v1/completions", data=body, headers=headers) as resp:
                        if resp.status != 200:
                            await resp.read()
                            run.errors += 1
                            continue
                        queued = resp.headers.get("x-saber-queue-ms")
                        if queued is not None:
                            run.queue_ms.append(float(queued))
                        first = None
                        events = 0
                        async for chunk in resp.content.iter_any():
                            if first is None:
                                first = time.perf_counter()
                            events += chunk.count(b"data:")
                except aiohttp.ClientError:
                    run.errors += 1
                    continue
                if first is not None:
                    run.ttft_s.append(first - sent)
                run.tokens += max(0, events - 1)  # less [DONE]
                run.requests += 1

        await asyncio.gather(*(worker(i) for i in range(streams)))
        run.wall_s = time.perf_counter() - started
    return run


def flat_profile(out: Path, step_ms: float) -> Path:
    """An engine profile with the same step time at every batch size and no prefill cost.

    Its own TTFT is then one to two steps whatever the load, so what the sidecar adds is not lost in
    the engine's run-to-run variation.
    """
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"flat-{step_ms:g}ms.json"
    path.write_text(json.dumps({
        "name": f"flat-{step_ms:g}ms",
        "description": f"{step_ms:g} ms per step at any batch size, no prefill cost (saber_sidecar.perf)",
        "decode_batch_sizes": [1], "decode_step_s": [step_ms / 1000], "prefill_s_per_token": 0.0,
        "context_s_per_token": 0.0, "prefill_only_step_s": None,
    }) + "\n")
    return path


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (Linux /proc), to report the sidecar's cost per token."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def start(cmd: list[str], log: Path, pattern: str, timeout_s: float = 60.0,
          cpus: set[int] | None = None) -> tuple[subprocess.Popen, str]:
    sink = log.open("w")
    proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT)
    sink.close()
    if cpus:
        os.sched_setaffinity(proc.pid, cpus)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = re.search(pattern, log.read_text())
        if found:
            return proc, found.group(1)
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[3]} exited with {proc.returncode}; see {log}")
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{cmd[3]} did not start within {timeout_s}s; see {log}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def compare(direct: list[Run], via: list[Run]) -> dict:
    pooled = {}
    direct_ttft = [t for r in direct for t in r.ttft_s]
    via_ttft = [t for r in via for t in r.ttft_s]
    for name, runs in (("direct", direct), ("sidecar", via)):
        merged = Run(name)
        for r in runs:
            merged.ttft_s += r.ttft_s
            merged.queue_ms += r.queue_ms
            merged.tokens += r.tokens
            merged.requests += r.requests
            merged.errors += r.errors
            merged.wall_s += r.wall_s
        pooled[name] = merged.summary()
    d, s = pooled["direct"], pooled["sidecar"]
    result = {
        "direct": d,
        "sidecar": s,
        "added_ttft_p50_ms": round(s["ttft_p50_ms"] - d["ttft_p50_ms"], 3),
        "added_ttft_p99_ms": round(s["ttft_p99_ms"] - d["ttft_p99_ms"], 3),
        "tokens_per_second_ratio": round(s["tokens_per_second"] / d["tokens_per_second"], 4),
        "added_ttft_p50_ms_ci95": added_ci(np.asarray(direct_ttft) * 1000, np.asarray(via_ttft) * 1000, 50),
        "added_ttft_p99_ms_ci95": added_ci(np.asarray(direct_ttft) * 1000, np.asarray(via_ttft) * 1000, 99),
        "rounds": [{"direct": a.summary(), "sidecar": b.summary()} for a, b in zip(direct, via, strict=True)],
    }
    result["meets_targets"] = {
        "added_ttft_p50_ms": result["added_ttft_p50_ms"] <= TARGETS["added_ttft_p50_ms"],
        "added_ttft_p99_ms": result["added_ttft_p99_ms"] <= TARGETS["added_ttft_p99_ms"],
        "tokens_per_second_ratio": result["tokens_per_second_ratio"] >= TARGETS["tokens_per_second_ratio"],
    }
    return result


async def bench_policy(name: str, config: str, engine_url: str, out: Path, opts: argparse.Namespace) -> dict:
    cfg = out / f"sidecar-{name}.yaml"
    cfg.write_text(config)
    proc, url = start(
        [sys.executable, "-m", "saber_cli.main", "sidecar", "--host", "127.0.0.1", "--port", "0",
         "--engine-url", engine_url, "--config", str(cfg), "--log-level", "WARNING"],
        out / f"sidecar-{name}.log", r"saber sidecar listening on (http://\S+)", cpus=opts.sidecar_cpus,
    )
    try:
        await load(url, min(opts.streams, 16), 1.0, opts.max_tokens, "warmup")
        direct, via = [], []
        sidecar_cpu, relayed = 0.0, 0
        for i in range(opts.rounds):
            # Alternate the order between rounds so slow drift (other load on the machine) is shared.
            order = [("direct", engine_url), ("sidecar", url)]
            for target, base in order if i % 2 == 0 else order[::-1]:
                cpu0 = cpu_seconds(proc.pid)
                run = await load(base, opts.streams, opts.duration, opts.max_tokens, target,
                                 opts.jitter_ms / 1000)
                cpu1 = cpu_seconds(proc.pid)
                (direct if target == "direct" else via).append(run)
                if target == "sidecar" and cpu0 is not None and cpu1 is not None:
                    sidecar_cpu += cpu1 - cpu0
                    relayed += run.tokens
                print(f"  {name} round {i + 1} {target:8s} {run.summary()}", flush=True)
        result = compare(direct, via)
        result["sidecar_cpu_seconds"] = round(sidecar_cpu, 3)
        result["sidecar_cpu_ms_per_1000_tokens"] = round(1e6 * sidecar_cpu / relayed, 2) if relayed else None
        return result
    finally:
        stop(proc)


async def main_async(opts: argparse.Namespace) -> dict:
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    emulator, engine_url = start(
        [sys.executable, "-m", "saber_cli.main", "emulator", "--host", "127.0.0.1", "--port", "0",
         "--output-len-dist", "max", "--max-num-seqs", str(max(256, opts.streams)),
         *(["--latency-profile", opts.latency_profile] if opts.latency_profile else [])],
        out / "emulator.log", r"listening on (http://\S+)", cpus=opts.other_cpus,
    )
    try:
        results = {}
        for name in opts.policies:
            print(f"policy {name}: {opts.streams} streams, {opts.duration}s x {opts.rounds} rounds per target",
                  flush=True)
            results[name] = await bench_policy(name, CONFIGS[name], engine_url, out, opts)
    finally:
        stop(emulator)
    return {
        "command": "python -m saber_sidecar.perf " + " ".join(sys.argv[1:]),
        "streams": opts.streams,
        "duration_s": opts.duration,
        "rounds": opts.rounds,
        "max_tokens": opts.max_tokens,
        "jitter_ms": opts.jitter_ms,
        "latency_profile": opts.latency_profile,
        "sidecar_cpus": sorted(opts.sidecar_cpus) if opts.sidecar_cpus else "shared",
        "event_loop": os.environ.get("SABER_SIDECAR_EVENT_LOOP", "auto"),
        "targets": TARGETS,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "load_average_at_end": os.getloadavg()},
        "policies": results,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m saber_sidecar.perf", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for sidecar_perf.json and the process logs")
    parser.add_argument("--streams", type=int, default=200, help="concurrent streams (default 200)")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per run (default 15)")
    parser.add_argument("--rounds", type=int, default=2, help="direct/sidecar pairs per policy (default 2)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per request (default 64)")
    parser.add_argument("--jitter-ms", type=float, default=0.0,
                        help="each worker waits a random 0..JITTER ms before each request, so arrivals fall at "
                        "random points of the engine's steps as independent clients' do (default 0: closed loop)")
    parser.add_argument("--latency-profile", default=None,
                        help="the emulator's latency profile (name or JSON file); a flat one (same step time at "
                        "every batch size, no prefill cost) makes the engine's own TTFT steady, so the sidecar's "
                        "added latency stands out from run-to-run noise")
    parser.add_argument("--flat-step-ms", type=float, default=None,
                        help="shorthand for a flat latency profile with this step time (written to DIR); at 200 "
                        "streams a 50 ms step gives about 4,000 tokens/s, near the paper profile's rate there")
    parser.add_argument("--policies", nargs="+", default=["static", "saber"], choices=list(CONFIGS))
    parser.add_argument("--pin", action="store_true",
                        help="give the sidecar its own CPU (the last one) and run the emulator and the load "
                        "generator on the others, as in a pod where the sidecar container has its own CPU; "
                        "without it all three compete for every CPU")
    opts = parser.parse_args(argv)
    if opts.flat_step_ms is not None:
        if opts.latency_profile or opts.flat_step_ms <= 0:
            parser.error("--flat-step-ms must be positive and cannot be combined with --latency-profile")
        opts.latency_profile = str(flat_profile(Path(opts.out), opts.flat_step_ms))
    opts.sidecar_cpus = opts.other_cpus = None
    if opts.pin:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            parser.error("--pin needs at least 2 CPUs")
        opts.sidecar_cpus, opts.other_cpus = {cpus[-1]}, set(cpus[:-1])
        os.sched_setaffinity(0, opts.other_cpus)
    if opts.streams < 1 or opts.duration <= 0 or opts.rounds < 1 or opts.max_tokens < 1:
        parser.error("--streams, --duration, --rounds and --max-tokens must be positive")
    report = asyncio.run(main_async(opts))
    path = Path(opts.out) / "sidecar_perf.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    for name, r in report["policies"].items():
        lo50, hi50 = r["added_ttft_p50_ms_ci95"]
        lo99, hi99 = r["added_ttft_p99_ms_ci95"]
        print(f"{name}: added TTFT p50 {r['added_ttft_p50_ms']:+.3f} ms (95% CI {lo50:+.2f}..{hi50:+.2f}), "
              f"p99 {r['added_ttft_p99_ms']:+.3f} ms (95% CI {lo99:+.2f}..{hi99:+.2f}), "
              f"tokens/s ratio {r['tokens_per_second_ratio']:.4f}, sidecar CPU "
              f"{r['sidecar_cpu_ms_per_1000_tokens']} ms per 1000 tokens; meets {r['meets_targets']}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
