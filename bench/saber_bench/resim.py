"""`saber bench resim RUN_DIR`: a real-vLLM proof run simulated again, offline, on a varied profile.

A `saber bench live --engine vllm` run holds everything that decides its arrivals: the scaled
workload and capacity (`summary.json`), the seeds and request counts (its command), and the prompts,
which are rebuilt exactly and counted by the tokenizer the engine served (`vllm-model/tokenizer.json`,
or `--tokenizer`). So its cells, and its capacity probes, can be simulated again in seconds on the
profile it calibrated (`engine-profile.yaml`) with one field changed: how would a change to the
simulator's engine model move its agreement with the live cells (issue 10, item 3), without a
20-minute live run? Unchanged, the profile gives back the run's own `sim_goodput` in every cell.

Evidence: the live numbers are the run's (real vLLM, CPU build); every sim number is sim on the
profile calibrated in that run, varied as stated. A variant that agrees better with one run is a
hypothesis about the engine, not a calibration of it: check it on another run.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from saber_emulator.profile import LatencyProfile

from .live_vllm import (
    ENGINE_MAX_NUM_SEQS,
    PROBE_SEED0,
    WARM_SEED0,
    Scaled,
    make_specs,
    scale_workload,
    sim_agreement,
    simulate_proof,
)
from .metrics import run_stats
from .report import markdown_table


class ResimError(ValueError):
    """The run folder or the variation cannot be used (the message says what to do)."""


@dataclass
class ProofRun:
    path: Path
    profile: LatencyProfile
    scaled: Scaled
    cells: list[dict]
    loads: list[float]
    policies: list[str]
    seeds: int
    requests: int
    warmup: int
    max_num_seqs: int
    probes: list[tuple[float, float]]  # (rate, live goodput) of the capacity search
    probe_requests: int


def _flag(command: str, name: str, default: int) -> int:
    m = re.search(rf"--{name}[ =](\d+)", command)
    return int(m.group(1)) if m else default


def load_run(path: str | Path) -> ProofRun:
    path = Path(path)
    summary_path, profile_path = path / "summary.json", path / "engine-profile.yaml"
    for p in (summary_path, profile_path):
        if not p.is_file():
            raise ResimError(f"{p} is missing: RUN_DIR must be the --out folder of `saber bench live --engine vllm`")
    summary = json.loads(summary_path.read_text())
    meta = summary.get("meta", {})
    if meta.get("mode") != "live" or "workload" not in meta or not summary.get("cells"):
        raise ResimError(f"{summary_path} is not a real-vLLM proof run (no live cells and scaled workload)")
    profile = LatencyProfile.load(profile_path)
    wl = meta["workload"]
    scaled = replace(scale_workload(profile, meta.get("max_num_seqs", ENGINE_MAX_NUM_SEQS)),
                     capacity_rps=wl["capacity_rps"])
    cells = summary["cells"]
    command = meta.get("command", "")
    requests = meta.get("requests", _flag(command, "requests", 200))
    return ProofRun(
        path, profile, scaled, cells,
        loads=sorted({c["load"] for c in cells}),
        policies=list(dict.fromkeys(c["policy"] for c in cells)),
        seeds=int(cells[0]["seeds"]),
        requests=requests,
        warmup=meta.get("warmup", _flag(command, "warmup", 100)),
        max_num_seqs=meta.get("max_num_seqs", ENGINE_MAX_NUM_SEQS),
        probes=[(p["rate"], p["goodput"]) for p in wl.get("probes", [])],
        probe_requests=meta.get("probe_requests", requests),
    )


def token_counter(tokenizer_path: str | Path):
    """Counts prompt tokens as the run's harness had the engine count them (vLLM's /tokenize, which
    encodes with this same tokenizer file, special tokens included)."""
    from tokenizers import Tokenizer

    path = Path(tokenizer_path)
    if not path.is_file():
        raise ResimError(f"{path} is missing: pass --tokenizer PATH (the tokenizer.json of the model the run served)")
    tok = Tokenizer.from_file(str(path))

    async def count(text: str) -> int:
        return len(tok.encode(text).ids)

    return count


async def rebuild(run: ProofRun, counter) -> tuple[dict, list]:
    """The run's arrivals, as its harness built them: per (load, seed), saber-warm's warm-ups, and
    the capacity probes' (`live_vllm.run_proof`, `probe_capacity`)."""
    scaled = run.scaled
    arrivals: dict[tuple[Any, ...], list] = {}
    for load in run.loads:
        rate = round(load * scaled.capacity_rps, 3)
        for seed in range(run.seeds):
            arrivals[(load, seed)] = await make_specs(scaled, rate, seed, run.requests, counter)
            arrivals[("warm", load, seed)] = await make_specs(scaled, scaled.capacity_rps, WARM_SEED0 + seed,
                                                              run.warmup, counter, tag="w")
    probes = [(rate, live, await make_specs(scaled, rate, PROBE_SEED0 + i, run.probe_requests, counter, tag="p"))
              for i, (rate, live) in enumerate(run.probes)]
    return arrivals, probes


def simulate_probes(run: ProofRun, probes: list, profile: LatencyProfile) -> list[dict]:
    """The capacity probes (vLLM's own cap behind a pass-through gate) in virtual time."""
    from saber_sidecar.policy import make_policy

    from .live_vllm import cpu_engine, policy_config
    from .policies import request_builder
    from .sim import simulate

    cfg = policy_config(f"static-{4 * run.max_num_seqs}", run.scaled, profile, run.max_num_seqs)
    out = []
    for rate, live, specs in probes:
        res = simulate(specs, make_policy(cfg, 0), cpu_engine(profile, run.max_num_seqs, 0), request_builder("saber", cfg))
        out.append({"rate": rate, "live": live, "sim": run_stats(res.records).goodput})
    return out


def parse_vary(text: str, profile: LatencyProfile) -> tuple[str, list[tuple[str, LatencyProfile]]]:
    """`FIELD=V1,V2,...`: each value sets the field (a number) or, written `xF`, scales it by F (a
    list field such as `decode_step_s` scales every entry). Returns the field and (label, profile)s."""
    field, sep, values = text.partition("=")
    field = field.strip()
    fields = profile.model_dump()
    numeric = {k for k, v in fields.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    lists = {k for k, v in fields.items() if isinstance(v, list) and k != "decode_batch_sizes"}
    if not sep or field not in numeric | lists or not values.strip():
        raise ResimError(f"--vary wants FIELD=V1,V2,... with FIELD one of {', '.join(sorted(numeric | lists))} "
                         f"(a value `xF` scales the field by F); got {text!r}")
    variants = []
    for raw in values.split(","):
        raw = raw.strip()
        scale = raw.startswith("x")
        try:
            x = float(raw[1:] if scale else raw)
        except ValueError:
            raise ResimError(f"--vary {field}: {raw!r} is not a number (or xF)") from None
        if field in lists and not scale:
            raise ResimError(f"--vary {field}: a list field takes scale factors only (x1.1, ...), got {raw!r}")
        cur = getattr(profile, field)
        new = [v * x for v in cur] if field in lists else (cur * x if scale else x)
        try:
            variants.append((f"{field}={raw}", LatencyProfile.model_validate(fields | {field: new})))
        except ValueError as exc:
            raise ResimError(f"--vary {field}={raw}: not a valid profile ({exc})") from None
    return field, variants


def evaluate(run: ProofRun, arrivals: dict, probes: list, profile: LatencyProfile) -> dict:
    sim = simulate_proof(arrivals, run.scaled, profile, run.loads, run.policies, run.seeds, run.max_num_seqs)
    agree = sim_agreement(run.cells, sim)
    pr = simulate_probes(run, probes, profile)
    return {"agreement": agree, "probes": pr,
            "probe_mean_abs_diff": 100 * sum(abs(p["live"] - p["sim"]) for p in pr) / len(pr) if pr else math.nan}


def live_se(cell: dict) -> float:
    """Standard error (points) of a live cell's mean over its seeds (0 with one seed)."""
    g = [100 * x for x in cell.get("goodput_per_seed", [])]
    if len(g) < 2:
        return 0.0
    m = sum(g) / len(g)
    return math.sqrt(sum((x - m) ** 2 for x in g) / (len(g) - 1) / len(g))


def report(run: ProofRun, results: list[tuple[str, dict]]) -> str:
    """One row per profile; a cell off by more than the target is marked `~` where the difference is
    within 2 standard errors of the live mean over its seeds (the live run cannot resolve it)."""
    se = {(c["load"], c["policy"]): live_se(c) for c in run.cells}
    rows = []
    for label, r in results:
        a = r["agreement"]
        off = [c for c in a["cells"] if abs(c["diff"]) > a["points"] + 1e-9]
        noisy = [c for c in off if abs(c["diff"]) <= 2 * se[(c["load"], c["policy"])]]
        misses = " ".join(f"{c['load']:g}x {c['policy']} {c['diff']:+.0f}{'~' if c in noisy else ''}" for c in off)
        rows.append([label, f"{a['within']}/{len(a['cells'])}", f"{len(off) - len(noisy)}", f"{a['mean_abs_diff']:.1f}",
                     f"{a['max_abs_diff']:.1f}", f"{r['probe_mean_abs_diff']:.1f}", misses or "none"])
    return markdown_table(["profile", "cells within 5 pts", "off beyond 2 SE of live", "mean abs(live − sim)", "max",
                           "probes: mean abs(live − sim)", "cells off by more (live − sim; ~ within 2 SE of live)"], rows)


def run_cli(args) -> int:
    """`saber bench resim RUN_DIR [--vary FIELD=V1,V2] [--tokenizer PATH] [--out DIR]`."""
    import sys

    try:
        run = load_run(args.run_dir)
        variants = [("as calibrated", run.profile)]
        if args.vary:
            variants += parse_vary(args.vary, run.profile)[1]
        counter = token_counter(args.tokenizer or run.path / "vllm-model" / "tokenizer.json")
    except ResimError as exc:
        print(f"saber bench resim: {exc}", file=sys.stderr)
        return 2
    arrivals, probes = asyncio.run(rebuild(run, counter))
    results = []
    for label, profile in variants:
        r = evaluate(run, arrivals, probes, profile)
        results.append((label, r))
        a = r["agreement"]
        print(f"{label}: {a['within']}/{len(a['cells'])} cells within {a['points']:g} points "
              f"(mean {a['mean_abs_diff']:.1f}); probes mean |live - sim| {r['probe_mean_abs_diff']:.1f}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = f"saber bench resim {args.run_dir}" + (f" --vary {args.vary}" if args.vary else "") + f" --out {args.out}"
    md = (f"# Re-simulated: {run.path}\n\n- command: `{command}`\n- evidence: live = the run's (real vLLM, CPU "
          "build); sim = sim on the profile calibrated in that run, varied as named\n\n" + report(run, results))
    (out / "resim.md").write_text(md)
    (out / "resim.json").write_text(json.dumps({"command": command, "run": str(run.path),
                                                "results": [{"profile": lbl, **r} for lbl, r in results]},
                                               indent=1, default=float) + "\n")
    print(md)
    print(f"wrote {out / 'resim.md'}, {out / 'resim.json'}")
    return 0
