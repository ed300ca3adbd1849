"""`saber demo`: the emulator in-process on a free loopback port, a few concurrent streams, a table."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from .engine import EngineConfig
from .server import EmulatorServer, EmulatorSettings

PROMPTS = [
    "Write a Python function that checks whether a string is a palindrome.",
    "Summarize what this Java method does: public int sum(int[] a) { int s = 0; for (int x : a) s += x; return s; }",
    "Translate to Go: def fib(n): return n if n < 2 else fib(n-1) + fib(n-2)",
    "Explain the difference between a process and a thread in two sentences.",
]


async def _one(session: aiohttp.ClientSession, base: str, i: int, max_tokens: int) -> dict:
    chat = i % 2 == 1
    prompt = PROMPTS[i % len(PROMPTS)] * (1 + i)
    body: dict = {"model": "demo", "max_tokens": max_tokens, "stream": True,
                  "stream_options": {"include_usage": True}, "ignore_eos": i % 3 != 2}
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    t0 = time.perf_counter()
    ttft = None
    tokens = 0
    finish = None
    usage = {}
    async with session.post(f"{base}/v1/{'chat/completions' if chat else 'completions'}", json=body) as resp:
        resp.raise_for_status()
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for c in chunk.get("choices", []):
                piece = c["delta"].get("content") if chat else c.get("text")
                if piece:
                    tokens += 1
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                finish = c.get("finish_reason") or finish
    e2e = time.perf_counter() - t0
    decode = e2e - (ttft or 0.0)
    return {"i": i, "api": "chat" if chat else "completions", "prompt": usage.get("prompt_tokens", 0),
            "tokens": tokens, "finish": finish, "ttft": ttft or 0.0, "e2e": e2e,
            "tps": (tokens - 1) / decode if tokens > 1 and decode > 0 else 0.0}


def _metrics_summary(text: str) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    for fam in text_string_to_metric_families(text):
        if fam.type in ("gauge", "counter"):
            for s in fam.samples:
                if s.name.endswith("_created"):
                    continue
                label = s.labels.get("finished_reason")
                rows.append((s.name + (f"{{finished_reason={label}}}" if label else ""), f"{s.value:g}"))
        elif fam.type == "histogram":
            count = sum(s.value for s in fam.samples if s.name.endswith("_count"))
            total = sum(s.value for s in fam.samples if s.name.endswith("_sum"))
            rows.append((fam.name, f"count {count:g}, mean {total / count:.4f}" if count else "count 0"))
    return rows


async def run_demo(requests: int = 8, max_tokens: int = 64) -> int:
    settings = EmulatorSettings(port=0, model="demo", engine=EngineConfig(max_num_seqs=max(1, requests // 2 + 1)))
    server = EmulatorServer(settings)
    port = await server.start()
    base = f"http://127.0.0.1:{port}"
    print(f"emulator on {base}: profile {server.profile.name}, max_num_seqs {settings.engine.max_num_seqs}; "
          f"{requests} concurrent streams, max_tokens {max_tokens}\n")
    try:
        async with aiohttp.ClientSession() as session:
            t0 = time.perf_counter()
            results = await asyncio.gather(*(_one(session, base, i, max_tokens) for i in range(requests)))
            wall = time.perf_counter() - t0
            async with session.get(f"{base}/metrics") as resp:
                metrics = await resp.text()
    finally:
        await server.stop()

    print(f"{'req':>3} {'api':<11} {'prompt':>6} {'tokens':>6} {'finish':<7} {'TTFT s':>7} {'e2e s':>7} {'tok/s':>7}")
    for r in results:
        print(f"{r['i']:>3} {r['api']:<11} {r['prompt']:>6} {r['tokens']:>6} {r['finish'] or '-':<7} "
              f"{r['ttft']:>7.3f} {r['e2e']:>7.3f} {r['tps']:>7.1f}")
    total = sum(r["tokens"] for r in results)
    print(f"\n{total} tokens in {wall:.2f} s ({total / wall:.0f} tokens/s across streams)\n\nengine metrics (/metrics):")
    for name, value in _metrics_summary(metrics):
        print(f"  {name:<55} {value}")
    ok = all(r["tokens"] >= 1 and r["finish"] in ("stop", "length") for r in results)
    return 0 if ok else 1
