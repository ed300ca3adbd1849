"""Proxy overhead benchmark: the same streaming load sent to the engine directly and via the sidecar.

    python -m saber_bench.perf.sidecar --out DIR [--streams 200] [--duration 15] [--rounds 2]
    python -m saber_bench.perf.sidecar --out DIR --pin --floor --flat-step-ms 50 --jitter-ms 50
    python -m saber_bench.perf.sidecar --parser-only     # CPU per relayed chunk of the engine client's parser

Starts the emulator, one sidecar per policy and (`--floor`) a bare TCP pipe as separate processes
on loopback, then runs a closed-loop load generator (`--streams` workers, each sending streamed
completions back to back) against every target in turn, the order rotated each round so drift
hits all alike. Per request it records the time to the first streamed chunk, the SSE events and
the time the request spent in the gate (`x-saber-queue-ms`). `static` with a cap no load reaches
measures pure proxy overhead; `saber` with deadlines it always meets adds our decision code.
Writes DIR/sidecar_perf.json (per target: tokens/s, TTFT p50/p99, the added TTFT with 95%
bootstrap intervals, proxy CPU per 1000 tokens) and prints a summary. Targets: added TTFT
p50 <= 1 ms and p99 <= 5 ms, relayed tokens/s >= 0.95 of direct.
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

from saber_bench.measuring import cpu_seconds
from saber_bench.ports import ServerStartError, wait_for_listen_url
from saber_sidecar.server import run_loop

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

FLOOR = "floor-tcp-pipe"  # the reference proxy of `--floor`
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
               jitter_s: float = 0.0, ramp_s: float = 0.0) -> Run:
    """`streams` workers, each sending the next streamed completion when one ends.

    With `ramp_s` > 0 each worker starts at a random time in the first `ramp_s` seconds and only
    requests sent after the ramp are measured. Started together, equal-length streams would stay
    in step: every cycle all of them would end and start again within a few milliseconds, and a
    proxy would be measured on that herd rather than on steady traffic.

    With `jitter_s` > 0 each worker also waits a random time in [0, jitter_s] before each request
    (the same seeded sequence for every target): requests then arrive at random points of the
    engine's step schedule, as independent clients' do, instead of right at a step's end.
    Closed-loop arrivals synchronised to steps turn any extra hop into a whole missed step.
    """
    run = Run(target)
    body = json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": max_tokens, "stream": True,
                       "ignore_eos": True}).encode()
    headers = {"Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
        started = time.perf_counter()
        measure_from = started + ramp_s
        stop_at = measure_from + duration_s

        async def worker(index: int) -> None:
            rng = random.Random(index)
            if ramp_s > 0:
                await asyncio.sleep(rng.uniform(0.0, ramp_s))
            while time.perf_counter() < stop_at:
                if jitter_s > 0:
                    await asyncio.sleep(rng.uniform(0.0, jitter_s))
                sent = time.perf_counter()
                measured = sent >= measure_from
                first = None
                events = 0
                try:
                    async with session.post(url + "/v1/completions", data=body, headers=headers) as resp:
                        if resp.status != 200:
                            await resp.read()
                            run.errors += 1
                            continue
                        queued = resp.headers.get("x-saber-queue-ms")
                        async for chunk in resp.content.iter_any():
                            if first is None:
                                first = time.perf_counter()
                            events += chunk.count(b"data:")
                except aiohttp.ClientError:
                    run.errors += 1
                    continue
                if not measured:
                    continue
                if first is not None:
                    run.ttft_s.append(first - sent)
                if queued is not None:
                    run.queue_ms.append(float(queued))
                run.tokens += max(0, events - 1)  # less [DONE]
                run.requests += 1

        await asyncio.gather(*(worker(i) for i in range(streams)))
        run.wall_s = time.perf_counter() - measure_from
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
        "description": f"{step_ms:g} ms per step at any batch size, no prefill cost (saber_bench.perf.sidecar)",
        "decode_batch_sizes": [1], "decode_step_s": [step_ms / 1000], "prefill_s_per_token": 0.0,
        "context_s_per_token": 0.0, "prefill_only_step_s": None,
    }) + "\n")
    return path



def start(cmd: list[str], log: Path, pattern: str, timeout_s: float = 60.0,
          cpus: set[int] | None = None) -> tuple[subprocess.Popen, str]:
    sink = log.open("w")
    proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT)
    sink.close()
    if cpus:
        os.sched_setaffinity(proc.pid, cpus)
    try:
        return proc, wait_for_listen_url(proc, log, name=cmd[3], timeout_s=timeout_s, pattern=re.compile(pattern))
    except ServerStartError:
        proc.kill()
        raise


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


def start_sidecar(name: str, engine_url: str, out: Path, opts: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    cfg = out / f"sidecar-{name}.yaml"
    cfg.write_text(CONFIGS[name])
    return start(
        [sys.executable, "-m", "saber_cli.main", "sidecar", "--host", "127.0.0.1", "--port", "0",
         "--engine-url", engine_url, "--config", str(cfg), "--log-level", "WARNING"],
        out / f"sidecar-{name}.log", r"saber sidecar listening on (http://\S+)", cpus=opts.sidecar_cpus,
    )


async def measure(targets: dict[str, tuple[str, int | None]], opts: argparse.Namespace) -> dict[str, dict]:
    """Every target in every round, the order rotated each round so drift is shared alike.

    `targets` maps a name to (base URL, pid whose CPU time is charged to it, or None).
    """
    runs: dict[str, list[Run]] = {name: [] for name in targets}
    cpu: dict[str, float] = dict.fromkeys(targets, 0.0)
    names = list(targets)
    for name, (url, _) in targets.items():
        if name != "direct":
            await load(url, min(opts.streams, 16), 1.0, opts.max_tokens, "warmup")
    for i in range(opts.rounds):
        for name in names[i % len(names):] + names[: i % len(names)]:
            url, pid = targets[name]
            cpu0 = cpu_seconds(pid) if pid else None
            run = await load(url, opts.streams, opts.duration, opts.max_tokens, name, opts.jitter_ms / 1000,
                             opts.ramp)
            cpu1 = cpu_seconds(pid) if pid else None
            if cpu0 is not None and cpu1 is not None:
                cpu[name] += cpu1 - cpu0
            runs[name].append(run)
            print(f"  round {i + 1} {name:22s} {run.summary()}", flush=True)
    results = {}
    for name in names:
        if name == "direct":
            continue
        result = compare(runs["direct"], runs[name])
        relayed = sum(r.tokens for r in runs[name])
        result["proxy_cpu_seconds"] = round(cpu[name], 3)
        result["proxy_cpu_ms_per_1000_tokens"] = round(1e6 * cpu[name] / relayed, 2) if relayed else None
        results[name] = result
    return results


async def main_async(opts: argparse.Namespace) -> dict:
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen] = []
    try:
        emulator, engine_url = start(
            [sys.executable, "-m", "saber_cli.main", "emulator", "--host", "127.0.0.1", "--port", "0",
             "--output-len-dist", "max", "--max-num-seqs", str(max(256, opts.streams)),
             *(["--latency-profile", opts.latency_profile] if opts.latency_profile else [])],
            out / "emulator.log", r"listening on (http://\S+)", cpus=opts.other_cpus,
        )
        procs.append(emulator)
        targets: dict[str, tuple[str, int | None]] = {"direct": (engine_url, None)}
        if opts.floor:
            pipe, url = start(
                [sys.executable, "-m", "saber_bench.perf.tcp_pipe", "--upstream", engine_url.split("//", 1)[1]],
                out / "tcp-pipe.log", r"listening on (http://\S+)", cpus=opts.sidecar_cpus,
            )
            procs.append(pipe)
            targets[FLOOR] = (url, pipe.pid)
        for name in opts.policies:
            proc, url = start_sidecar(name, engine_url, out, opts)
            procs.append(proc)
            targets[f"sidecar-{name}"] = (url, proc.pid)
        print(f"{opts.streams} streams, {opts.duration}s per run, {opts.rounds} rounds of: {', '.join(targets)}",
              flush=True)
        measured = await measure(targets, opts)
    finally:
        for proc in reversed(procs):
            stop(proc)
    results = {name: measured[f"sidecar-{name}"] for name in opts.policies}
    return {
        "command": "python -m saber_bench.perf.sidecar " + " ".join(sys.argv[1:]),
        "streams": opts.streams,
        "duration_s": opts.duration,
        "ramp_s": opts.ramp,
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
        **({"floor": measured[FLOOR]} if opts.floor else {}),
    }


def parser_cost(chunks: int = 100_000, repeats: int = 5) -> dict[str, float]:
    """CPU per chunk of the engine client's response parsing (`upstream._Connection.data_received`),
    fed one vLLM-sized SSE chunk per read as a stream arrives, with a sink that only counts: the
    part of the relay's per-token cost that the parser owns, without sockets or other processes
    (so it holds on a loaded machine, where the end-to-end benchmark does not)."""
    from saber_sidecar import upstream

    class _Pool:
        def forget(self, conn) -> None: ...

        def release(self, conn) -> None: ...

    class _Transport:
        def write(self, data) -> None: ...

        def abort(self) -> None: ...

    class _Count(upstream.Sink):
        n = 0

        def on_data(self, data: bytes) -> None:
            self.n += 1

        def on_end(self) -> None: ...

        def on_error(self, exc: Exception) -> None:
            raise exc

    event = b"data: " + json.dumps({"id": "cmpl-1", "object": "text_completion", "created": 1, "model": MODEL,
                                    "choices": [{"index": 0, "text": " tok", "logprobs": None,
                                                 "finish_reason": None}]}).encode() + b"\n\n"
    chunk = b"%x\r\n%b\r\n" % (len(event), event)
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"

    async def once() -> float:
        conn = upstream._Connection(_Pool())  # type: ignore[arg-type]
        conn.connection_made(_Transport())  # type: ignore[arg-type]
        head_future = conn.send(b"", b"")
        conn.data_received(head)
        sink = _Count()
        (await head_future).attach(sink)
        start = time.process_time()
        for _ in range(chunks):
            conn.data_received(chunk)
        elapsed = time.process_time() - start
        assert sink.n == chunks
        return elapsed / chunks * 1e6

    runs = [asyncio.run(once()) for _ in range(repeats)]
    return {"us_per_chunk_best": min(runs), "us_per_chunk_median": float(np.median(runs)), "chunk_bytes": len(chunk)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m saber_bench.perf.sidecar", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="folder for sidecar_perf.json and the process logs (required but with "
                        "--parser-only)")
    parser.add_argument("--parser-only", action="store_true",
                        help="only measure the CPU per chunk of the engine client's parser (in-process, a few "
                        "seconds) and print it")
    parser.add_argument("--streams", type=int, default=200, help="concurrent streams (default 200)")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per run (default 15)")
    parser.add_argument("--rounds", type=int, default=2, help="direct/sidecar pairs per policy (default 2)")
    parser.add_argument("--ramp", type=float, default=4.0,
                        help="seconds over which the streams start, at random times, before measuring begins "
                        "(default 4; about one request's length, so streams do not run in step)")
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
    parser.add_argument("--floor", action="store_true",
                        help="also send the load through a bare TCP byte pipe (saber_bench.perf.tcp_pipe), the least "
                        "any proxy can add on this machine, so the sidecar's own cost can be read against it")
    parser.add_argument("--policies", nargs="+", default=["static", "saber"], choices=list(CONFIGS))
    parser.add_argument("--pin", action="store_true",
                        help="give the sidecar its own CPU (the last one) and run the emulator and the load "
                        "generator on the others, as in a pod where the sidecar container has its own CPU; "
                        "without it all three compete for every CPU")
    opts = parser.parse_args(argv)
    if opts.parser_only:
        cost = parser_cost()
        print(f"engine client parser: {cost['us_per_chunk_best']:.2f} us per {cost['chunk_bytes']}-byte chunk "
              f"(best of 5 runs of 100,000; median {cost['us_per_chunk_median']:.2f})")
        return 0
    if not opts.out:
        parser.error("--out is required (but with --parser-only)")
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
    if opts.streams < 1 or opts.duration <= 0 or opts.rounds < 1 or opts.max_tokens < 1 or opts.ramp < 0:
        parser.error("--streams, --duration, --rounds and --max-tokens must be positive, --ramp not negative")
    # The load generator runs on the sidecar's loop too (uvloop when installed): its CPU is taken
    # from the same cores in both arms, so the cheaper it is, the less it blurs the difference.
    report = run_loop(main_async(opts), os.environ.get("SABER_SIDECAR_EVENT_LOOP", "auto"))
    path = Path(opts.out) / "sidecar_perf.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    rows = [(f"sidecar {name}", r) for name, r in report["policies"].items()]
    if "floor" in report:
        rows.append(("floor (tcp pipe)", report["floor"]))
    for label, r in rows:
        lo50, hi50 = r["added_ttft_p50_ms_ci95"]
        lo99, hi99 = r["added_ttft_p99_ms_ci95"]
        print(f"{label}: added TTFT p50 {r['added_ttft_p50_ms']:+.3f} ms (95% CI {lo50:+.2f}..{hi50:+.2f}), "
              f"p99 {r['added_ttft_p99_ms']:+.3f} ms (95% CI {lo99:+.2f}..{hi99:+.2f}), "
              f"tokens/s ratio {r['tokens_per_second_ratio']:.4f}, proxy CPU "
              f"{r['proxy_cpu_ms_per_1000_tokens']} ms per 1000 tokens; meets {r['meets_targets']}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
