"""The sidecar's `saber` subcommands. Heavy imports stay inside the command functions."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the sidecar's subcommands to the `saber` parser (one `_add_*` per command)."""
    _add_fit(subparsers)
    __import__("saber_sidecar.server").server.add_sidecar_parser(subparsers)  # `saber sidecar` (server.py)


def _add_fit(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "fit",
        help="fit speed-vs-concurrency curves (linear, logistic, USL) to a CSV and pick the best",
        description="Fit per-request generation speed against concurrency with the three forms of the "
        "SABER paper and report each form's coefficients, R² and MSE, and the best by R². "
        "FILE is a CSV of two numeric columns, concurrency then tokens/s, with an optional header.",
    )
    p.add_argument("file", metavar="FILE.csv", help="samples: concurrency,speed per line")
    p.add_argument("--json", action="store_true", help="print JSON (keys linear, logistic, usl, best)")
    p.set_defaults(func=run_fit)


def run_fit(args: argparse.Namespace) -> int:
    import json

    from saber_sidecar.speed_model import FORMS, PARAM_NAMES, fit_all, read_samples_csv

    try:
        L, v = read_samples_csv(args.file)
        report = fit_all(L, v)
    except OSError as exc:
        print(f"saber fit: cannot read {args.file}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"saber fit: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    print(f"{report.samples} samples, concurrency {min(L):g}..{max(L):g}")
    print(f"{'form':<9} {'R2':>8} {'MSE':>10}  params")
    for form in FORMS:
        r = report.results.get(form)
        if r is None:
            print(f"{form:<9} {'-':>8} {'-':>10}  did not converge")
            continue
        params = ", ".join(f"{n}={p:.6g}" for n, p in zip(PARAM_NAMES[form], r.params, strict=True))
        print(f"{form:<9} {r.r2:>8.4f} {r.mse:>10.4f}  {params}")
    print(f"best: {report.best}")
    return 0
