"""Live trace replay: the trace's requests sent to a sidecar in front of the emulator or real vLLM.

The client sends `max_tokens` (the cap) and `vllm_xargs.saber_output_tokens` (the trace's length);
the emulator stops there itself, and real vLLM does through the `StopAtLength` logits processor
(vllm_stop.py) that `start_vllm` loads. Against real vLLM each prompt is fitted with the engine's
own `/tokenize` and `/detokenize`, so it has exactly the trace's prompt tokens.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from pathlib import Path

import aiohttp

from .trace_bench import TraceSource
from .traces import synth_prompt
from .workloads import RequestSpec

LOGITS_PROCESSOR = "saber_bench.vllm_stop:StopAtLength"


@dataclass
class LiveTrace:
    source: TraceSource
    engine: str = "emulator"

    @property
    def ignore_eos(self) -> bool | None:
        """What live.replay sends: None = the hidden length in vllm_xargs; True = the true length as max_tokens."""
        return True if self.source.visible_lengths else None

    @property
    def emulator_args(self) -> tuple[str, ...]:
        return ("--max-model-len", str(self.source.max_model_len))

    def write_config(self, policy: str, path: Path) -> Path:
        import yaml

        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(self.source.config(policy).model_dump(mode="json"), sort_keys=False))
        return path

    async def specs(self, rate: float, engine_url: str) -> list[RequestSpec]:
        specs = self.source.specs(rate=rate)
        if self.engine == "vllm":
            specs = await fit_prompts(engine_url, specs)
        return specs

    async def start_vllm(self, out: Path):
        from . import vllm_cpu
        from .live import LiveError

        print("building/starting the vLLM CPU server (tiny model, StopAtLength logits processor) ...", flush=True)
        try:
            (out / "logs").mkdir(parents=True, exist_ok=True)
            model_dir = await asyncio.to_thread(vllm_cpu.build_tiny_model, out / "vllm-model")
            server = stop_at_length_vllm(model_dir, max_num_seqs=256, max_model_len=self.source.max_model_len,
                                      log_path=out / "logs" / "vllm.log")
            await asyncio.to_thread(server.start)
        except (RuntimeError, OSError) as exc:
            raise LiveError(f"could not start vLLM: {exc}") from exc
        return server, server.base_url


def _vllm_server_class():
    from .vllm_server import VLLMServer

    class _Server(VLLMServer):
        """vLLM with the StopAtLength logits processor; its package is put on the engine's path."""

        def __init__(self, *args, **kwargs):
            kwargs["extra_args"] = [*kwargs.get("extra_args", ()), "--logits-processors", LOGITS_PROCESSOR]
            super().__init__(*args, **kwargs)

        def environment(self):
            env = super().environment()
            env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
            return env

    return _Server


def stop_at_length_vllm(*args, **kwargs):
    """A `VLLMServer` (same arguments) that loads the StopAtLength logits processor."""
    return _vllm_server_class()(*args, **kwargs)


async def fit_prompts(engine_url: str, specs: list[RequestSpec]) -> list[RequestSpec]:
    """Each prompt re-made with exactly `prompt_tokens` tokens of the engine's tokenizer."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        model = (await (await session.get(engine_url + "/v1/models")).json())["data"][0]["id"]
        out = []
        for i, s in enumerate(specs):
            out.append(replace(s, prompt=await fit_prompt(session, engine_url, model, s.prompt_tokens, i)))
        return out


async def fit_prompt(session: aiohttp.ClientSession, url: str, model: str, n: int, salt: int) -> str:
    async def tok(text: str) -> list[int]:
        async with session.post(url + "/tokenize", json={"model": model, "prompt": text,
                                                          "add_special_tokens": False}) as r:
            r.raise_for_status()
            return (await r.json())["tokens"]

    async def detok(ids: list[int]) -> str:
        async with session.post(url + "/detokenize", json={"model": model, "tokens": ids}) as r:
            r.raise_for_status()
            return (await r.json())["prompt"]

    ids = await tok(synth_prompt(2 * n + 16, salt))
    k = n
    for _ in range(6):  # detokenize/retokenize can merge or split a token at the cut; adjust
        text = await detok(ids[:k])
        m = len(await tok(text))
        if m == n:
            return text
        k += n - m
    raise RuntimeError(f"could not fit a prompt of exactly {n} tokens (got {m})")


# The demo's second panel: a window of the shipped code trace at this multiple of the engine's
# capacity for the window's mix, output lengths hidden from the gate.
DEMO_TRACE_COUNT = 150
DEMO_TRACE_LOAD = 0.75


def best_static_for_trace(source: TraceSource, rate: float) -> str:
    """The static cap (10..100) with the best simulated goodput on this window, after the fact."""
    from .grid import RunKey
    from .policies import STATIC_CAPS
    from .trace_bench import run_trace_one

    scores = {f"static-{n}": run_trace_one(source, RunKey(source.label, rate, f"static-{n}", 0)).stats.goodput
              for n in STATIC_CAPS}
    return max(scores, key=lambda p: (scores[p], -int(p.split("-")[1])))


async def demo_trace_panel(out: Path, statics: list[str]) -> tuple[list[dict], dict, str]:
    """Run the demo's code-trace panel live on the emulator; returns its cells, sim goodputs, title."""
    from .grid import RunKey
    from .live import run_cells
    from .trace_bench import capacity_rps, run_trace_one

    source = TraceSource(count=DEMO_TRACE_COUNT)
    rate = round(DEMO_TRACE_LOAD * capacity_rps(source.specs()), 2)
    policies = [best_static_for_trace(source, rate) if s == "best" else s for s in statics]
    policies = list(dict.fromkeys([*policies, "saber"]))
    title = (f"code trace (synthetic, Azure format): {DEMO_TRACE_COUNT} requests at {rate:g} req/s "
             f"({DEMO_TRACE_LOAD:g}x capacity), lengths hidden")
    print(f"\nsaber demo, panel 2: {title}; {', '.join(policies)}", flush=True)
    cells = await run_cells(source.label, [rate], policies, 1, 0, out, trace=LiveTrace(source))
    sim = {(rate, p): run_trace_one(source, RunKey(source.label, rate, p, 0)).stats.goodput for p in policies}
    return cells, sim, title


def plot_demo(out: Path, panels: list[tuple[list[dict], dict, str]]) -> Path:
    """Goodput bars per panel (live, with the simulator's value hatched beside it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from .report import save_figure

    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.9), squeeze=False)
    for ax, (cells, sim, title) in zip(axes[0], panels):
        x = np.arange(len(cells))
        ax.bar(x - 0.2, [100 * c["goodput"] for c in cells], 0.4, label="live (emulator)",
               color=["tab:blue" if c["policy"] == "saber" else "grey" for c in cells])
        ax.bar(x + 0.2, [100 * sim.get((c["rate"], c["policy"]), float("nan")) for c in cells], 0.4, label="sim",
               color="none", edgecolor="black", hatch="//")
        ax.set_xticks(x, [c["policy"] for c in cells], fontsize=8)
        ax.set_ylim(0, 100)
        ax.set_ylabel("goodput (% meeting SLA)")
        ax.set_title(title, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    return save_figure(fig, out / "demo.png")
