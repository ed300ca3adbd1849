"""The sidecar's configuration: SLA classes and scheduling policy.

This model is the contract between the operator (which renders it into a ConfigMap from a
SaberService), the sidecar (which loads and hot-reloads it) and the benchmark (which builds it
for each simulated policy). Keep it free of I/O other than `load_config`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

from saber_emulator.profile import LatencyProfile

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"

# The paper's fit on Qwen2.5-Coder-3B (SABER.md): v = 102.55 / (1 + 0.0300 L - 0.0001 L^2).
PAPER_USL_PARAMS = (102.55, 0.0300, -0.0001)

PolicyName = Literal["saber", "saber-paper", "static"]
CurveForm = Literal["usl", "logistic", "linear"]


class ConfigError(ValueError):
    """A configuration that cannot be used; the message says what to fix."""


class SLAClass(BaseModel):
    """One service-level class: what a request of this class is promised."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=DNS_LABEL, max_length=63, description="Class name, used in header x-saber-sla-class.")
    deadline_seconds: float = Field(
        gt=0, le=3600, description="End-to-end deadline: arrival at the sidecar to the last token."
    )
    ttft_seconds: float | None = Field(
        default=None, gt=0, le=3600, description="Optional time-to-first-token target."
    )
    tpot_seconds: float | None = Field(
        default=None, gt=0, le=60, description="Optional time-per-output-token target (seconds per token)."
    )
    output_tokens: int | None = Field(
        default=None,
        ge=1,
        le=1_000_000,
        description="Expected output length in tokens; when unset, the request's max_tokens is used.",
    )
    on_miss: Literal["demote", "reject"] = Field(
        default="demote",
        description="A request that cannot make its deadline is demoted to best effort, or rejected with 429.",
    )
    target_attainment: float = Field(
        default=0.95, ge=0, le=1, description="Share of requests that should meet the SLA (for status and alerts)."
    )
    model_aliases: list[str] = Field(
        default_factory=list, description="Model names that select this class (e.g. 'coder-fast')."
    )


class SpeedModelConfig(BaseModel):
    """The speed curve v(L) the gate starts from, and how it follows the engine online."""

    model_config = ConfigDict(extra="forbid")

    form: CurveForm = Field(default="usl", description="Curve form of the initial parameters.")
    params: list[float] = Field(
        default_factory=lambda: list(PAPER_USL_PARAMS),
        min_length=2,
        max_length=4,
        description="Initial parameters: usl (a, s, k); logistic (vmax, k, L0, vmin); linear (a, b).",
    )
    online_refit: bool = Field(default=True, description="Refit from finished requests on a recent window.")
    window: int = Field(default=512, ge=16, le=100_000, description="Finished requests kept for refitting.")
    min_samples: int = Field(default=32, ge=4, le=100_000, description="Samples needed before the first refit.")
    refit_every: int = Field(
        default=16, ge=1, le=100_000, description="Refit after this many new samples (fitting costs milliseconds)."
    )

    @model_validator(mode="after")
    def _params_match_form(self) -> SpeedModelConfig:
        import math

        if not all(math.isfinite(p) for p in self.params):
            raise ValueError("speed model params must be finite numbers (no NaN or infinity)")
        expected = {"usl": 3, "logistic": 4, "linear": 2}[self.form]
        if len(self.params) != expected:
            raise ValueError(f"speed model form {self.form!r} takes {expected} params, got {len(self.params)}")
        if self.min_samples > self.window:
            raise ValueError("speedModel.min_samples must not exceed speedModel.window")
        return self


class PaperSchedulingConfig(BaseModel):
    """Parameters of the paper's Algorithm 1 (saber-paper); the defaults are the paper's."""

    model_config = ConfigDict(extra="forbid")

    tick_seconds: float = Field(default=0.1, gt=0, le=10, description="Dispatcher loop period.")
    pick_window: int = Field(default=20, ge=1, le=10_000, description="Random pick among the first N HPQ entries.")
    sweep_every: int = Field(default=10, ge=1, le=10_000, description="Demote expired HPQ entries every N cycles.")


# The prefill cost the built-in prior assumes (seconds of engine time per prompt token): ~20k prompt
# tokens/s, a 3B fp16 model on one datacenter GPU. Not a setting: an engine that differs is measured
# (`saber calibrate`, then `scheduling.engine_profile`), and the gate learns it online either way.
DEFAULT_PREFILL_SECONDS_PER_TOKEN = 5e-5

# Settings saber's policy once had that are internal constants now (saber_sidecar/policy/saber_tuning.py),
# each with what a config that still sets one should do instead.
REMOVED_SABER_SETTINGS = {
    "speed_headroom": "",
    "lookahead": "",
    "output_window": "",
    "output_min_samples": "",
    "initial_ttft_seconds": " (the gate measures it from the first requests)",
    "initial_prefill_seconds_per_token": " (give the engine's measured prefill cost as scheduling.engine_profile, "
    "the file `saber calibrate` writes; the gate also learns it online)",
    "slack_reserve_share": "",
    "min_recheck_seconds": "",
    "at_risk_slack_share": "",
    "light_load": "",
    "load_window_seconds": "",
}


class SaberSchedulingConfig(BaseModel):
    """The settings of saber's own event-driven policy: the few with a clear trade a user may want to
    move. Everything else it uses is an internal constant (saber_sidecar/policy/saber_tuning.py)."""

    model_config = ConfigDict(extra="forbid")

    deadline_margin_seconds: float = Field(
        default=0.02,
        ge=0,
        le=60,
        description="Plan to finish this long before each deadline. Raising it covers latency the gate does "
        "not see (network to the client, a slow relay) and model error; it costs throughput, since every "
        "request is planned against a shorter deadline.",
    )
    best_effort_reserve: int = Field(
        default=1,
        ge=0,
        le=1024,
        description="Batch slots best-effort (demoted) admission keeps free for fresh SLA arrivals. Raising "
        "it lets bursts of SLA requests in at once; it costs best-effort throughput.",
    )
    best_effort_max_wait_slas: float = Field(
        default=1.0,
        ge=0,
        le=1000,
        description="The bound on how long a demoted request waits for best effort: it is rejected (429 with "
        "Retry-After) at the latest this many of its SLAs after arrival, and at once when the best-effort "
        "queue is not predicted to drain within that time (or has not moved for a quarter of it), so a "
        "request that will not be served hears so fast and demotion never becomes starvation. Raising it "
        "serves more demoted requests late; it costs clients a longer wait before a 429. 0: no bound.",
    )
    output_quantile: float = Field(
        default=0.9,
        gt=0,
        le=1,
        description="Quantile of a class's recent output lengths used as its expected length (for classes "
        "that state none, once it has learned some). Raising it plans for longer outputs: fewer requests "
        "run past their plan and miss, at the cost of a smaller batch and more shedding.",
    )
    kv_cache_high: float = Field(
        default=0.95,
        gt=0,
        le=1,
        description="Engine KV-cache usage above which best effort is held back. Lowering it keeps the cache "
        "clear of preemptions for SLA requests; it costs best-effort throughput.",
    )
    shed_batch_fraction: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="Under contention, shed (demote or reject) a queued request that needs a batch smaller "
        "than this share of the requests contending (capped by the batch fresh requests fit in): admitted "
        "late, it would throttle the engine for everyone. Raising it sheds sooner and keeps the batch large; "
        "it costs late requests their chance. 0 sheds only the hopeless.",
    )

    @model_validator(mode="before")
    @classmethod
    def _no_removed_settings(cls, data: Any) -> Any:
        if isinstance(data, dict):
            removed = [k for k in data if k in REMOVED_SABER_SETTINGS]
            if removed:
                raise ValueError(
                    "; ".join(f"{k} ({to_camel(k)} in a SaberService) is no longer a setting: it is an internal "
                              f"constant now, remove it from the config{REMOVED_SABER_SETTINGS[k]}" for k in removed)
                )
        return data


class SchedulingConfig(BaseModel):
    """Which admission policy runs, and its parameters."""

    model_config = ConfigDict(extra="forbid")

    policy: PolicyName = Field(default="saber", description="saber (ours), saber-paper (Algorithm 1), or static.")
    static_max_concurrency: int = Field(
        default=32, ge=1, le=4096, description="Concurrency cap for the static policy."
    )
    max_queue: int = Field(default=1024, ge=1, le=1_000_000, description="Queued requests before 429.")
    engine_priority: bool = Field(
        default=False,
        description="The engine runs vLLM's priority scheduling: send best-effort requests with lower priority.",
    )
    engine_max_num_seqs: int | None = Field(
        default=None,
        ge=1,
        le=65_536,
        description="The engine's own cap on running sequences (vLLM --max-num-seqs): requests past it wait "
        "inside the engine, so the gate never plans on more running than this. The operator sets it from "
        "spec.engine.maxNumSeqs; unset, the gate relies on the engine's running/waiting metrics.",
    )
    engine_profile: LatencyProfile | None = Field(
        default=None,
        description="A measured engine profile (the file `saber calibrate` writes) used as the gate's prior "
        "instead of the built-in paper curve; online learning goes on from it.",
    )
    speed_model: SpeedModelConfig = Field(default_factory=SpeedModelConfig)
    paper: PaperSchedulingConfig = Field(default_factory=PaperSchedulingConfig)
    saber: SaberSchedulingConfig = Field(default_factory=SaberSchedulingConfig)


class SidecarConfig(BaseModel):
    """Everything the sidecar's decisions depend on; hot-reloadable."""

    model_config = ConfigDict(extra="forbid")

    classes: list[SLAClass] = Field(min_length=1, description="SLA classes, at least one.")
    default_class: str = Field(description="Class for requests that name none.")
    scheduling: SchedulingConfig = Field(default_factory=SchedulingConfig)

    @model_validator(mode="after")
    def _consistent(self) -> SidecarConfig:
        names = [c.name for c in self.classes]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate SLA class names: {', '.join(dupes)}")
        if self.default_class not in names:
            raise ValueError(f"default_class {self.default_class!r} is not one of the classes: {', '.join(names)}")
        aliases = [a for c in self.classes for a in c.model_aliases]
        dupes = sorted({a for a in aliases if aliases.count(a) > 1})
        if dupes:
            raise ValueError(f"model alias used by more than one class: {', '.join(dupes)}")
        return self

    def get_class(self, name: str) -> SLAClass | None:
        return next((c for c in self.classes if c.name == name), None)

    def class_for_model(self, model: str) -> SLAClass | None:
        return next((c for c in self.classes if model in c.model_aliases), None)


def parse_config(text: str, source: str = "<config>") -> SidecarConfig:
    """Parse YAML text into a config, or raise ConfigError with a message a user can act on."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with 'classes' and 'default_class'")
    try:
        return SidecarConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"{source}: {problems}") from exc


def load_config(path: str | Path) -> SidecarConfig:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    return parse_config(text, str(path))


def paper_config(policy: PolicyName = "saber", **scheduling: Any) -> SidecarConfig:
    """The paper's four code tasks as SLA classes (SABER.md table)."""
    classes = [
        SLAClass(name="qna", deadline_seconds=1.0, output_tokens=51),
        SLAClass(name="summary", deadline_seconds=1.0, output_tokens=48),
        SLAClass(name="generation", deadline_seconds=8.0, output_tokens=387),
        SLAClass(name="translation", deadline_seconds=12.0, output_tokens=617),
    ]
    return SidecarConfig(
        classes=classes,
        default_class="generation",
        scheduling=SchedulingConfig(policy=policy, **scheduling),
    )
