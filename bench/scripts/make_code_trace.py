"""Write the synthetic code trace shipped with the benchmark (bench/saber_bench/data/synthetic_code_trace.csv).

The real Azure LLM inference trace 2023 (Azure/AzurePublicDataset, data/AzureLLMInferenceTrace_code.csv,
CC-BY) cannot be downloaded on the machines this project is built on, so the benchmark ships a
synthetic stand-in in the same CSV format (TIMESTAMP,ContextTokens,GeneratedTokens) with the published
shape of the code trace: prompts ~1.5k tokens at the median (p90 ~5k), outputs ~13 tokens at the
median (p90 ~55), bursty arrivals. It is NOT the Azure data. Pass the real file with
`saber bench sim --trace AzureLLMInferenceTrace_code.csv` where it is available.

    python bench/scripts/make_code_trace.py            # seed 2023, 4,000 requests (the shipped file)
    python bench/scripts/make_code_trace.py --seed 7 --requests 1000 -o /tmp/other.csv

The generator is `saber_bench.traces.synthetic_code_rows` (seeded numpy; see its docstring).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from saber_bench.traces import (
    SYNTHETIC_CODE_TRACE,
    synthetic_code_rows,
    write_azure_csv,
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=2023, help="generator seed (default 2023, the shipped file)")
    p.add_argument("--requests", type=int, default=4000, help="rows (default 4000)")
    p.add_argument("--rate", type=float, default=4.0, help="mean arrival rate, req/s (default 4)")
    p.add_argument("-o", "--output", type=Path, default=SYNTHETIC_CODE_TRACE, help="CSV to write")
    args = p.parse_args(argv)
    rows = synthetic_code_rows(args.requests, args.seed, args.rate)
    write_azure_csv(rows, args.output)
    pr = np.array([r.prompt_tokens for r in rows])
    out = np.array([r.output_tokens for r in rows])
    print(f"wrote {args.output}: {len(rows)} requests over {rows[-1].t:.0f} s; prompt tokens median "
          f"{np.median(pr):.0f} p90 {np.percentile(pr, 90):.0f}; output tokens median {np.median(out):.0f} "
          f"p90 {np.percentile(out, 90):.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
