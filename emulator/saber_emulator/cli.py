"""`saber emulator` (serve, calibrate, demo). Heavy imports stay inside the commands."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "emulator",
        help="run the vLLM-compatible engine emulator (or calibrate a latency profile)",
        description="Serve vLLM's OpenAI-compatible API from a step-level continuous-batching model "
        "whose step times come from a latency profile. `saber emulator calibrate CSV -o FILE` builds a profile.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to bind; 0 picks a free one (default 8000)")
    p.add_argument("--model", default="Qwen/Qwen2.5-Coder-3B-Instruct", help="model name, as vLLM's --model")
    p.add_argument("--served-model-name", nargs="+", default=None, help="names clients use (default: --model)")
    p.add_argument("--max-num-seqs", type=int, default=256, help="most requests running at once (default 256)")
    p.add_argument("--max-num-batched-tokens", type=int, default=8192, help="token budget per step (default 8192)")
    p.add_argument("--max-model-len", type=int, default=4096, help="prompt + output tokens per request (default 4096)")
    p.add_argument("--num-gpu-blocks", "--num-gpu-blocks-override", dest="num_gpu_blocks", type=int, default=8192,
                   help="KV cache size in blocks (default 8192)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default 16)")
    p.add_argument("--scheduling-policy", choices=["fcfs", "priority"], default="fcfs")
    p.add_argument("--profile", "--latency-profile", dest="latency_profile", default=None,
                   help="built-in profile name, or a JSON or YAML file such as `saber calibrate --out` writes "
                   "(default paper-qwen2.5-coder-3b)")
    p.add_argument("--seed", type=int, default=0, help="seed for drawn output lengths (default 0)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (or folder) for exact prompt token counts")
    p.add_argument("--chars-per-token", type=float, default=4.0, help="prompt estimate without a tokenizer (default 4)")
    p.add_argument("--output-len-dist", choices=["max", "uniform", "lognormal"], default="uniform",
                   help="output length when ignore_eos is not set (capped by max_tokens; default uniform)")
    p.add_argument("--output-len-low-fraction", type=float, default=0.5,
                   help="uniform: lower bound as a share of max_tokens (default 0.5)")
    p.add_argument("--output-len-median", type=float, default=200.0, help="lognormal: median tokens (default 200)")
    p.add_argument("--output-len-sigma", type=float, default=0.8, help="lognormal: sigma (default 0.8)")
    p.set_defaults(func=_serve)

    sub = p.add_subparsers(dest="emulator_command", metavar="SUBCOMMAND")
    c = sub.add_parser("calibrate", help="build a latency profile from a measured speed CSV (batch size, tokens/s)")
    c.add_argument("csv", help="CSV with columns: batch size, per-request generation speed (tokens/s)")
    c.add_argument("-o", "--output", required=True, help="profile to write (JSON; YAML if it ends in .yaml/.yml)")
    c.add_argument("--name", default=None, help="profile name (default: the output file's stem)")
    c.add_argument("--prefill-s-per-token", type=float, default=None, help="prefill cost per prompt token (default 5e-5)")
    c.add_argument("--context-s-per-token", type=float, default=0.0, help="cost per context token (default 0)")
    c.set_defaults(func=_calibrate)

    d = sub.add_parser("demo", help="a few-second demo: the emulator alone with a few concurrent streams")
    d.add_argument("--requests", type=int, default=8, help="concurrent requests (default 8)")
    d.add_argument("--max-tokens", type=int, default=64, help="max_tokens per request (default 64)")
    d.set_defaults(func=_demo)


def _serve(args: argparse.Namespace) -> int:
    import asyncio
    import sys

    from pydantic import ValidationError

    from .engine import EngineConfig, OutputLengthConfig
    from .server import EmulatorSettings, serve_forever

    try:
        settings = EmulatorSettings(
            host=args.host, port=args.port, model=args.model, served_model_name=args.served_model_name or [],
            engine=EngineConfig(
                max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                max_model_len=args.max_model_len, num_gpu_blocks=args.num_gpu_blocks, block_size=args.block_size,
                scheduling_policy=args.scheduling_policy,
                output_len=OutputLengthConfig(kind=args.output_len_dist, low_fraction=args.output_len_low_fraction,
                                              median_tokens=args.output_len_median, sigma=args.output_len_sigma),
            ),
            profile=args.latency_profile, seed=args.seed, tokenizer=args.tokenizer, chars_per_token=args.chars_per_token,
        )
    except ValidationError as exc:
        print(f"saber emulator: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve_forever(settings))
    except KeyboardInterrupt:
        pass
    except (FileNotFoundError, ValueError, OSError) as exc:
        print(f"saber emulator: {exc}", file=sys.stderr)
        return 1
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from .profile import DEFAULT_PREFILL_S_PER_TOKEN, calibrate

    try:
        profile = calibrate(
            args.csv, name=args.name or Path(args.output).stem,
            prefill_s_per_token=DEFAULT_PREFILL_S_PER_TOKEN if args.prefill_s_per_token is None else args.prefill_s_per_token,
            context_s_per_token=args.context_s_per_token,
        )
    except (OSError, ValueError) as exc:
        print(f"saber emulator calibrate: {exc}", file=sys.stderr)
        return 1
    profile.save(args.output)
    sizes = profile.decode_batch_sizes
    print(f"wrote {args.output}: {len(sizes)} batch sizes {sizes[0]}..{sizes[-1]}, "
          f"speed {profile.speed(sizes[0]):.1f} -> {profile.speed(sizes[-1]):.1f} tokens/s per request")
    return 0


def _demo(args: argparse.Namespace) -> int:
    import asyncio

    from .demo import run_demo

    return asyncio.run(run_demo(requests=args.requests, max_tokens=args.max_tokens))
