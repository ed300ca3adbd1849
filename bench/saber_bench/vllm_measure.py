"""Measuring the real vLLM CPU engine: its /metrics page, and decode speed per concurrency.

`measure` starts a `VLLMServer` with the tiny model, times its start, sends waves of concurrent
streamed completions and writes what it saw (run as `python -m saber_bench.vllm_cpu measure`).
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from .vllm_model import STAMP_NAME, build_tiny_model
from .vllm_server import VLLMServer


def fetch_metrics_text(base_url: str, timeout_s: float = 10.0) -> str:
    with urllib.request.urlopen(base_url + "/metrics", timeout=timeout_s) as resp:
        return resp.read().decode()


def metric_families(text: str) -> list[dict[str, object]]:
    """Name, type, help, sample names and label names of every vllm: family in a /metrics page."""
    from prometheus_client.parser import text_string_to_metric_families

    out: list[dict[str, object]] = []
    for fam in text_string_to_metric_families(text):
        if not fam.name.startswith("vllm:"):
            continue
        out.append({
            "name": fam.name,
            "type": fam.type,
            "help": fam.documentation,
            "samples": sorted({s.name for s in fam.samples}),
            "labels": sorted({k for s in fam.samples for k in s.labels} - {"le"}),
        })
    return out


def sample_value(text: str, sample_name: str) -> float | None:
    """Sum of a sample over all label sets (e.g. over model_name/engine), None if absent."""
    from prometheus_client.parser import text_string_to_metric_families

    total, found = 0.0, False
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == sample_name:
                total += s.value
                found = True
    return total if found else None


async def _one_stream(client, model: str, prompt: str, max_tokens: int) -> dict[str, float]:
    sent = time.perf_counter()
    first = last = None
    tokens = 0
    stream = await client.completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0.0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )
    async for chunk in stream:
        now = time.perf_counter()
        if chunk.choices and chunk.choices[0].text:
            first = first or now
            last = now
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    if first is None or last is None or tokens < 2:
        raise RuntimeError(f"stream produced no usable tokens ({tokens})")
    return {
        "ttft_s": first - sent,
        "e2e_s": last - sent,
        "completion_tokens": tokens,
        # Decode speed as SABER defines it: tokens after the first over the time they took.
        "decode_tok_per_s": (tokens - 1) / max(last - first, 1e-9),
    }


async def _measure_level(base_url: str, model: str, concurrency: int, rounds: int,
                         max_tokens: int, prompt: str) -> dict[str, object]:
    import asyncio
    import statistics

    from openai import AsyncOpenAI

    async with AsyncOpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0,
                           timeout=600) as client:
        per_request: list[dict[str, float]] = []
        started = time.perf_counter()
        for _ in range(rounds):
            per_request += await asyncio.gather(
                *(_one_stream(client, model, prompt, max_tokens) for _ in range(concurrency)))
        wall = time.perf_counter() - started
    speeds = [r["decode_tok_per_s"] for r in per_request]
    return {
        "concurrency": concurrency,
        "requests": len(per_request),
        "max_tokens": max_tokens,
        "decode_tok_per_s_per_request_mean": statistics.fmean(speeds),
        "decode_tok_per_s_per_request_min": min(speeds),
        "decode_tok_per_s_per_request_max": max(speeds),
        "ttft_s_mean": statistics.fmean(r["ttft_s"] for r in per_request),
        "throughput_tok_per_s": sum(r["completion_tokens"] for r in per_request) / wall,
        "wall_s": wall,
    }


MEASURE_PROMPT = (
    "def merge_sorted(a: list[int], b: list[int]) -> list[int]:\n"
    '    """Merge two sorted lists into one sorted list."""\n'
)


def measure(out_dir: Path, *, concurrencies: Sequence[int] = (1, 4, 16), rounds: int = 2,
            max_tokens: int = 128, model_dir: Path | None = None, threads: int = 1) -> dict:
    """Start a server, time its start, measure decode speed per concurrency, list its metrics."""
    import asyncio
    import platform

    out_dir.mkdir(parents=True, exist_ok=True)
    model_dir = model_dir or out_dir / "tiny-model"
    t0 = time.monotonic()
    build_tiny_model(model_dir)
    build_s = time.monotonic() - t0
    result: dict[str, object] = {
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
        "tiny_model": json.loads((model_dir / STAMP_NAME).read_text()),
        "tiny_model_build_s": round(build_s, 2),
        "omp_threads": threads,
    }
    server = VLLMServer(model_dir, max_num_seqs=max(concurrencies), threads=threads,
                        log_path=out_dir / "vllm_server.log")
    with server:
        result["server_start_s"] = round(server.start_seconds or 0.0, 2)
        before = sample_value(fetch_metrics_text(server.base_url), "vllm:generation_tokens_total")
        # One short warm-up request: the first one pays for lazy initialisation.
        asyncio.run(_measure_level(server.base_url, server.served_model_name, 1, 1, 8,
                                   MEASURE_PROMPT))
        levels = []
        for c in concurrencies:
            level = asyncio.run(_measure_level(server.base_url, server.served_model_name, c,
                                               rounds, max_tokens, MEASURE_PROMPT))
            levels.append(level)
            print(f"concurrency {c:3d}: {level['decode_tok_per_s_per_request_mean']:8.1f} tok/s "
                  f"per request, {level['throughput_tok_per_s']:8.1f} tok/s total", flush=True)
        result["levels"] = levels
        text = fetch_metrics_text(server.base_url)
        after = sample_value(text, "vllm:generation_tokens_total")
        result["generation_tokens_total_delta"] = (after or 0.0) - (before or 0.0)
        result["metrics"] = metric_families(text)
        (out_dir / "vllm_metrics.txt").write_text(text)
    path = out_dir / "vllm_cpu_measure.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"server start {result['server_start_s']} s; wrote {path}")
    return result
