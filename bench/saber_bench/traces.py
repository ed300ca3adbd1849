"""Request traces: read the public formats, cut a window, scale time, and turn rows into requests.

Formats (detected from the first line where unambiguous, or named with `--trace-format`):
- `azure`: the Azure LLM inference trace 2023 (Azure/AzurePublicDataset, e.g.
  `data/AzureLLMInferenceTrace_code.csv`): CSV `TIMESTAMP,ContextTokens,GeneratedTokens`, TIMESTAMP
  a date-time (`2023-11-16 18:15:46.6805900`) or seconds.
- `burstgpt`: BurstGPT (HPMLL/BurstGPT): CSV `Timestamp,Model,Request tokens,Response tokens,Total
  tokens,Log Type`, Timestamp in seconds; rows with 0 response tokens (failed requests) are dropped.
- `mooncake`: Mooncake / aiperf `mooncake_trace` JSONL: `{"timestamp": ms, "input_length": n,
  "output_length": m, "hash_ids": [...]}` per line.

The true output length of a row is what the engine generates (capped by `max_tokens`); the client
sends only the cap, and the gate never sees the true length (see `RequestSpec.output_tokens`).
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

from .workloads import CHARS_PER_TOKEN, RequestSpec

FORMATS = ("azure", "burstgpt", "mooncake")
# The file shipped with the benchmark (scripts/make_code_trace.py; synthetic, see its docstring).
SYNTHETIC_CODE_TRACE = Path(__file__).parent / "data" / "synthetic_code_trace.csv"
DEFAULT_MAX_TOKENS_CAP = 256


class TraceError(ValueError):
    """A trace file that cannot be read as the named or detected format."""


@dataclass(frozen=True, slots=True)
class TraceRow:
    """One request of a trace: arrival in seconds from the trace's first row, token counts, and the
    other columns (for class rules)."""

    t: float
    prompt_tokens: int
    output_tokens: int
    columns: dict[str, str] = field(default_factory=dict, compare=False)


_AZURE = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
_BURST = ("Timestamp", "Request tokens", "Response tokens")


def detect_format(path: Path) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        first = f.readline().strip()
    if first.startswith("{"):
        try:
            keys = json.loads(first).keys()
        except json.JSONDecodeError as exc:
            raise TraceError(f"{path}: first line looks like JSON but is not ({exc})") from None
        if {"timestamp", "input_length", "output_length"} <= set(keys):
            return "mooncake"
        raise TraceError(f"{path}: JSON lines without timestamp/input_length/output_length; not a Mooncake trace")
    header = [h.strip() for h in next(csv.reader([first]), [])]
    if all(c in header for c in _AZURE):
        return "azure"
    if all(c in header for c in _BURST):
        return "burstgpt"
    raise TraceError(f"{path}: cannot tell the format from the header {first[:120]!r}; expected Azure "
                     f"({','.join(_AZURE)}), BurstGPT ({','.join(_BURST)},...) or Mooncake JSONL; "
                     "name it with --trace-format")


def _seconds(value: str) -> float:
    """A timestamp as seconds: a number, or a date-time with up to 9 fractional digits."""
    value = value.strip()
    try:
        return float(value)
    except ValueError:
        pass
    m = re.fullmatch(r"(\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d)(\.\d+)?(.*)", value)
    if not m:
        raise ValueError(f"not a timestamp: {value[:40]!r}")
    base = datetime.fromisoformat(m.group(1) + (m.group(3) or ""))
    return base.timestamp() + (float("0" + m.group(2)) if m.group(2) else 0.0)


def _int(value, what: str, line: int, path: Path) -> int:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise TraceError(f"{path}:{line}: {what} must be a number, got {str(value)[:40]!r}") from None
    if not math.isfinite(f) or f < 0:
        raise TraceError(f"{path}:{line}: {what} must be a finite number >= 0, got {value!r}")
    return round(f)


def read_trace(path: str | Path, fmt: str | None = None) -> list[TraceRow]:
    """Every usable row of a trace, sorted by arrival, times relative to the first row."""
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"trace file {path} not found")
    fmt = fmt or detect_format(path)
    if fmt not in FORMATS:
        raise TraceError(f"unknown trace format {fmt!r}; choose one of {', '.join(FORMATS)}")
    raw: list[tuple[float, int, int, dict[str, str]]] = []
    if fmt == "mooncake":
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise TraceError(f"{path}:{i}: not JSON ({exc})") from None
                for k in ("timestamp", "input_length", "output_length"):
                    if k not in obj:
                        raise TraceError(f"{path}:{i}: missing {k!r}")
                t = _int(obj["timestamp"], "timestamp", i, path) / 1000.0 if isinstance(obj["timestamp"], int) \
                    else float(obj["timestamp"]) / 1000.0
                cols = {k: str(v) for k, v in obj.items() if k != "hash_ids"}
                raw.append((t, _int(obj["input_length"], "input_length", i, path),
                            _int(obj["output_length"], "output_length", i, path), cols))
    else:
        ts, pin, pout = (_AZURE if fmt == "azure" else ("Timestamp", "Request tokens", "Response tokens"))
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in (ts, pin, pout) if c not in (reader.fieldnames or [])]
            if missing:
                raise TraceError(f"{path}: not a {fmt} trace, missing column(s) {', '.join(missing)}")
            for i, row in enumerate(reader, 2):
                try:
                    t = _seconds(row[ts])
                except ValueError as exc:
                    raise TraceError(f"{path}:{i}: {exc}") from None
                n_out = _int(row[pout], pout, i, path)
                if fmt == "burstgpt" and n_out == 0:
                    continue  # a failed request in BurstGPT (no response); vLLM's loader drops them too
                raw.append((t, _int(row[pin], pin, i, path), n_out, {k: v for k, v in row.items() if k}))
    if not raw:
        raise TraceError(f"{path}: no requests in the trace")
    raw.sort(key=lambda r: r[0])
    t0 = raw[0][0]
    return [TraceRow(t - t0, max(1, p), max(1, o), c) for t, p, o, c in raw]


def window(rows: Sequence[TraceRow], start: float = 0.0, count: int | None = None,
           duration: float | None = None) -> list[TraceRow]:
    """Rows from `start` seconds on: the first `count` of them, or those within `duration` seconds.
    Times are made relative to the window's first row."""
    if start < 0 or (count is not None and count < 1) or (duration is not None and duration <= 0):
        raise TraceError("need start >= 0, count >= 1, duration > 0")
    out = [r for r in rows if r.t >= start]
    if duration is not None:
        out = [r for r in out if r.t < start + duration]
    if count is not None:
        out = out[:count]
    if not out:
        raise TraceError(f"the window (start {start:g} s, count {count}, duration {duration}) holds no request")
    t0 = out[0].t
    return [TraceRow(r.t - t0, r.prompt_tokens, r.output_tokens, r.columns) for r in out]


def mean_rate(rows: Sequence[TraceRow]) -> float:
    """Requests per second over the window: n / span, the span extended by one mean gap."""
    if len(rows) < 2:
        return math.inf
    span = rows[-1].t - rows[0].t
    return len(rows) / (span * len(rows) / (len(rows) - 1)) if span > 0 else math.inf


def scale(rows: Sequence[TraceRow], rate: float | None = None, speedup: float | None = None) -> list[TraceRow]:
    """Compress or stretch time: to a target mean rate (req/s), or by a speed-up factor. The shape
    of the arrivals (the bursts) is kept; only the clock changes."""
    if (rate is None) == (speedup is None):
        raise TraceError("give exactly one of rate and speedup")
    if rate is not None:
        if not rate > 0:
            raise TraceError(f"rate must be > 0, got {rate}")
        current = mean_rate(rows)
        if not math.isfinite(current):
            raise TraceError("the window's arrivals all fall at one instant; a rate cannot be set")
        speedup = rate / current
    assert speedup is not None  # exactly one of rate and speedup was given
    if not speedup > 0:
        raise TraceError(f"speedup must be > 0, got {speedup}")
    return [TraceRow(r.t / speedup, r.prompt_tokens, r.output_tokens, r.columns) for r in rows]


# ---- classes ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClassRule:
    """Which SLA class a trace row goes to.

    Text form (`--class-rule`): `FIELD:CLASS1@EDGE1,CLASS2@EDGE2,CLASS3` puts a row whose FIELD is at
    most EDGE1 in CLASS1, at most EDGE2 in CLASS2, else in CLASS3; or `FIELD:VALUE1=CLASS1,...,DEFAULT`
    for a text column. FIELD is `prompt_tokens`, `max_tokens` (the cap sent) or a column of the trace.
    """

    field: str
    edges: tuple[tuple[float, str], ...] = ()
    values: tuple[tuple[str, str], ...] = ()
    default: str = ""

    @classmethod
    def parse(cls, text: str) -> ClassRule:
        name, sep, rest = text.partition(":")
        parts = [p.strip() for p in rest.split(",") if p.strip()]
        if not sep or not name.strip() or not parts or "@" in parts[-1] or "=" in parts[-1]:
            raise TraceError(f"class rule {text!r}: expected FIELD:CLASS@EDGE,...,DEFAULT or "
                             "FIELD:VALUE=CLASS,...,DEFAULT (the last item is the class of everything else)")
        edges, values = [], []
        for p in parts[:-1]:
            if "@" in p:
                c, _, e = p.partition("@")
                try:
                    edges.append((float(e), c.strip()))
                except ValueError:
                    raise TraceError(f"class rule {text!r}: edge {e!r} is not a number") from None
            elif "=" in p:
                v, _, c = p.partition("=")
                values.append((v.strip(), c.strip()))
            else:
                raise TraceError(f"class rule {text!r}: item {p!r} needs CLASS@EDGE or VALUE=CLASS")
        if edges and values:
            raise TraceError(f"class rule {text!r}: use edges or values, not both")
        if [e for e, _ in edges] != sorted(e for e, _ in edges):
            raise TraceError(f"class rule {text!r}: edges must increase")
        return cls(name.strip(), tuple(edges), tuple(values), parts[-1])

    def classes(self) -> set[str]:
        return {c for _, c in self.edges} | {c for _, c in self.values} | {self.default}

    def classify(self, row: TraceRow, max_tokens: int) -> str:
        if self.field == "prompt_tokens":
            value: str | float = row.prompt_tokens
        elif self.field == "max_tokens":
            value = max_tokens
        elif self.field in row.columns:
            value = row.columns[self.field]
        else:
            raise TraceError(f"class rule field {self.field!r} is neither prompt_tokens, max_tokens nor a "
                             f"column of the trace ({', '.join(row.columns)})")
        if self.values:
            return dict(self.values).get(str(value).strip(), self.default)
        try:
            x = float(value)
        except ValueError:
            raise TraceError(f"class rule on {self.field!r}: value {value!r} is not a number") from None
        return next((c for e, c in self.edges if x <= e), self.default)


# ---- prompts ---------------------------------------------------------------------------------------
# Code-like filler; a prompt of n tokens is 4n characters of it (the emulator's and the sidecar's
# count without a tokenizer). Against real vLLM, `live_vllm_prompts` fits it with /tokenize.
_CODE_FILLER = (
    "def merge(a, b):\n    out = []\n    i = j = 0\n    while i < len(a) and j < len(b):\n"
    "        if a[i] <= b[j]:\n            out.append(a[i]); i += 1\n        else:\n"
    "            out.append(b[j]); j += 1\n    return out + a[i:] + b[j:]\n\n"
    "class Cache:\n    def __init__(self, size):\n        self.size = size\n        self.data = {}\n\n"
)


def synth_prompt(tokens: int, salt: int = 0) -> str:
    """A code-like prompt whose approximate token count (ceil(chars / 4)) is exactly `tokens`.
    `salt` shifts the text, so prompts differ (no accidental prefix cache hits)."""
    chars = int(tokens * CHARS_PER_TOKEN)
    head = f"# request {salt}\n"
    body = _CODE_FILLER * (chars // len(_CODE_FILLER) + 2)
    off = (salt * 37) % len(_CODE_FILLER)
    return (head + body[off:])[:chars]


# ---- rows to requests ------------------------------------------------------------------------------
def to_specs(rows: Sequence[TraceRow], max_tokens: int, rule: ClassRule | None, default_class: str,
             deadlines: dict[str, float], max_prompt_tokens: int | None = None) -> list[RequestSpec]:
    """One RequestSpec per row: the client sends `max_tokens`; the engine generates min(trace, cap).

    `max_prompt_tokens` clips prompts that would not fit the engine's context with the cap."""
    if max_tokens < 1:
        raise TraceError(f"max_tokens cap must be >= 1, got {max_tokens}")
    specs = []
    for i, r in enumerate(rows):
        cls = rule.classify(r, max_tokens) if rule else default_class
        if cls not in deadlines:
            raise TraceError(f"class {cls!r} (from the class rule) is not in the SLA config; "
                             f"configured: {', '.join(deadlines)}")
        n_prompt = min(r.prompt_tokens, max_prompt_tokens) if max_prompt_tokens else r.prompt_tokens
        specs.append(RequestSpec(
            id=f"t{i:06d}", sla_class=cls, arrival=float(r.t), sla_s=deadlines[cls],
            prompt=synth_prompt(n_prompt, i), prompt_tokens=n_prompt, max_tokens=max_tokens,
            output_tokens=max(1, min(r.output_tokens, max_tokens)),
        ))
    return specs


# ---- the synthetic code trace ----------------------------------------------------------------------
def synthetic_code_rows(n: int = 4000, seed: int = 2023, mean_rate: float = 4.0) -> list[TraceRow]:
    """A trace with the published shape of the Azure 2023 code trace (not its data: the real file
    cannot be downloaded here). Prompts lognormal with median 1,500 and p90 ~5,000 tokens (clipped to
    7,800); outputs lognormal with median 13 and p90 ~55 tokens (clipped to 1,000); arrivals bursty: a
    Markov-modulated Poisson process that spends ~20% of the time in bursts at 4x the calm rate."""
    rng = np.random.default_rng(seed)
    z90 = 1.2815515655446004
    prompts = np.exp(np.log(1500) + (np.log(5000 / 1500) / z90) * rng.standard_normal(n))
    outputs = np.exp(np.log(13) + (np.log(55 / 13) / z90) * rng.standard_normal(n))
    prompts = np.clip(np.round(prompts), 16, 7800).astype(int)
    outputs = np.clip(np.round(outputs), 1, 1000).astype(int)
    # Two states: calm at rate c, burst at 4c; mean dwell 20 s calm, 5 s burst -> mean rate 1.6c.
    calm = mean_rate / 1.6
    times: list[float] = []
    t, burst = 0.0, False
    state_end = rng.exponential(20.0)
    while len(times) < n:
        lam = 4 * calm if burst else calm
        t_next = t + rng.exponential(1.0 / lam)
        if t_next >= state_end:
            t, burst = state_end, not burst
            state_end = t + rng.exponential(5.0 if burst else 20.0)
            continue
        t = t_next
        times.append(t)
    return [TraceRow(float(a), int(p), int(o)) for a, p, o in zip(times, prompts, outputs)]


def write_azure_csv(rows: Iterable[TraceRow], path: Path, start: str = "2023-11-16 18:00:00") -> Path:
    """Rows as an Azure-format CSV (TIMESTAMP as date-times with 7 fractional digits, as the real file)."""
    base = datetime.fromisoformat(start).timestamp()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(_AZURE)
        for r in rows:
            ts = base + r.t
            whole = datetime.fromtimestamp(math.floor(ts)).strftime("%Y-%m-%d %H:%M:%S")
            frac = f"{ts - math.floor(ts):.7f}"[1:]
            w.writerow([whole + frac, r.prompt_tokens, r.output_tokens])
    return path
