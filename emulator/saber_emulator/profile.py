"""Latency profile: how long one engine step takes for a given batch.

A profile is data (a JSON or YAML file, by suffix), so a user can calibrate it to their own GPU and
model (`saber calibrate` writes YAML).

Step time = decode_time(num_decode_seqs) + prefill_tokens * prefill_s_per_token
            + context_tokens * context_s_per_token
            + new_requests * (request_step_s + request_step_s_per_seq * num_decode_seqs)

Per-request costs outside the step table, all 0 by default (the paper profile has none);
`saber calibrate` measures them on a real serving stack, where they are what separates a
request's latency from the engine's steps:
- `request_overhead_s`: fixed latency of every request outside the engine (HTTP, the relay,
  tokenising, streaming the first token back): the engine takes a request into a batch no earlier
  than this after it arrived, so its TTFT and end are that much later.
- `request_step_s`: engine time each request costs when it enters the batch, beyond its prefill:
  on a host whose cores the engine shares with its API server, the relay and the clients, the CPU
  they spend on each request is taken from the engine's steps.
- `request_step_s_per_seq`: the same, per sequence decoding in the step it joins (a join that costs
  in proportion to the batch). `saber calibrate` measures both from single arrivals into decode
  waves at several batch sizes; `saber bench resim` varies them against a kept live run.

`decode_time` is a monotone piecewise-linear table over the number of sequences decoding in the
step, exact at its knots. Calibrated from a measured speed curve v(L) (tokens/s per request while L
requests decode together), the knot at L is 1 / mean(v(L)): each decode step yields one token per
running request, so a request's generation speed while L decode together is exactly v(L).
"""

from __future__ import annotations

import bisect
import csv
import math
from collections import defaultdict
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Assumption (documented in docs/EMULATOR.md): a 3B model in fp16 on one datacenter GPU prefills
# roughly 20k prompt tokens/s; the measured curve says nothing about prefill.
DEFAULT_PREFILL_S_PER_TOKEN = 5.0e-5


class LatencyProfile(BaseModel):
    """Step-time model of one engine (a model on a GPU)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200, description="Profile name.")
    description: str = Field(default="", max_length=4000, description="Where the numbers come from.")
    decode_batch_sizes: list[int] = Field(
        min_length=1, description="Knots: number of sequences decoding in a step, strictly increasing, >= 1."
    )
    decode_step_s: list[float] = Field(
        min_length=1, description="Step time in seconds at each knot, non-decreasing, > 0."
    )
    prefill_s_per_token: float = Field(
        default=DEFAULT_PREFILL_S_PER_TOKEN, ge=0.0, le=1.0,
        description="Extra step time per prompt token computed in the step (chunked prefill).",
    )
    context_s_per_token: float = Field(
        default=0.0, ge=0.0, le=1.0,
        description="Extra step time per token of KV context attended to by the step's sequences. "
        "0 keeps the decode table exact (it was measured at its own context lengths).",
    )
    prefill_only_step_s: float | None = Field(
        default=None, gt=0.0, le=10.0,
        description="Fixed cost of a step with no decoding sequence; default: the first knot's step time.",
    )
    request_overhead_s: float = Field(
        default=0.0, ge=0.0, le=10.0,
        description="Fixed latency of each request outside the engine's steps (HTTP, relay, tokenising): "
        "a request enters a batch no earlier than this after it arrived. 0: none (the emulator's own).",
    )
    request_step_s: float = Field(
        default=0.0, ge=0.0, le=1.0,
        description="Extra step time per request entering the batch (CPU the serving stack spends on each "
        "request, taken from the engine on a shared host). 0: none.",
    )
    request_step_s_per_seq: float = Field(
        default=0.0, ge=0.0, le=0.1,
        description="Extra step time per request entering the batch, per sequence decoding in that step "
        "(a join that costs the engine in proportion to the batch it joins). 0: none.",
    )

    @model_validator(mode="after")
    def _check_table(self) -> LatencyProfile:
        if len(self.decode_batch_sizes) != len(self.decode_step_s):
            raise ValueError("decode_batch_sizes and decode_step_s must have the same length")
        if self.decode_batch_sizes[0] < 1:
            raise ValueError("decode_batch_sizes must start at 1 or more")
        if any(b <= a for a, b in zip(self.decode_batch_sizes, self.decode_batch_sizes[1:])):
            raise ValueError("decode_batch_sizes must be strictly increasing")
        if any(t <= 0 or not math.isfinite(t) for t in self.decode_step_s):
            raise ValueError("decode_step_s values must be finite and > 0")
        if any(b < a for a, b in zip(self.decode_step_s, self.decode_step_s[1:])):
            raise ValueError("decode_step_s must be non-decreasing (more sequences never make a step faster)")
        return self

    def decode_time(self, num_seqs: int) -> float:
        """Step time with `num_seqs` sequences decoding and nothing else in the batch."""
        xs, ys = self.decode_batch_sizes, self.decode_step_s
        if num_seqs <= 0:
            return self.prefill_only_step_s if self.prefill_only_step_s is not None else ys[0]
        if num_seqs <= xs[0]:
            return ys[0]
        if len(xs) == 1:
            return ys[0]
        i = bisect.bisect_left(xs, num_seqs)
        if i < len(xs) and xs[i] == num_seqs:
            return ys[i]
        if i >= len(xs):  # beyond the table: extend the last segment's slope
            i = len(xs) - 1
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        return y0 + (y1 - y0) * (num_seqs - x0) / (x1 - x0)

    def step_time(self, num_decode_seqs: int, prefill_tokens: int = 0, context_tokens: int = 0,
                  new_requests: int = 0) -> float:
        """Seconds one engine step takes for this batch (`new_requests`: requests entering it this step)."""
        return (
            self.decode_time(num_decode_seqs)
            + prefill_tokens * self.prefill_s_per_token
            + context_tokens * self.context_s_per_token
            + new_requests * (self.request_step_s + self.request_step_s_per_seq * num_decode_seqs)
        )

    def speed(self, num_seqs: int) -> float:
        """Per-request generation speed (tokens/s) with `num_seqs` sequences decoding together."""
        return 1.0 / self.decode_time(max(1, num_seqs))

    @classmethod
    def load(cls, path: str | Path) -> LatencyProfile:
        """From a `.yaml`/`.yml` file (the mapping `saber calibrate` writes) or a JSON file (any other suffix)."""
        path = Path(path)
        text = path.read_text()
        if is_yaml(path):
            import yaml

            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise ValueError(f"{path}: not valid YAML: {exc}") from exc
            if not isinstance(data, dict):
                raise ValueError(f"{path}: expected a mapping of profile fields, got {type(data).__name__}")
            return cls.model_validate(data)
        return cls.model_validate_json(text)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        if is_yaml(path):
            path.write_text(self.to_yaml())
        else:
            path.write_text(self.model_dump_json(indent=2) + "\n")

    def to_yaml(self) -> str:
        """Block-style YAML, fields in declaration order, unset optional fields left out.

        The per-request costs are left out at 0, so a profile without them reads as it did before.
        """
        import yaml

        data = self.model_dump(mode="json", exclude_none=True)
        for key in ("request_overhead_s", "request_step_s", "request_step_s_per_seq"):
            if not data.get(key):
                data.pop(key, None)
        return yaml.safe_dump(data, sort_keys=False, width=100)


def is_yaml(path: str | Path) -> bool:
    return Path(path).suffix.lower() in (".yaml", ".yml")


def read_speed_csv(path: str | Path) -> dict[int, float]:
    """Per-batch-size mean generation speed from a CSV with columns (batch size, speed tokens/s).

    The header row is skipped; the first two columns are used whatever their names.
    """
    groups: dict[int, list[float]] = defaultdict(list)
    with open(path, newline="") as f:
        rows = csv.reader(f)
        header = next(rows, None)
        if header is None:
            raise ValueError(f"{path}: empty file")
        for n, row in enumerate(rows, start=2):
            if not row or not "".join(row).strip():
                continue
            try:
                size, speed = int(float(row[0])), float(row[1])
            except (ValueError, IndexError) as exc:
                raise ValueError(f"{path}:{n}: expected 'batch size, speed' numbers, got {row!r}") from exc
            if size < 1 or speed <= 0:
                raise ValueError(f"{path}:{n}: batch size must be >= 1 and speed > 0, got {row!r}")
            groups[size].append(speed)
    if not groups:
        raise ValueError(f"{path}: no data rows")
    return {size: sum(v) / len(v) for size, v in sorted(groups.items())}


def calibrate(
    csv_path: str | Path,
    name: str,
    prefill_s_per_token: float = DEFAULT_PREFILL_S_PER_TOKEN,
    context_s_per_token: float = 0.0,
    description: str = "",
) -> LatencyProfile:
    """Build a profile whose decode speed at each measured batch size equals the CSV's mean there.

    A measured mean that is faster than the one at a smaller batch (noise) is clamped to keep the
    table monotone; the clamp is reported in the description.
    """
    text = description or f"Calibrated from {Path(csv_path).name}: step time at L = 1 / mean speed at L."
    return profile_from_speeds(read_speed_csv(csv_path), name, prefill_s_per_token, context_s_per_token, text)


def profile_from_speeds(
    means: dict[int, float],
    name: str,
    prefill_s_per_token: float = DEFAULT_PREFILL_S_PER_TOKEN,
    context_s_per_token: float = 0.0,
    description: str = "",
    prefill_only_step_s: float | None = None,
    request_overhead_s: float = 0.0,
    request_step_s: float = 0.0,
    request_step_s_per_seq: float = 0.0,
) -> LatencyProfile:
    """A profile whose step time at each batch size L is 1 / mean speed at L (tokens/s per request).

    A step time shorter than the one at a smaller batch (noise) is clamped to keep the table
    monotone; the clamp is reported in the description.
    """
    sizes = sorted(means)
    steps = [1.0 / means[s] for s in sizes]
    clamped = []
    for i in range(1, len(steps)):
        if steps[i] < steps[i - 1]:
            clamped.append(sizes[i])
            steps[i] = steps[i - 1]
    text = description
    if clamped:
        text += f" Clamped for monotonicity at L={clamped}."
    return LatencyProfile(
        name=name,
        description=text.strip(),
        decode_batch_sizes=sizes,
        decode_step_s=steps,
        prefill_s_per_token=prefill_s_per_token,
        context_s_per_token=context_s_per_token,
        prefill_only_step_s=prefill_only_step_s,
        request_overhead_s=request_overhead_s,
        request_step_s=request_step_s,
        request_step_s_per_seq=request_step_s_per_seq,
    )


DEFAULT_PROFILE_NAME = "paper-qwen2.5-coder-3b"


def builtin_profile_path(name: str = DEFAULT_PROFILE_NAME) -> Path:
    return Path(__file__).parent / "profiles" / f"{name}.json"


def load_profile(spec: str | None) -> LatencyProfile:
    """A profile by built-in name or by file path (JSON, or YAML by suffix); None means the default (the paper's curve)."""
    if spec is None:
        spec = DEFAULT_PROFILE_NAME
    path = Path(spec)
    if not path.exists() and builtin_profile_path(spec).exists():
        path = builtin_profile_path(spec)
    if not path.exists():
        builtins = sorted(p.stem for p in (Path(__file__).parent / "profiles").glob("*.json"))
        raise FileNotFoundError(f"latency profile {spec!r} is neither a file nor a built-in profile {builtins}")
    return LatencyProfile.load(path)
