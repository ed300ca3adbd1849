"""`saber bench live --engine vllm`: the proof on a real engine, with a workload scaled to it.

One real vLLM CPU server (tiny random-weight Llama, `--max-num-seqs` 64: vLLM's own cap) is started
once. The harness then

1. calibrates it (`saber calibrate`'s `calibrate()`) through a pass-through sidecar (a static cap
   above vLLM's, so what is measured is what the gate's clients see on this machine), writing
   `engine-profile.yaml` under the output;
2. derives from that profile two SLA classes, both `on_miss: reject`: `interactive` (short prompt,
   fewer tokens) and `generation` (longer prompt, more tokens), each with a deadline the engine meets
   with `KNEE_BATCH` requests decoding (latency there x `DEADLINE_MARGIN`, at least a human-scale
   floor), and the engine's capacity: the most requests/s it serves within those deadlines (the
   best batch size B, from the profile: B requests decoding at speed v(B) plus the prefill work
   of each request) as the start of a live search through the pass-through sidecar
   (`capacity.search_capacity`: the highest rate at which vLLM's own cap meets 90% of the
   deadlines, searched up and down);
3. runs, for each load (0.5x .. 2x capacity) and seed, every policy on the same arrivals, each
   behind a fresh sidecar process in front of that one vLLM:
   - `static-N`: the gate caps running requests at N (`static-64` = vLLM's own cap, no gate cap);
   - `saber-paper`, `saber` (shipped defaults, cold);
   - `saber-warm`: shipped defaults after `warmup` requests (at 1x capacity, other arrivals)
     through the same sidecar before the measured run;
   - `saber-calibrated`: `scheduling.engine_profile` = the calibration.
   All saber variants are told the engine's cap (`scheduling.engine_max_num_seqs`), as the
   operator does.
4. writes a table (JSON + markdown) and a plot, labelled "real vLLM (CPU build)", and with
   `--compare-sim` the same cells simulated on the calibrated profile (the engine model with
   vLLM's limits: `max_num_seqs`, its CPU token budget per step), the difference per cell and the
   share of cells within `AGREE_POINTS` (`summary.json` `sim_agreement`); also the same cells on
   the profile's step table alone (its per-request costs zeroed), to show what those costs explain.

Prompts are distinct per request (vLLM's prefix cache would otherwise make repeated prompts free,
which the simulator does not model); their token counts come from vLLM's `/tokenize`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from saber_emulator.profile import LatencyProfile

from .capacity import PROBE_STEPS
from .metrics import combine_seeds, run_stats
from .vllm_server import CPU_MAX_NUM_BATCHED_TOKENS
from .workloads import RequestSpec, Task, mix_classes, rng_for, uniform_arrivals

TITLE = "real vLLM (CPU build)"
ENGINE_MAX_NUM_SEQS = 64
AGREE_POINTS = 5.0  # issue 10 item 3: live and sim within this many points of goodput
KNEE_BATCH = 16        # deadlines are what the engine meets with this many decoding
DEADLINE_MARGIN = 1.5  # x the latency at the knee: room for queueing a little, not for a full batch of 64
LOADS = (0.5, 1.0, 1.5, 2.0)
STATIC_CAPS = (8, 16, 32, ENGINE_MAX_NUM_SEQS)
POLICIES = (*(f"static-{n}" for n in STATIC_CAPS), "saber-paper", "saber", "saber-warm", "saber-calibrated")
EXTRA_POLICIES = ("saber-warm", "saber-calibrated")
REQUESTS = 200
WARMUP = 100
# Capacity probe: the profile's capacity misses per-request costs (HTTP, tokenising, contention of
# client, sidecar and engine for the cores), so it only starts the live search (capacity.py). Each
# probe has as many requests as a measured run: a run of n requests at rate r (the paper's method)
# is a burst once n / r is short against the deadlines, so a probe of fewer requests finds a
# capacity the runs cannot hold (100-request probes found 110 req/s where the profile said 46).
SEEDS = 3
# --quick: an end-to-end check in about a minute and a half, not a measurement.
QUICK = {"loads": (1.0, 2.0), "policies": ("static-16", "static-64", "saber", "saber-calibrated"), "seeds": 1,
         "requests": 40, "warmup": 20, "probe_steps": 4}

# (name, prompt tokens, max_tokens, share of requests, deadline floor s): the floors keep deadlines
# human-scale (an IDE user waits ~1 s for a short answer) on an engine as fast as the tiny model.
CLASS_SHAPES = (("interactive", 128, 64, 0.5, 1.0), ("generation", 512, 256, 0.5, 4.0))
_FILLER = (
    "def parse_headers(lines):\n    headers = {}\n    for line in lines:\n        if not line.strip():\n"
    "            break\n        name, _, value = line.partition(':')\n"
    "        headers.setdefault(name.strip().lower(), []).append(value.strip())\n    return headers\n\n"
)


# Only to build the pass-through sidecar's config before anything is measured (a static cap ignores it).
_PLACEHOLDER = LatencyProfile(name="placeholder", decode_batch_sizes=[1], decode_step_s=[0.01])


@dataclass(frozen=True)
class Scaled:
    """The workload derived from a calibrated profile."""

    classes: dict[str, Task]
    shares: dict[str, float]
    prompt_tokens: dict[str, int]
    capacity_rps: float
    best_batch: int
    model_capacity_rps: float | None = None  # the profile's figure, where the live search started
    first_failing_rps: float | None = None    # the lowest probed rate vLLM's own cap did not meet
    probes: tuple = ()

    def to_json(self) -> dict:
        return {"classes": {k: {"max_tokens": t.max_tokens, "deadline_s": t.sla_s, "prompt_tokens":
                                self.prompt_tokens[k], "share": self.shares[k]} for k, t in self.classes.items()},
                "capacity_rps": self.capacity_rps, "best_batch": self.best_batch,
                "model_capacity_rps": self.model_capacity_rps, "first_failing_rps": self.first_failing_rps,
                "probes": list(self.probes)}


def mean_context() -> float:
    """KV context of a sequence of the mix, averaged over its decoding: prompt + half its output."""
    return sum(share * (prompt + out / 2) for _, prompt, out, share, _ in CLASS_SHAPES)


def decode_step(p: LatencyProfile, batch: int) -> float:
    """One decode step with `batch` sequences of the mix's mean context."""
    return p.step_time(batch, 0, round(batch * mean_context()))


PROBE_SEED0 = 900  # the capacity probes' arrival seeds: 900, 901, ... in the order probed
WARM_SEED0 = 1000  # saber-warm's warm-up arrivals: seed WARM_SEED0 + the run's seed, at the capacity
REFERENCE_SEED0 = 5000  # the reference waves' prompts (`calibrate.reference_speed`)


def join_cost(p: LatencyProfile, batch: int) -> float:
    """Engine seconds a request costs the step it joins a batch of `batch` decoding in."""
    return p.request_step_s + p.request_step_s_per_seq * batch


def latency_at(p: LatencyProfile, batch: int, prompt: int, out: int) -> float:
    """A request's end-to-end time while `batch` requests decode: its fixed overhead, its prefill step
    (with its own per-request engine cost), then `out` decode steps."""
    return (p.request_overhead_s + decode_step(p, batch) + prompt * p.prefill_s_per_token + join_cost(p, batch)
            + (out - 1) * decode_step(p, batch))


def scale_workload(p: LatencyProfile, max_num_seqs: int = ENGINE_MAX_NUM_SEQS) -> Scaled:
    classes, shares, prompts = {}, {}, {}
    for name, prompt, out, share, floor in CLASS_SHAPES:
        deadline = round(max(floor, DEADLINE_MARGIN * latency_at(p, KNEE_BATCH, prompt, out)), 3)
        classes[name] = Task(name, prompt * 4, out, deadline)
        shares[name], prompts[name] = share, prompt
    best, best_b = 0.0, 1
    for b in range(1, max_num_seqs + 1):
        if any(latency_at(p, b, prompts[k], t.max_tokens) > t.sla_s for k, t in classes.items()):
            break
        # Engine seconds per request at batch b: its share of b-wide decode steps, its prefill and
        # the engine time the serving stack takes for each request (its join: `join_cost`).
        per_req = sum(shares[k] * (t.max_tokens * decode_step(p, b) / b + prompts[k] * p.prefill_s_per_token)
                      for k, t in classes.items()) + join_cost(p, b)
        if 1.0 / per_req > best:
            best, best_b = 1.0 / per_req, b
    return Scaled(classes, shares, prompts, round(best, 2), best_b)


async def probe_capacity(relay_url: str, engine_url: str, model: str, scaled: Scaled,
                         n: int, steps: int = PROBE_STEPS) -> Scaled:
    """The capacity searched live from the profile's figure (`capacity.search_capacity`): `n`
    requests of the mix a probe, through the pass-through gate (vLLM's own cap)."""
    import aiohttp

    from .calibrate import count_tokens
    from .capacity import search_capacity
    from .live import replay

    seeds = iter(range(PROBE_SEED0, PROBE_SEED0 + steps))  # other arrivals for every probe

    async with aiohttp.ClientSession() as session:
        async def counter(text):
            return await count_tokens(session, engine_url, model, text)

        async def probe(rate: float) -> dict:
            specs = await make_specs(scaled, rate, next(seeds), n, counter, tag="p")
            records, _ = await replay(relay_url, model, specs)
            return {"goodput": run_stats(records).goodput}

        found = await search_capacity(probe, scaled.capacity_rps, steps=steps)
    return replace(scaled, capacity_rps=found["capacity_rps"], model_capacity_rps=scaled.capacity_rps,
                   first_failing_rps=found["first_failing_rps"], probes=tuple(found["probes"]))


async def make_specs(scaled: Scaled, rate: float, seed: int, n: int, counter, tag: str = "r") -> list[RequestSpec]:
    """n requests at `rate` (the paper's arrivals: uniform over n / rate s), distinct prompts, counted by vLLM."""
    rng = rng_for(f"vllm-scaled-{tag}", rate, seed)
    arrivals = uniform_arrivals(n, rate, rng)
    names = mix_classes(scaled.shares, n, rng)
    specs = []
    for i, (t, cls) in enumerate(zip(arrivals, names)):
        task = scaled.classes[cls]
        head = f"# {tag}{seed}-{i} {rate:g}\n"
        chars = task.prompt_chars
        prompt = head + (_FILLER * (chars // len(_FILLER) + 1))[: max(0, chars - len(head))]
        tokens = await counter(prompt) or max(1, chars // 4)
        specs.append(RequestSpec(f"{tag}{i:05d}", cls, float(t), task.sla_s, prompt, tokens, task.max_tokens,
                                 task.max_tokens))
    return specs


async def start_vllm(out: Path, max_num_seqs: int):
    """The real vLLM CPU server with the tiny model (built once under out/), vLLM's own cap = max_num_seqs."""
    from . import vllm_cpu
    from .live import LiveError

    print(f"building/starting the vLLM CPU server (tiny model, --max-num-seqs {max_num_seqs}; about 30 s) ...",
          flush=True)
    try:
        (out / "logs").mkdir(parents=True, exist_ok=True)
        model_dir = await asyncio.to_thread(vllm_cpu.build_tiny_model, out / "vllm-model")
        server = vllm_cpu.VLLMServer(model_dir, max_num_seqs=max_num_seqs, max_model_len=4096,
                                     log_path=out / "logs" / "vllm.log",
                                     extra_args=["--max-num-batched-tokens", str(CPU_MAX_NUM_BATCHED_TOKENS)])
        await asyncio.to_thread(server.start)
    except (RuntimeError, OSError) as exc:
        raise LiveError(f"could not start vLLM: {exc}") from exc
    return server, server.base_url


def policy_config(policy: str, scaled: Scaled, profile: LatencyProfile, max_num_seqs: int):
    """The sidecar config of a proof policy (see the module docstring)."""
    from saber_sidecar.config import SLAClass

    from .policies import sidecar_config

    base = "saber" if policy in EXTRA_POLICIES else policy
    cfg = sidecar_config(base, scaled.classes)
    cfg = cfg.model_copy(update={"classes": [SLAClass(**(c.model_dump() | {"on_miss": "reject"})) for c in cfg.classes]})
    if base.startswith("saber"):
        upd: dict[str, Any] = {"engine_max_num_seqs": max_num_seqs}
        if policy == "saber-calibrated":
            upd["engine_profile"] = profile
        cfg = cfg.model_copy(update={"scheduling": cfg.scheduling.model_copy(update=upd)})
    return type(cfg).model_validate(cfg.model_dump())  # re-validated as a whole


def check_policies(policies: list[str]) -> None:
    from .policies import check_policy

    for p in policies:
        if p not in EXTRA_POLICIES:
            check_policy(p)


async def run_proof(out: Path, *, loads=LOADS, policies=POLICIES, seeds: int = SEEDS, requests: int = REQUESTS,
                    warmup: int = WARMUP, max_num_seqs: int = ENGINE_MAX_NUM_SEQS, compare_sim: bool = False,
                    probe_requests: int | None = None, probe_steps: int = PROBE_STEPS,
                    engine_url: str | None = None, calibration_args: dict | None = None) -> dict:
    """The whole proof; returns the summary written to out/summary.json."""
    import aiohttp
    import yaml

    from .calibrate import calibrate, count_tokens, reference_speed, summary_line, write_outputs
    from .live import LiveError, _dump_records, replay, start_sidecar

    check_policies(list(policies))
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    server = None
    timings: dict[str, float] = {}
    try:
        if engine_url is None:
            server, engine_url = await start_vllm(out, max_num_seqs)
            timings["vllm_start_s"] = server.start_seconds or 0.0
        t = time.perf_counter()
        # Calibrated through a pass-through sidecar (static cap above vLLM's): the profile then holds
        # what clients of the gate see, relay and the machine's contention included, not the bare engine.
        passthru = out / "configs" / "calibrate-passthrough.yaml"
        passthru.parent.mkdir(parents=True, exist_ok=True)
        pcfg = policy_config(f"static-{4 * max_num_seqs}", scale_workload(_PLACEHOLDER), _PLACEHOLDER, max_num_seqs)
        passthru.write_text(yaml.safe_dump(pcfg.model_dump(mode="json", exclude_none=True), sort_keys=False))
        relay = await start_sidecar(engine_url, passthru, logs, "sidecar-calibrate")
        try:
            cal = await calibrate(relay.url, max_concurrency=max_num_seqs, **(calibration_args or {}))
            write_outputs(cal, out / "engine-profile.yaml")
            timings["calibrate_s"] = time.perf_counter() - t
            print("calibrated: " + summary_line(cal), flush=True)
            profile, model = cal.profile, cal.model
            scaled = scale_workload(profile, max_num_seqs)
            if not scaled.capacity_rps > 0 or not math.isfinite(scaled.capacity_rps):
                raise LiveError(f"no capacity could be derived from the calibration: {scaled}")
            t = time.perf_counter()
            scaled = await probe_capacity(relay.url, engine_url, model, scaled, probe_requests or requests,
                                          probe_steps)
            timings["capacity_probe_s"] = time.perf_counter() - t
        finally:
            relay.stop()
        print(f"workload: {json.dumps(scaled.to_json())}", flush=True)
        # The engine's speed now, read the same way as before each run (`reference_speed`): the sim
        # of a run can then use the profile scaled to how fast the machine ran at that run.
        ref_seeds = itertools.count(REFERENCE_SEED0)  # fresh prompts for every reference wave
        ref0 = sorted([await reference_speed(engine_url, model, next(ref_seeds)) for _ in range(3)])[1]
        timings["reference_speed_tok_s"] = ref0
        async with aiohttp.ClientSession() as session:
            async def counter(text):
                return await count_tokens(session, engine_url, model, text)

            arrivals: dict[tuple[Any, ...], list[RequestSpec]] = {}  # (load, seed), ("warm", load, seed)
            for load in loads:
                rate = round(load * scaled.capacity_rps, 3)
                for seed in range(seeds):
                    arrivals[(load, seed)] = await make_specs(scaled, rate, seed, requests, counter)
                    arrivals[("warm", load, seed)] = await make_specs(scaled, scaled.capacity_rps, WARM_SEED0 + seed,
                                                                      warmup, counter, tag="w")
        cells = []
        speed_ratio: dict[tuple[float, str, int], float] = {}  # engine speed before each run / at calibration
        t = time.perf_counter()
        for policy in policies:
            cfg = policy_config(policy, scaled, profile, max_num_seqs)
            path = out / "configs" / f"{policy}.yaml"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(yaml.safe_dump(cfg.model_dump(mode="json", exclude_none=True), sort_keys=False))
        for load in loads:
            rate = round(load * scaled.capacity_rps, 3)
            runs: dict[str, list] = {p: [] for p in policies}
            ratios: dict[str, list] = {p: [] for p in policies}
            lags: dict[str, list] = {p: [] for p in policies}
            for seed in range(seeds):
                # Policies in a rotated order per seed: a slow minute of a shared machine then falls
                # on different policies in different seeds instead of always on the same one.
                order = list(policies[seed % len(policies):]) + list(policies[:seed % len(policies)])
                for policy in order:
                    sidecar = await start_sidecar(engine_url, out / "configs" / f"{policy}.yaml", logs,
                                                  f"sidecar-{policy}")
                    try:
                        ref = await reference_speed(engine_url, model, next(ref_seeds))
                        speed_ratio[(load, policy, seed)] = ref / ref0 if ref0 > 0 and ref > 0 else 1.0
                        if policy == "saber-warm":
                            await replay(sidecar.url, model, arrivals[("warm", load, seed)])
                        records, info = await replay(sidecar.url, model, arrivals[(load, seed)],
                                                     progress=f"{load:g}x ({rate:g} req/s) {policy} seed {seed}")
                    finally:
                        sidecar.stop()
                    _dump_records(out / "requests" / f"{load:g}x-{policy}-{seed}.jsonl", records)
                    runs[policy].append(run_stats(records))
                    lags[policy].append(info["send_lag_max_s"])
                    ratios[policy] += [e2e / r.sla_s if (e2e := r.e2e) is not None else math.inf for r in records]  # e2e: None unless served
            for policy in policies:
                cell = {"workload": "vllm-scaled", "load": load, "rate": rate, "policy": policy, "seeds": seeds,
                        "mode": "live"}
                cell.update(combine_seeds(runs[policy]))
                cell["errors"] = sum(r.unfinished for r in runs[policy])
                cell["send_lag_max_s"] = max(lags[policy])
                cell["speed_ratio_per_seed"] = [speed_ratio[(load, policy, s)] for s in range(seeds)]
                cell["ratios"] = ratios[policy]
                cells.append(cell)
                print(f"  {load:g}x {policy:>16}: goodput {100 * cell['goodput']:.1f}%  rejected "
                      f"{cell['rejected']:.0f}  errors {cell['errors']}", flush=True)
        timings["runs_s"] = time.perf_counter() - t
    finally:
        if server is not None:
            server.stop()
    sim = sim_table = sim_drift = None
    if compare_sim:
        t = time.perf_counter()
        sim = simulate_proof(arrivals, scaled, profile, loads, policies, seeds, max_num_seqs,
                             records_dir=out / "requests")
        sim_drift = simulate_proof(arrivals, scaled, profile, loads, policies, seeds, max_num_seqs,
                                   speed_ratio=speed_ratio)
        # The step table alone (what the simulator had before the per-request costs were measured).
        table_only = profile.model_copy(update={"request_overhead_s": 0.0, "request_step_s": 0.0,
                                                "request_step_s_per_seq": 0.0})
        sim_table = simulate_proof(arrivals, scaled, table_only, loads, policies, seeds, max_num_seqs)
        timings["sim_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0
    return write_proof(out, cells, sim, scaled, profile, timings, loads, policies, seeds, requests, warmup,
                       sim_table=sim_table, sim_drift=sim_drift)


def at_speed(profile: LatencyProfile, ratio: float) -> LatencyProfile:
    """The profile of an engine running `ratio` times as fast (every engine-time term / ratio)."""
    if not (ratio > 0 and math.isfinite(ratio)) or ratio == 1.0:
        return profile
    upd: dict[str, Any] = {"decode_step_s": [s / ratio for s in profile.decode_step_s]}
    for k in ("prefill_s_per_token", "context_s_per_token", "request_step_s", "request_step_s_per_seq"):
        upd[k] = getattr(profile, k) / ratio
    if profile.prefill_only_step_s:
        upd["prefill_only_step_s"] = profile.prefill_only_step_s / ratio
    return LatencyProfile.model_validate(profile.model_dump() | upd)


def cpu_engine(profile: LatencyProfile, max_num_seqs: int, seed: int):
    """The simulated engine of the proof: the vLLM server's limits (its cap, context, token budget)."""
    from saber_emulator.engine import EngineConfig, EngineCore

    return EngineCore(EngineConfig(max_num_seqs=max_num_seqs, max_model_len=4096,
                                   max_num_batched_tokens=CPU_MAX_NUM_BATCHED_TOKENS), profile, seed=seed)


def simulate_proof(arrivals, scaled: Scaled, profile: LatencyProfile, loads, policies, seeds: int,
                   max_num_seqs: int, records_dir: Path | None = None,
                   speed_ratio: dict[tuple[float, str, int], float] | None = None) -> dict:
    """The same cells in virtual time on the calibrated profile: (rate, policy) -> goodput.

    With `records_dir`, each simulated run's per-request records go beside the live ones
    (`{load}x-{policy}-{seed}.sim.jsonl`), for a request-by-request comparison. With `speed_ratio`
    ((load, policy, seed) -> the engine's reference speed before that run over the one at
    calibration), each run is simulated on the profile at that speed (`at_speed`).
    """
    from saber_sidecar.policy import make_policy

    from .policies import request_builder
    from .sim import simulate

    out = {}
    for load in loads:
        rate = round(load * scaled.capacity_rps, 3)
        for policy in policies:
            cfg = policy_config(policy, scaled, profile, max_num_seqs)
            gs = []
            for seed in range(seeds):
                specs = arrivals[(load, seed)]
                if policy == "saber-warm":
                    warm = arrivals[("warm", load, seed)]
                    shift = max(s.arrival for s in warm) + 30.0  # warm-up drained before the measured run
                    specs = warm + [replace(s, arrival=s.arrival + shift) for s in specs]
                run_profile = at_speed(profile, speed_ratio.get((load, policy, seed), 1.0)) if speed_ratio else profile
                res = simulate(specs, make_policy(cfg, seed), cpu_engine(run_profile, max_num_seqs, seed),
                               request_builder("saber", cfg), engine_priority=cfg.scheduling.engine_priority)
                measured = [r for r in res.records if not r.id.startswith("w")]
                if records_dir is not None:
                    from .live import _dump_records

                    _dump_records(records_dir / f"{load:g}x-{policy}-{seed}.sim.jsonl", measured)
                gs.append(run_stats(measured).goodput)
            out[(rate, policy)] = sum(gs) / len(gs)
    return out


def sim_agreement(cells, sim: dict) -> dict:
    """Per cell live, sim and live − sim (points), and the share of cells within AGREE_POINTS."""
    rows = [{"load": c["load"], "rate": c["rate"], "policy": c["policy"], "live": 100 * c["goodput"],
             "sim": 100 * sim[(c["rate"], c["policy"])], "diff": 100 * (c["goodput"] - sim[(c["rate"], c["policy"])])}
            for c in cells if (c["rate"], c["policy"]) in sim]
    within = sum(abs(r["diff"]) <= AGREE_POINTS + 1e-9 for r in rows)
    return {"points": AGREE_POINTS, "cells": rows, "within": within, "share_within": within / len(rows) if rows else 0.0,
            "max_abs_diff": max((abs(r["diff"]) for r in rows), default=0.0),
            "mean_abs_diff": sum(abs(r["diff"]) for r in rows) / len(rows) if rows else 0.0}


def agreement_table(agree: dict, agree_table: dict | None, agree_speed: dict | None = None) -> str:
    """Per cell live, sim and live − sim, with the sim variants beside it: the step table alone
    (`agree_table`) and each run at the engine speed read before it (`agree_speed`)."""
    from .report import markdown_table

    extras = [(name, a) for name, a in (("step table only", agree_table), ("at run speed", agree_speed)) if a]
    head = ["load", "policy", "live %", "sim %", "live − sim"]
    for name, _ in extras:
        head += [f"sim, {name} %", f"live − sim ({name})"]
    others = [{(r["rate"], r["policy"]): r for r in a.get("cells", [])} for _, a in extras]
    rows = []
    for r in agree["cells"]:
        row = [f"{r['load']:g}x", r["policy"], f"{r['live']:.0f}", f"{r['sim']:.0f}", f"{r['diff']:+.0f}"]
        for other in others:
            o = other.get((r["rate"], r["policy"]))
            row += [f"{o['sim']:.0f}", f"{o['diff']:+.0f}"] if o else ["–", "–"]
        rows.append(row)
    tail = (f"\nWithin {AGREE_POINTS:g} points: {agree['within']}/{len(agree['cells'])} cells "
            f"({100 * agree['share_within']:.0f}%), mean |live − sim| {agree['mean_abs_diff']:.1f}, "
            f"max {agree['max_abs_diff']:.1f}")
    for name, a in extras:
        tail += (f"; {name}: {a['within']}/{len(a['cells'])} ({100 * a['share_within']:.0f}%), "
                 f"mean {a['mean_abs_diff']:.1f}, max {a['max_abs_diff']:.1f}")
    return markdown_table(head, rows) + "\n" + tail + ".\n"


def write_proof(out: Path, cells, sim, scaled: Scaled, profile: LatencyProfile, timings, loads, policies, seeds,
                requests, warmup, sim_table: dict | None = None, sim_drift: dict | None = None) -> dict:
    from .live import write_live
    from .machine import describe_machine

    command = ("saber bench live --engine vllm"
               + f" --loads {','.join(f'{x:g}' for x in loads)} --policies {','.join(policies)}"
               + f" --seeds {seeds} --requests {requests} --warmup {warmup}" + (" --compare-sim" if sim else "")
               + f" --out {out}")
    meta = {"mode": "live", "engine": TITLE, "command": command, "machine": describe_machine(),
            "evidence": "live on real vLLM (CPU build); sim on a profile calibrated from that same engine",
            "elapsed_s": timings.get("total_s", 0.0), "timings": timings, "workload": scaled.to_json(),
            "requests": requests, "warmup": warmup,
            "profile": profile.model_dump(mode="json", exclude_none=True)}
    paths = write_live(out, cells, sim, meta, f"saber bench live: {TITLE}, workload scaled to it")
    summary = json.loads(paths["summary"].read_text())
    # Targets of issue 10 item 4, per load: read off the table, not asserted.
    idx = {(c["load"], c["policy"]): c["goodput"] for c in cells}
    targets = []
    for load in loads:
        statics = {p: idx[(load, p)] for p in policies if p.startswith("static-") and (load, p) in idx}
        row = {"load": load}
        if statics:
            best = max(statics, key=lambda p: (statics[p], -int(p.split("-")[1])))
            row |= {"best_static": best, "best_static_goodput": statics[best]}
            for p in ("saber", "saber-warm", "saber-calibrated", "saber-paper"):
                if (load, p) in idx:
                    row[f"{p}_minus_best_static"] = idx[(load, p)] - statics[best]
        if (load, "saber-warm") in idx and (load, "saber-calibrated") in idx:
            row["warm_minus_calibrated"] = idx[(load, "saber-warm")] - idx[(load, "saber-calibrated")]
        if (load, "saber-warm") in idx and (load, f"static-{ENGINE_MAX_NUM_SEQS}") in idx:
            row["warm_minus_vllm_cap"] = idx[(load, "saber-warm")] - idx[(load, f"static-{ENGINE_MAX_NUM_SEQS}")]
        if sim:
            row["live_minus_sim"] = {c["policy"]: c["goodput"] - sim[(c["rate"], c["policy"])]
                                     for c in cells if c["load"] == load and (c["rate"], c["policy"]) in sim}
        targets.append(row)
    summary["targets"] = targets
    agree_md = ""
    if sim:
        summary["sim_agreement"] = sim_agreement(cells, sim)
        if sim_table:
            summary["sim_agreement_table_only"] = sim_agreement(cells, sim_table)
        if sim_drift:
            summary["sim_agreement_at_run_speed"] = sim_agreement(cells, sim_drift)
        agree_md = ("\nLive (real vLLM (CPU build)) against sim on the profile calibrated from it:\n\n"
                    + agreement_table(summary["sim_agreement"], summary.get("sim_agreement_table_only"),
                                      summary.get("sim_agreement_at_run_speed")))
        a = summary["sim_agreement"]
        print(f"sim agreement: {a['within']}/{len(a['cells'])} cells within {AGREE_POINTS:g} points "
              f"(mean |live - sim| {a['mean_abs_diff']:.1f}, max {a['max_abs_diff']:.1f})", flush=True)
    paths["summary"].write_text(json.dumps(summary, indent=1, default=float) + "\n")
    with open(paths["report"], "a") as f:
        f.write(f"\nWorkload (derived from the calibration `engine-profile.yaml`): `{json.dumps(scaled.to_json())}`\n\n"
                f"Timings: `{json.dumps({k: round(v, 1) for k, v in timings.items()})}`\n" + agree_md)
    print((out / "report.md").read_text())
    return summary


async def run_cli(args) -> int:
    from .live import LiveError

    kw: dict[str, Any] = {"loads": LOADS, "policies": POLICIES, "seeds": SEEDS, "requests": REQUESTS, "warmup": WARMUP}
    cal_args = None
    if args.quick:
        kw |= QUICK
        cal_args = {"concurrencies": [1, 4, 16, args.max_num_seqs], "decode_tokens": 128, "rounds": 1,
                    "prompt_lengths": (16, 512, 1536), "prefill_repeats": 2, "progress": False}
    if args.loads:
        kw["loads"] = tuple(args.loads)
    for name in ("policies", "seeds", "requests"):  # None: not given on the command line
        if getattr(args, name) is not None:
            kw[name] = tuple(args.policies) if name == "policies" else getattr(args, name)
    if args.warmup is not None:
        kw["warmup"] = args.warmup
    try:
        check_policies(list(kw["policies"]))
    except ValueError as exc:
        raise LiveError(f"{exc} (or saber-warm, saber-calibrated)") from exc
    summary = await run_proof(Path(args.out), max_num_seqs=args.max_num_seqs, compare_sim=args.compare_sim,
                              engine_url=args.engine_url, calibration_args=cal_args, **kw)
    print(f"wrote {args.out}/summary.json, report.md, live.png, engine-profile.yaml "
          f"({summary['meta']['elapsed_s']:.0f} s)", file=sys.stderr)
    return 0

