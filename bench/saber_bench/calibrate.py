"""`saber calibrate`: measure an OpenAI-compatible engine and write its latency profile.

Measurements, over plain HTTP (vLLM, or `saber emulator`, or any engine that streams
`/v1/completions` and honours `ignore_eos`):

- **decode speed against concurrency.** For each N (1, 2, 4, ... up to `max_concurrency`), waves of N
  concurrent streamed completions with a short prompt, `ignore_eos` and `decode_tokens` tokens each.
  Only the part of each stream where all N requests are decoding counts (from the last first token
  to the first last token of the wave), so the prefill of the wave and its ragged end are left out.
  Speed of a request = tokens it received in that window / the window's length between its own
  chunks; the profile's step time at N is 1 / mean speed (`profile_from_speeds`), so a simulated
  engine decodes at the measured speed at every measured N.
- **prefill cost against prompt length.** Single requests (nothing else running) with prompts of
  several lengths and `max_tokens` 1; TTFT against prompt tokens, a least-squares line; the slope is
  `prefill_s_per_token`, the intercept (HTTP, tokenisation, one step) `prefill_only_step_s`.
  With the engine's `/tokenize` (vLLM) the prompts are code text sized to the wanted token count
  with it (so the server's tokenizer costs what it costs real requests) and the count it reports is
  the one fitted; without it (the emulator) they are token-id lists of the exact length. Every
  prompt starts differently: vLLM's prefix cache would otherwise skip the prefill being measured.
  The intercept less one step (the first knot) is `request_overhead_s`: the fixed latency of a
  request outside the engine's steps (HTTP, the relay, tokenising, streaming back).
- **the cost of a request joining a decoding batch.** At several N (from 4 to 3/4 of
  `max_concurrency`), a long decode wave of N streams while single-token requests arrive one at a
  time, spaced apart; each decoding stream's token times around the step an arrival joined, set
  against the same stream's just before and after (`join_cost.arrival_excess`), give the decode
  seconds that arrival cost: its prefill, the engine's work to take it in and, where the engine
  shares its cores with the API server, the relay and the clients, the CPU they spent on it. Less the
  prefill (charged by `prefill_s_per_token`), a line in N: `request_step_s` + N x
  `request_step_s_per_seq`. An earlier form of this measurement read the whole wave's extra time per
  arrival and found 9-10 ms on the 2-core machine, which made the simulator agree worse with live runs;
  the local reading finds 0.35-0.5 ms + 3-30 us x N there (docs/BENCHMARKS.md, run 9).

The result is one YAML file in the `LatencyProfile` schema (kept under 4 KB: an operator Job writes
it to /dev/termination-log), the raw samples in a CSV beside it, and a PNG plot.
"""

from __future__ import annotations

import asyncio
import csv
import json
import math
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import numpy as np

from saber_emulator.profile import LatencyProfile, profile_from_speeds

from .join_cost import BASELINE, SPACING_STEPS, WINDOW_AFTER, WINDOW_BEFORE, arrival_excess, fit_join_cost

# Kubernetes caps a container's termination message at 4096 bytes.
MAX_PROFILE_BYTES = 4096
DEFAULT_PROMPT_LENGTHS = (16, 256, 512, 1024, 1536)
REQUEST_TIMEOUT_S = 300.0
MIN_WINDOW_TOKENS = 8
DECODE_PROMPT_TOKENS = 16
_TOKENIZE_TEXT = (
    "def merge_intervals(intervals):\n    out = []\n    for start, end in sorted(intervals):\n"
    "        if out and start <= out[-1][1]:\n            out[-1][1] = max(out[-1][1], end)\n"
    "        else:\n            out.append([start, end])\n    return out\n"
    "Summarize what this Java class does: public final class RateLimiter { private long capacity; }\n"
)


class CalibrationError(RuntimeError):
    """The engine could not be measured (unreachable, an error answer, too few samples)."""


def default_concurrencies(max_concurrency: int) -> list[int]:
    """1, 2, 4, ... and max_concurrency itself."""
    if max_concurrency < 1:
        raise ValueError("max_concurrency must be >= 1")
    out, n = [], 1
    while n < max_concurrency:
        out.append(n)
        n *= 2
    return [*out, max_concurrency]


@dataclass
class Sample:
    # "decode"/"decode-context" (value: tokens/s of one request while N decode), "prefill" (value: TTFT
    # s), "join" (value: decode seconds one arrival cost the N streams decoding, each)
    kind: str
    concurrency: int
    prompt_tokens: int
    round: int
    value: float
    tokens: int = 0
    target: int = 0  # prefill: the prompt length asked for (prompt_tokens is what the engine counted)


@dataclass
class Calibration:
    profile: LatencyProfile
    samples: list[Sample] = field(default_factory=list)
    prefill_fit: tuple[float, float] = (0.0, 0.0)  # (intercept s, slope s/token)
    elapsed_s: float = 0.0
    model: str = ""


@dataclass
class _Stream:
    chunks: list[tuple[float, int]] = field(default_factory=list)  # (time, tokens received so far)
    first: float | None = None


async def _stream(session: aiohttp.ClientSession, url: str, model: str, prompt: list[int] | str, max_tokens: int) -> _Stream:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
            "temperature": 0.0,
            # vLLM reports usage in every chunk with this, so tokens coalesced into one chunk still count.
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    out = _Stream()
    count = 0
    async with session.post(url + "/v1/completions", json=body) as resp:
        if resp.status != 200:
            raise CalibrationError(f"{url}/v1/completions answered HTTP {resp.status}: {(await resp.text())[:300]}")
        async for raw in resp.content:
            line = raw.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            now = time.perf_counter()
            chunk = json.loads(line[6:])
            # A chunk with choices carries tokens, even when their text is empty (a partial UTF-8
            # byte of a random model's output); the usage-only chunk at the end has no choices.
            usage = chunk.get("usage") or {}
            if not chunk.get("choices"):
                continue
            count = int(usage["completion_tokens"]) if usage.get("completion_tokens") else count + 1
            if out.first is None:
                out.first = now
            out.chunks.append((now, count))
    if out.first is None:
        raise CalibrationError(f"{url}: a streamed completion returned no tokens")
    return out


def window_spans(streams: list[_Stream]) -> list[tuple[int, float]]:
    """Per request, (tokens, seconds) inside the window where every stream of the wave was decoding."""
    start = max(s.chunks[0][0] for s in streams)
    end = min(s.chunks[-1][0] for s in streams)
    spans = []
    for s in streams:
        inside = [(t, n) for t, n in s.chunks if start <= t <= end]
        # At least MIN_WINDOW_TOKENS inside: a shorter window is mostly the jitter of its two ends.
        if len(inside) >= 2 and inside[-1][0] > inside[0][0] and inside[-1][1] - inside[0][1] >= MIN_WINDOW_TOKENS:
            spans.append((inside[-1][1] - inside[0][1], inside[-1][0] - inside[0][0]))
    return spans


REFERENCE_N = 16  # streams of the reference wave (`reference_speed`)
REFERENCE_TOKENS = 128


async def reference_speed(url: str, model: str, seed: int, n: int = REFERENCE_N, tokens: int = REFERENCE_TOKENS) -> float:
    """Mean per-request decode speed (tokens/s) of one closed wave of n streams: a reading of how fast
    the engine runs right now, to set beside the same reading taken at calibration (a shared or
    virtual machine drifts over minutes). NaN when no stream decoded alongside the others."""
    url = url.rstrip("/")
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        pool, _ = await token_pool(session, url, model)
        prompts = _Prompts(pool, seed)
        streams = await asyncio.gather(*(_stream(session, url, model, prompts.make(DECODE_PROMPT_TOKENS), tokens)
                                         for _ in range(n)))
    speeds = window_speeds(list(streams))
    return sum(speeds) / len(speeds) if speeds else math.nan


def window_speeds(streams: list[_Stream]) -> list[float]:
    """Per-request tokens/s inside the window where every stream of the wave was decoding."""
    return [n / t for n, t in window_spans(streams)]


async def engine_model_name(session: aiohttp.ClientSession, url: str) -> str:
    try:
        async with session.get(url + "/v1/models") as resp:
            if resp.status != 200:
                raise CalibrationError(f"{url}/v1/models answered HTTP {resp.status}")
            data = await resp.json()
    except aiohttp.ClientError as exc:
        raise CalibrationError(f"cannot reach the engine at {url}: {exc}") from exc
    models = data.get("data") or []
    if not models:
        raise CalibrationError(f"{url}/v1/models lists no model")
    return models[0]["id"]


async def count_tokens(session: aiohttp.ClientSession, url: str, model: str, text: str) -> int | None:
    """Prompt tokens of `text` by the engine's own /tokenize, or None when it has none."""
    try:
        async with session.post(url + "/tokenize", json={"model": model, "prompt": text}) as resp:
            if resp.status != 200:
                return None
            data = await resp.json()
    except (aiohttp.ClientError, ValueError):
        return None
    count = data.get("count", len(data.get("tokens") or []))
    return int(count) if count else None


async def text_prompt(session: aiohttp.ClientSession, url: str, model: str, tokens: int, key: int) -> tuple[str, int]:
    """A code prompt of about `tokens` tokens (exact where the tokenizer allows), starting with `key`."""
    head = f"# request {key}\n"
    chars = tokens * 4
    text, count = head, 0
    for _ in range(6):
        text = head + (_TOKENIZE_TEXT * (chars // len(_TOKENIZE_TEXT) + 1))[: max(0, chars - len(head))]
        count = await count_tokens(session, url, model, text) or 0
        if count == tokens or count == 0:
            break
        chars = max(len(head), round(chars * tokens / count))
    return text, count


async def token_pool(session: aiohttp.ClientSession, url: str, model: str) -> tuple[list[int], bool]:
    """Token ids to build prompts from: real ones from vLLM's /tokenize, else a plain id range."""
    try:
        async with session.post(url + "/tokenize", json={"model": model, "prompt": _TOKENIZE_TEXT,
                                                         "add_special_tokens": False}) as resp:
            if resp.status == 200:
                ids = sorted(set((await resp.json()).get("tokens") or []))
                if len(ids) >= 16:
                    return ids, True
    except (aiohttp.ClientError, ValueError):
        pass
    return list(range(100, 1100)), False


class _Prompts:
    """Distinct token-id prompts of exact lengths (no two share a first token block: no prefix-cache hits)."""

    def __init__(self, pool: list[int], seed: int = 0):
        self.pool = np.asarray(pool)
        self.rng = np.random.default_rng(seed)

    def make(self, n: int) -> list[int]:
        return [int(x) for x in self.rng.choice(self.pool, size=n)]


async def calibrate(
    url: str,
    model: str | None = None,
    *,
    max_concurrency: int = 64,
    concurrencies: list[int] | None = None,
    decode_tokens: int = 192,
    rounds: int = 2,
    prompt_lengths: tuple[int, ...] | list[int] = DEFAULT_PROMPT_LENGTHS,
    prefill_repeats: int = 3,
    context_tokens: int = 1024,
    join_tokens: int = 512,
    duration_s: float = 300.0,
    name: str | None = None,
    progress: bool = True,
) -> Calibration:
    """Measure the engine at `url`; returns its profile and the raw samples.

    `context_tokens` > 0 also measures the cost of KV context (decode waves with prompts that long;
    0 skips it and leaves `context_s_per_token` 0). `join_tokens`: tokens per request of the waves that
    measure the cost of a request joining the batch (0 skips them and leaves `request_step_s` and
    `request_step_s_per_seq` 0; keep prompt + this under the engine's max-model-len). `duration_s` bounds the run: once spent, the remaining waves are skipped (the profile is fit on
    what was measured; at least one decode level and two prompt lengths are needed).
    """
    url = url.rstrip("/")
    levels = sorted(set(concurrencies or default_concurrencies(max_concurrency)))
    if not levels or levels[0] < 1:
        raise ValueError("concurrencies must be >= 1")
    if decode_tokens < 8:
        raise ValueError("decode_tokens must be >= 8 (the all-decoding window needs a few tokens)")
    lengths = sorted({int(x) for x in prompt_lengths})
    if len(lengths) < 2 or lengths[0] < 1:
        raise ValueError("need at least two distinct prompt lengths >= 1")
    # Context cost: the same waves with long prompts at the smallest, a middle and the largest N.
    ctx_levels = sorted({levels[0], levels[len(levels) // 2], levels[-1]}) if context_tokens else []
    # Join cost: N below the engine's cap (an arrival must find a seat) and up to 3/4 of it.
    top = max_concurrency * 3 // 4
    join_levels = sorted({n for n in levels if 4 <= n < max_concurrency} | ({top} if top >= 4 else set()))
    if join_tokens < 0:
        raise ValueError("join_tokens must be >= 0")
    if 0 < join_tokens < 4 * SPACING_STEPS:
        raise ValueError(f"join_tokens must be 0 (skip) or >= {4 * SPACING_STEPS}: each wave needs room for a few "
                         "spaced arrivals")
    if not join_tokens:
        join_levels = []
    t0 = time.perf_counter()
    samples: list[Sample] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=(len(levels) + len(ctx_levels) + 2 * len(join_levels)) * rounds
                   + len(lengths) * prefill_repeats + 1, unit="wave",
                   desc="saber calibrate")
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    connector = aiohttp.TCPConnector(limit=0)
    skipped = False
    try:
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            model = model or await engine_model_name(session, url)
            pool, exact = await token_pool(session, url, model)
            prompts = _Prompts(pool)
            await _stream(session, url, model, prompts.make(16), 8)  # warm-up: first-request costs
            if bar:
                bar.update()
            async def waves(n: int, prompt_len: int, kind: str) -> None:
                nonlocal skipped
                good = 0
                # A wave counts when at least half its streams decoded together for a while; on a busy
                # machine a stream can start late, so a wave is retried (twice at most per level).
                for r in range(rounds + 2):
                    if good == rounds:
                        break
                    if time.perf_counter() - t0 > duration_s and any(s.kind == "decode" for s in samples):
                        skipped = True
                        break
                    streams = await asyncio.gather(*(_stream(session, url, model, prompts.make(prompt_len),
                                                             decode_tokens) for _ in range(n)))
                    spans = window_spans(streams)
                    if len(spans) * 2 < n:
                        continue
                    good += 1
                    # tokens = the tokens counted in the window (the level's speed weighs by them).
                    samples.extend(Sample(kind, n, prompt_len, r, k / dt, k) for k, dt in spans)
                    if bar:
                        bar.update()

            for n in levels:
                await waves(n, DECODE_PROMPT_TOKENS, "decode")
            for n in ctx_levels:
                await waves(n, context_tokens, "decode-context")

            if join_levels:
                steps = _step_means(samples, "decode")
                # Twice the rounds: a join costs a fraction of the steps' own spread around it.
                for r in range(2 * rounds):
                    for n in join_levels:
                        if time.perf_counter() - t0 > duration_s:
                            skipped = True
                            break
                        step = float(np.interp(n, sorted(steps), [steps[k] for k in sorted(steps)]))
                        samples.extend(await _join_wave(session, url, model, prompts, n, join_tokens, step, r))
                        if bar:
                            bar.update()
            # An untimed pass first (rep -1): the first request at a new prompt length costs 2-4x the
            # next ones on vLLM's CPU build (kernels set up per shape), which steady traffic never pays.
            # Then longest first, then interleaved, so a drift in machine load does not tilt the slope.
            order = [(-1, p) for p in lengths] + [
                (rep, p) for rep in range(prefill_repeats) for p in (lengths[::-1] if rep % 2 == 0 else lengths)]
            for rep, p in order:
                if time.perf_counter() - t0 > duration_s and len({s.prompt_tokens for s in samples
                                                                   if s.kind == "prefill"}) >= 2:
                    skipped = True
                    break
                prompt, count = (await text_prompt(session, url, model, p, rep * 100_000 + p)) if exact \
                    else (prompts.make(p), p)
                t_send = time.perf_counter()
                s = await _stream(session, url, model, prompt, 1)
                if rep < 0:
                    continue
                assert s.first is not None, "the engine streamed no token"
                samples.append(Sample("prefill", 1, count, rep, s.first - t_send, 1, p))
                if bar:
                    bar.update()
    except aiohttp.ClientError as exc:
        raise CalibrationError(f"engine at {url} failed during calibration: {exc}") from exc
    finally:
        if bar:
            bar.close()
    return _build(samples, url, model, name, exact, skipped, time.perf_counter() - t0, decode_tokens)


async def _join_wave(session: aiohttp.ClientSession, url: str, model: str, prompts: _Prompts, n: int,
                     tokens: int, step: float, r: int) -> list[Sample]:
    """One wave of n decoding streams with single-token requests sent one at a time through it,
    SPACING_STEPS apart; a "join" sample (value: decode seconds it cost) per arrival that could be read."""
    decodes = [asyncio.ensure_future(_stream(session, url, model, prompts.make(DECODE_PROMPT_TOKENS), tokens))
               for _ in range(n)]
    t_start = time.perf_counter()
    # From when all n are decoding plus a baseline's worth of steps, to a window and baseline before
    # the wave's end as its first step predicts it (the steps grow with context: it ends later).
    await asyncio.sleep(0.05 + (WINDOW_BEFORE + BASELINE + 5) * step)
    end_by = t_start + tokens * step - (WINDOW_AFTER + BASELINE + 10) * step
    firsts: list[float] = []
    try:
        while time.perf_counter() < end_by and not any(d.done() for d in decodes):
            s = await _stream(session, url, model, prompts.make(DECODE_PROMPT_TOKENS), 1)
            assert s.first is not None  # _stream raises when no token came
            firsts.append(s.first)
            await asyncio.sleep(SPACING_STEPS * step)
        streams = [x.chunks for x in await asyncio.gather(*decodes)]
    finally:
        for d in decodes:  # an arrival that failed leaves no wave streaming behind it
            d.cancel()
    out = []
    for f in firsts:
        x = arrival_excess(streams, f)
        if x is not None:
            out.append(Sample("join", n, DECODE_PROMPT_TOKENS, r, x))
    return out


def _step_means(samples: list[Sample], kind: str) -> dict[int, float]:
    """Step time at N = all tokens counted in the windows / all their seconds (a ratio of sums): when
    the client reads a stream late, its chunks bunch up and its own speed looks high over a short
    span; weighing by span keeps such a stream from pulling the level's mean."""
    toks: dict[int, float] = {}
    secs: dict[int, float] = {}
    for s in samples:
        if s.kind == kind:
            toks[s.concurrency] = toks.get(s.concurrency, 0.0) + s.tokens
            secs[s.concurrency] = secs.get(s.concurrency, 0.0) + s.tokens / s.value
    return {n: secs[n] / toks[n] for n in toks}


def _build(samples: list[Sample], url: str, model: str, name: str | None, exact: bool, skipped: bool,
           elapsed: float, decode_tokens: int = 192) -> Calibration:
    short = _step_means(samples, "decode")
    if not short:
        raise CalibrationError("no decode samples: every wave ended before all its streams were decoding "
                               "(raise decode_tokens)")
    # Context cost c: step(N) grows by N x (extra context per sequence) x c with long prompts. Each
    # sequence's mean context inside the window is about its prompt + half its output.
    long_ = _step_means(samples, "decode-context")
    ctx_prompt = next((s.prompt_tokens for s in samples if s.kind == "decode-context"), 0)
    short_ctx = DECODE_PROMPT_TOKENS + decode_tokens / 2
    both = [n for n in long_ if n in short]
    ctx_cost = 0.0
    if both and ctx_prompt > DECODE_PROMPT_TOKENS:
        extra = ctx_prompt - DECODE_PROMPT_TOKENS
        ctx_cost = sum(long_[n] - short[n] for n in both) / sum(n * extra for n in both)
        ctx_cost = float(min(max(ctx_cost, 0.0), 1e-3))
    # The decode table holds the context-free part; the engine model adds context x c back.
    steps = {n: max(t - n * short_ctx * ctx_cost, 0.1 * t) for n, t in short.items()}
    means = {n: 1.0 / t for n, t in steps.items()}
    pre = [s for s in samples if s.kind == "prefill"]
    targets = sorted({s.target for s in pre})
    if len(targets) < 2:
        raise CalibrationError("prefill needs TTFTs at two prompt lengths or more")
    # Medians per asked length, then a line: robust to one request that met a busy moment.
    lengths = [float(np.median([s.prompt_tokens for s in pre if s.target == x])) for x in targets]
    med = [float(np.median([s.value for s in pre if s.target == x])) for x in targets]
    slope, intercept = np.polyfit(np.asarray(lengths, float), np.asarray(med), 1)
    slope = float(min(max(slope, 0.0), 1.0))
    intercept = float(intercept)
    # The intercept is one step (a single sequence's forward pass, the first knot) plus what the
    # request spends outside the engine; that rest is the per-request fixed latency.
    first_step = steps[min(steps)]
    overhead = min(max(intercept - first_step, 0.0), 10.0)
    joins = [s for s in samples if s.kind == "join"]
    req_step, per_seq = fit_join_cost([(s.concurrency, s.value) for s in joins], DECODE_PROMPT_TOKENS * slope)
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%MZ")
    text = (
        f"Measured by saber calibrate at {stamp} against {url} (model {model}) in {elapsed:.0f} s. "
        f"Decode: waves of N concurrent ignore_eos streams, N={sorted(means)}, step time = seconds/token of "
        f"each request while all N decode (ratio of sums), less the context term"
        + (f" (context from waves with {ctx_prompt}-token prompts at N={both})" if both else "")
        + f". Prefill: TTFT of single requests with prompts of {[round(x) for x in lengths]} tokens "
        f"({'text, counted by /tokenize' if exact else 'token-id prompts'}), least-squares slope; "
        f"intercept {intercept * 1000:.1f} ms, less one step = request_overhead_s."
        + (f" Join cost: {len(joins)} single-token arrivals into decode waves at "
           f"N={sorted({s.concurrency for s in joins})}, the streams' extra time around each, less its prefill, "
           f"a line in N." if joins else "")
        + (" Cut short by the duration limit." if skipped else "")
    )
    profile = profile_from_speeds(
        means, name or f"calibrated-{model}"[:200], prefill_s_per_token=slope, description=text,
        context_s_per_token=_sig(ctx_cost),
        request_overhead_s=_sig(overhead), request_step_s=_sig(req_step), request_step_s_per_seq=_sig(per_seq),
    )
    # Six significant digits: far finer than the measurement, and a short readable file.
    profile = profile.model_copy(update={
        "decode_step_s": [_sig(x) for x in profile.decode_step_s],
        "prefill_s_per_token": _sig(profile.prefill_s_per_token),
    })
    return Calibration(LatencyProfile.model_validate(profile.model_dump()), samples, (intercept, slope), elapsed,
                       model)


def _sig(x: float) -> float:
    return float(f"{x:.6g}")


def write_outputs(cal: Calibration, out: str | Path, plot: bool = True) -> dict[str, Path]:
    """The profile (YAML, or JSON by suffix), the samples CSV beside it, and the plot PNG."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cal.profile.save(out)
    size = out.stat().st_size
    if size > MAX_PROFILE_BYTES:
        raise CalibrationError(f"{out} is {size} bytes, over the {MAX_PROFILE_BYTES}-byte termination-log limit")
    paths = {"profile": out}
    csv_path = out.with_suffix(".samples.csv")
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["kind", "concurrency", "prompt_tokens", "target_prompt_tokens", "round", "value", "unit", "tokens"])
        units = {"prefill": "ttft_s", "join": "excess_s"}
        for s in cal.samples:
            w.writerow([s.kind, s.concurrency, s.prompt_tokens, s.target or "", s.round, f"{s.value:.6g}",
                        units.get(s.kind, "tokens_per_s"), s.tokens])
    paths["samples"] = csv_path
    if plot:
        paths["plot"] = plot_calibration(cal, out.with_suffix(".png"))
    return paths


def plot_calibration(cal: Calibration, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = cal.profile
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for kind, color, label in (("decode", "tab:blue", "requests, short prompts"),
                               ("decode-context", "tab:green", "requests, long prompts")):
        dec = [s for s in cal.samples if s.kind == kind]
        if dec:
            a1.scatter([s.concurrency for s in dec], [s.value for s in dec], s=8, alpha=0.4, color=color, label=label)
    a1.plot(p.decode_batch_sizes, [p.speed(n) for n in p.decode_batch_sizes], "o-", color="tab:red",
            label="profile (no context)")
    a1.set_xscale("log", base=2)
    a1.set_xlabel("requests decoding together (N)")
    a1.set_ylabel("tokens/s per request")
    a1.set_title(f"decode speed: {cal.model}", fontsize=9)
    a1.legend(fontsize=8)
    a1.grid(alpha=0.3)
    pre = [s for s in cal.samples if s.kind == "prefill"]
    a2.scatter([s.prompt_tokens for s in pre], [1000 * s.value for s in pre], s=10, label="TTFT")
    xs = np.linspace(0, max(s.prompt_tokens for s in pre), 50)
    a0, b = cal.prefill_fit
    a2.plot(xs, 1000 * (a0 + b * xs), color="tab:red", label=f"{b * 1000:.3f} ms/token + {a0 * 1000:.1f} ms")
    a2.set_xlabel("prompt tokens")
    a2.set_ylabel("TTFT ms (single request)")
    a2.set_title("prefill cost", fontsize=9)
    a2.legend(fontsize=8)
    a2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summary_line(cal: Calibration) -> str:
    p = cal.profile
    speeds = ", ".join(f"N={n}: {p.speed(n):.0f}" for n in p.decode_batch_sizes)
    return (f"prefill {p.prefill_s_per_token * 1000:.3f} ms/token (intercept {cal.prefill_fit[0] * 1000:.1f} ms); "
            f"per request: overhead {p.request_overhead_s * 1000:.1f} ms, engine {p.request_step_s * 1000:.2f} ms "
            f"+ {p.request_step_s_per_seq * 1e6:.1f} us per sequence decoding; "
            f"decode tokens/s per request {speeds}; {cal.elapsed_s:.0f} s")

