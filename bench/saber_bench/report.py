"""Write a run's results: summary.json, a markdown report and PNG plots (matplotlib, Agg)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from .grid import policy_order, workload_order
from .policies import BOUND

METRIC_RULES = (
    "Goodput is the share of all requests of a run whose end-to-end time (scheduled arrival to last "
    "token) is within the SLA; a rejected or unfinished request is a miss. The variability metric "
    "(the paper's CV over rates of the per-rate mean of e2e/SLA) uses every request: a served request "
    "(demoted ones included, with their real e2e time) enters with e2e/SLA; a rejected or unfinished "
    "request, having no e2e time, enters as max(1, the worst served e2e/SLA of the same run), so "
    "rejecting never lowers a policy's latency numbers and all policies are compared on the same "
    "population. Latency percentiles are over served requests; rejected and demoted counts are given "
    "beside them. `static-N` is the `static` policy with cap N in front of an engine with a large cap "
    "(the same as vLLM `max_num_seqs=N` with FIFO waiting). Best static is chosen per cell after the "
    "fact, goodput ties going to the cap with the lower mean e2e/SLA (then the smaller cap), and saber's "
    "CV is also compared with every single cap's. `saber-oracle` is saber told the true output lengths; `capacity-bound` is an optimistic "
    "engine-time reference (bound.py), neither is a deployable policy."
)


def _clean(obj):
    """JSON without NaN/inf (null instead), so any parser reads it."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_summary(out: Path, summary: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "summary.json"
    path.write_text(json.dumps(_clean(summary), indent=1) + "\n")
    return path


def markdown_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table: the header, its rule, one line per row of cells."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _pct(x) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.0f}"


def _num(x, fmt: str = ".2f") -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def goodput_table(summary: dict, workload: str) -> str:
    cells = [c for c in summary["cells"] if c["workload"] == workload]
    policies = sorted({c["policy"] for c in cells}, key=policy_order)
    rates = sorted({c["rate"] for c in cells})
    index = {(c["rate"], c["policy"]): c for c in cells}
    best = {b["rate"]: b for b in summary.get("best_static", []) if b["workload"] == workload}
    head = ["rate"] + [p.replace("static-", "s") for p in policies] + (["best static", "saber − best"] if best else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for r in rates:
        row = [_num(r, "g")] + [_pct(index.get((r, p), {}).get("goodput")) for p in policies]
        if best:
            b = best.get(r)
            gain = b.get("saber_minus_best_static") if b else None
            row += [f"{_pct(b['goodput'])} ({b['policy']})" if b else "–", _num(100 * gain, "+.1f") if gain is not None else "–"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def detail_table(summary: dict, workload: str, policies: Sequence[str]) -> str:
    cells = [c for c in summary["cells"] if c["workload"] == workload and c["policy"] in policies]
    cells.sort(key=lambda c: (c["rate"], policy_order(c["policy"])))
    head = ["rate", "policy", "goodput %", "attainment % by class", "e2e p50/p95/p99 s", "TTFT p50/p95/p99 s",
            "tok/s", "rejected", "demoted"]
    rows = []
    for c in cells:
        att = ", ".join(f"{k} {_pct(v)}" for k, v in c.get("attainment", {}).items())
        rows.append([
            _num(c["rate"], "g"), c["policy"], _pct(c["goodput"]), att,
            f"{_num(c.get('e2e_p50'))}/{_num(c.get('e2e_p95'))}/{_num(c.get('e2e_p99'))}",
            f"{_num(c.get('ttft_p50'), '.3f')}/{_num(c.get('ttft_p95'), '.3f')}/{_num(c.get('ttft_p99'), '.3f')}",
            _num(c.get("throughput_tok_s"), ".0f"), _num(c.get("rejected"), ".1f"), _num(c.get("demoted"), ".1f"),
        ])
    return markdown_table(head, rows)


def cv_table(summary: dict) -> str:
    cv = summary.get("cv", {})
    policies = sorted({p for w in cv.values() for p in w}, key=policy_order)
    head = ["workload"] + [p.replace("static-", "s") for p in policies]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for w in sorted(cv, key=workload_order):
        lines.append("| " + " | ".join([w] + [_num(cv[w].get(p), ".3f") for p in policies]) + " |")
    return "\n".join(lines)


def targets_section(summary: dict) -> str:
    t = summary.get("targets", {}).get("workloads", {})
    if not t:
        return ""
    lines = [
        "| workload | saber ≥ best static − 1 pt, every cell | saber ≥ saber-paper − 1 pt, every cell | "
        "mean gain vs best static (paper) | CV saber / best static (reduction, target ≥ 45%) | "
        "CV reduction vs the steadiest single cap |",
        "|---|---|---|---|---|---|",
    ]
    for w, e in t.items():
        bs = "yes" if e["saber_ge_best_static_every_cell"] else "NO at rates " + ", ".join(
            f"{_num(c['rate'], 'g')} ({_pct(c['saber'])} vs {_pct(c['best_static'])})" for c in e["cells_below_best_static"])
        sp = "yes" if e["saber_ge_saber_paper_every_cell"] else "NO at rates " + ", ".join(
            f"{_num(c['rate'], 'g')} ({_pct(c['saber'])} vs {_pct(c['saber_paper'])})" for c in e["cells_below_saber_paper"])
        paper = e.get("paper_gain_points")
        gain = f"{e['mean_gain_points']:+.1f} pts" + (
            f" (paper +{paper}: {'met' if e['mean_gain_met'] else 'NOT met'})" if paper is not None else "")
        cvs = (f"{_num(e['cv_saber'], '.3f')} / {_num(e['cv_best_static'], '.3f')} "
               f"({_num(100 * e['cv_reduction'] if e['cv_reduction'] is not None and not (isinstance(e['cv_reduction'], float) and math.isnan(e['cv_reduction'])) else None, '.0f')}%: "
               f"{'met' if e['cv_reduction_met'] else 'NOT met'})")
        steady = e.get("cv_steadiest_cap")
        red = e.get("cv_reduction_vs_steadiest_cap")
        vs_cap = (f"{_num(100 * red if red is not None else None, '.0f')}% vs {steady}" if steady else "–")
        lines.append(f"| {w} | {bs} | {sp} | {gain} | {cvs} | {vs_cap} |")
    return "\n".join(lines)


def write_markdown(out: Path, summary: dict, plots: Sequence[str]) -> Path:
    meta = summary.get("meta", {})
    parts = [f"# saber bench — {meta.get('suite', 'results')}", ""]
    if meta:
        parts += [f"- evidence: **{meta.get('evidence', 'sim on the paper profile' if meta.get('mode') == 'sim' else '?')}**",
                  f"- command: `{meta.get('command', '')}`",
                  f"- mode: {meta.get('mode', 'sim')}; seeds: {meta.get('seeds')}; runs: {meta.get('runs')}; "
                  f"elapsed: {_num(meta.get('elapsed_s'), '.1f')} s on {meta.get('machine', '?')}", ""]
    parts += ["## How to read this", "", METRIC_RULES, ""]
    tsec = targets_section(summary)
    if tsec:
        parts += ["## Targets", "", tsec, ""]
    workloads = sorted({c["workload"] for c in summary["cells"]}, key=workload_order)
    for w in workloads:
        parts += [f"## {w}: goodput % (mean over seeds)", "", goodput_table(summary, w), ""]
    parts += ["## Variability: CV over rates of mean e2e/SLA (lower is steadier)", "", cv_table(summary), ""]
    for w in workloads:
        pols = [p for p in ("saber-paper", "saber", "saber-oracle") if any(
            c["policy"] == p and c["workload"] == w for c in summary["cells"])]
        best = {b["policy"] for b in summary.get("best_static", []) if b["workload"] == w}
        parts += [f"## {w}: details", "", detail_table(summary, w, sorted(best) + pols), ""]
    for p in plots:
        parts += [f"![{Path(p).stem}]({Path(p).name})", ""]
    path = out / "report.md"
    path.write_text("\n".join(parts))
    return path


def save_figure(fig, path: Path) -> Path:
    """Lay out, write as PNG and close a figure (pyplot keeps every open figure alive)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _style(policy: str, n_static: int, i_static: int):
    import matplotlib

    if policy.startswith("static-"):
        cmap = matplotlib.colormaps["Greys"]
        return {"color": cmap(0.3 + 0.6 * i_static / max(1, n_static - 1)), "lw": 0.9, "ls": "-", "zorder": 1}
    return {
        "saber-paper": {"color": "tab:orange", "lw": 2, "ls": "-", "marker": "s", "ms": 3, "zorder": 3},
        "saber": {"color": "tab:blue", "lw": 2.4, "ls": "-", "marker": "o", "ms": 3, "zorder": 4},
        "saber-oracle": {"color": "tab:green", "lw": 1.4, "ls": "--", "zorder": 2},
        BOUND: {"color": "black", "lw": 1.2, "ls": ":", "zorder": 2},
    }.get(policy, {"lw": 1.5})


def plot_goodput(out: Path, summary: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = sorted({c["workload"] for c in summary["cells"]}, key=workload_order)
    fig, axes = plt.subplots(1, len(workloads), figsize=(4.6 * len(workloads), 3.8), squeeze=False)
    for ax, w in zip(axes[0], workloads):
        cells = [c for c in summary["cells"] if c["workload"] == w]
        policies = sorted({c["policy"] for c in cells}, key=policy_order)
        statics = [p for p in policies if p.startswith("static-")]
        for p in policies:
            pts = sorted((c["rate"], c["goodput"]) for c in cells if c["policy"] == p and c["goodput"] is not None)
            if not pts:
                continue
            xs, ys = zip(*pts)
            st = _style(p, len(statics), statics.index(p) if p in statics else 0)
            label = p if not p.startswith("static-") or p in (statics[0], statics[-1]) else None
            ax.plot(xs, [100 * y for y in ys], label=label, **st)
        ax.set_title(w)
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel("goodput (% meeting SLA)")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower left")
    return save_figure(fig, out / "goodput_vs_rate.png")


def plot_cv(out: Path, summary: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cv = summary.get("cv", {})
    workloads = sorted(cv, key=workload_order)
    shown = [p for p in ("best-static", "saber-paper", "saber", "saber-oracle") if any(p in cv[w] for w in workloads)]
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(workloads), 3.4))
    x = np.arange(len(workloads))
    width = 0.8 / max(1, len(shown))
    colors = {"best-static": "grey", "saber-paper": "tab:orange", "saber": "tab:blue", "saber-oracle": "tab:green"}
    for i, p in enumerate(shown):
        vals = [cv[w].get(p) or 0.0 for w in workloads]
        ax.bar(x + (i - (len(shown) - 1) / 2) * width, vals, width, label=p, color=colors[p])
    ax.set_xticks(x, workloads)
    ax.set_ylabel("CV over rates of mean e2e/SLA")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, out / "cv.png")


def plot_cdf(out: Path, cdf: dict, rate: float | None, best_static: dict[str, str]) -> Path | None:
    """Latency CDFs (e2e/SLA) at one heavy rate: best static, saber-paper, saber (and the oracle)."""
    if not cdf:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    workloads = sorted(cdf, key=workload_order)
    fig, axes = plt.subplots(1, len(workloads), figsize=(4.6 * len(workloads), 3.6), squeeze=False)
    for ax, w in zip(axes[0], workloads):
        for p, ratios in sorted(cdf[w].items(), key=lambda kv: policy_order(kv[0])):
            if p.startswith("static-") and p != best_static.get(w):
                continue
            vals = np.sort(np.asarray([r if r is not None else np.inf for r in ratios], dtype=float))
            ys = np.arange(1, len(vals) + 1) / len(vals)
            st = _style(p, 1, 0)
            if p.startswith("static-"):
                st = {"color": "grey", "lw": 1.6}
                p = f"best static ({p})"
            st.pop("marker", None)
            ax.step(np.minimum(vals, 10.0), ys, where="post", label=p, **st)
        ax.axvline(1.0, color="red", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_xlim(0.05, 10)
        ax.set_title(f"{w} at {rate:g} req/s" if rate else w)
        ax.set_xlabel("e2e / SLA (rejected shown at 10)")
        ax.set_ylabel("share of requests")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    return save_figure(fig, out / "latency_cdf.png")


def write_all(out: Path, summary: dict, cdf: dict | None = None, cdf_rate: float | None = None) -> dict[str, Path]:
    """summary.json, report.md and the plots; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"goodput": plot_goodput(out, summary), "cv": plot_cv(out, summary)}
    if cdf:
        best = {b["workload"]: b["policy"] for b in summary.get("best_static", []) if b["rate"] == cdf_rate}
        p = plot_cdf(out, cdf, cdf_rate, best)
        if p:
            paths["cdf"] = p
    paths["summary"] = write_summary(out, summary)
    paths["report"] = write_markdown(out, summary, [str(p) for k, p in paths.items() if k in ("goodput", "cv", "cdf")])
    return paths
