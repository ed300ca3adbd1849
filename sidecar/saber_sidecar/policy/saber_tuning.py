"""saber's internal constants: what the policy's parts are tuned with, beyond the user's settings.

These were settings once. None trades anything a user can judge from outside the gate (each is a
detail of the plan's arithmetic or its estimates), the defaults were tuned on the benchmark
(docs/BENCHMARKS.md), and a config that still sets one is refused with a message saying so
(`REMOVED_SABER_SETTINGS` in config.py). They are gathered in one frozen object, not scattered
module constants, so a test or a benchmark can vary one (`SaberPolicy(config, tuning=...)`)
without a config field; each part of the policy copies the ones it uses when it is built.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Tuning:
    # Predicted speed must exceed the needed speed by this fraction: the plan's allowance for the
    # engine running slower than the model says between refits.
    speed_headroom: float = 0.02
    # Queued requests tried past an EDF head that needs a lighter batch: enough that one demanding
    # request does not block the others, few enough to keep a decision's work bounded.
    lookahead: int = 8
    # Recent output lengths kept per class, and how many must have finished before the class's
    # estimate replaces its stated (or max_tokens) length.
    output_window: int = 256
    output_min_samples: int = 8
    # Admission to first token, assumed until measured (an exponential average of what is seen).
    initial_ttft_seconds: float = 0.05
    # An admission must leave every running request this share of the candidate's own time to
    # deadline as slack, so long requests leave room for short, urgent ones.
    slack_reserve_share: float = 0.01
    # Shortest interval between prediction-driven re-checks (a decision that stopped at its work bound
    # goes on this much later).
    min_recheck_seconds: float = 0.005
    # A running request predicted to finish with less slack than this share of its remaining time is
    # within the model's error of missing anyway: a shorter candidate may overtake it. Under light
    # load, a candidate admitted with less slack than this is not protected (it would block admissions).
    at_risk_slack_share: float = 0.05
    # Offered load (expected tokens per second arriving, over the most the engine delivers within the
    # batch a fresh request fits in) below which the gate is lenient (see the two above); 0 never.
    light_load: float = 0.9
    # Time constant of the offered-load and best-effort admission-rate estimates.
    load_window_seconds: float = 10.0


DEFAULT_TUNING = Tuning()
