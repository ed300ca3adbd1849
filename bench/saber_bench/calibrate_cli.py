"""`saber calibrate`: the command; the measurement is in calibrate.py (imported only when it runs)."""

from __future__ import annotations

import argparse
import sys

from .argtypes import positive_ints


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "calibrate",
        help="measure an engine (decode speed vs concurrency, prefill cost) and write its latency profile",
        description="Measure an OpenAI-compatible engine (vLLM, or `saber emulator`): per-request decode speed "
        "against the number of requests decoding together (waves of N concurrent streamed ignore_eos "
        "completions, counted only while all N decode), and prefill cost per prompt token (TTFT of single "
        "requests at several prompt lengths, least-squares slope), and the cost of KV context (the same waves with "
        "long prompts), and what a request costs the batch it joins (single-token arrivals into decode waves). "
        "Writes one YAML profile (LatencyProfile "
        "schema, under 4 KB) that `scheduling.engine_profile` of the sidecar config, `saber bench sim "
        "--profile` and `saber emulator --profile` accept; the raw samples go to FILE.samples.csv and a plot "
        "to FILE.png. Send nothing else to the engine meanwhile. Takes about a minute on a small engine.",
    )
    p.add_argument("--engine-url", required=True, help="the engine's base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="model name to request (default: the first of /v1/models)")
    p.add_argument("--out", required=True, help="profile file to write (.yaml; .json also works)")
    p.add_argument("--name", default=None, help="profile name (default calibrated-MODEL)")
    p.add_argument("--max-concurrency", type=int, default=64,
                   help="largest wave: set it to the engine's own cap (vLLM --max-num-seqs); waves are "
                   "1, 2, 4, ... and this (default 64)")
    p.add_argument("--concurrency", type=positive_ints, default=None,
                   help="comma-separated wave sizes instead of the powers of two")
    p.add_argument("--decode-tokens", type=int, default=192, help="tokens per request in a decode wave (default 192)")
    p.add_argument("--rounds", type=int, default=2, help="waves per concurrency level (default 2)")
    p.add_argument("--prompt-lengths", type=positive_ints, default=None,
                   help="comma-separated prompt lengths in tokens for the prefill measurement "
                   "(default 16,256,512,1024,1536; keep them under the engine's max-model-len)")
    p.add_argument("--prefill-repeats", type=int, default=3, help="requests per prompt length (default 3)")
    p.add_argument("--context-tokens", type=int, default=1024,
                   help="prompt length of the extra decode waves that measure the cost of KV context "
                   "(context_s_per_token); 0 skips them (default 1024)")
    p.add_argument("--join-tokens", type=int, default=512,
                   help="tokens per request of the waves that measure what a request costs the batch it joins "
                   "(request_step_s + N x request_step_s_per_seq, from the decoding streams' token times around "
                   "each of a few spaced single-token arrivals, N from 4 to 3/4 of --max-concurrency); keep "
                   "16 + this under the engine's max-model-len; 0 skips it and leaves both 0 (default 512)")
    p.add_argument("--duration", type=float, default=300.0,
                   help="time budget in seconds: once spent, remaining waves are skipped and the profile is "
                   "fit on what was measured (default 300)")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG plot")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import asyncio

    from .calibrate import (
        DEFAULT_PROMPT_LENGTHS,
        CalibrationError,
        calibrate,
        summary_line,
        write_outputs,
    )

    if (args.max_concurrency < 1 or args.rounds < 1 or args.prefill_repeats < 1 or args.duration <= 0
            or args.context_tokens < 0):
        print("saber calibrate: --max-concurrency, --rounds, --prefill-repeats must be >= 1, --duration > 0 "
              "and --context-tokens >= 0",
              file=sys.stderr)
        return 2
    try:
        cal = asyncio.run(calibrate(
            args.engine_url, args.model, max_concurrency=args.max_concurrency, concurrencies=args.concurrency,
            decode_tokens=args.decode_tokens, rounds=args.rounds,
            prompt_lengths=args.prompt_lengths or DEFAULT_PROMPT_LENGTHS, prefill_repeats=args.prefill_repeats,
            context_tokens=args.context_tokens, join_tokens=args.join_tokens,
            duration_s=args.duration, name=args.name,
            progress=not args.no_progress,
        ))
        paths = write_outputs(cal, args.out, plot=not args.no_plot)
    except (CalibrationError, ValueError, OSError) as exc:
        print(f"saber calibrate: {exc}", file=sys.stderr)
        return 1
    print(summary_line(cal))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
