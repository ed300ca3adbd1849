"""Policy names of the benchmark, and the sidecar config and request builder each one runs with.

`static-N` is the `static` policy with cap N in front of an engine whose own cap is large: the
same thing as vLLM with `max_num_seqs=N` and FIFO waiting, which is what users have today.
`saber-oracle` is a reference, not a policy one can deploy: `saber` told each request's true
output length, which it plans with for the whole run instead of the class's learned estimate.
"""

from __future__ import annotations

import re

from saber_sidecar.config import SchedulingConfig, SidecarConfig, SLAClass
from saber_sidecar.policy.base import Policy, Request

from .workloads import RequestSpec, Task, classes_of

STATIC_CAPS = tuple(range(10, 101, 10))
PAPER_POLICIES = (*(f"static-{n}" for n in STATIC_CAPS), "saber-paper", "saber")
REFERENCES = ("saber-oracle",)
# Not a policy: a computed upper limit (see bound.py); it appears in results beside the policies.
BOUND = "capacity-bound"

_STATIC = re.compile(r"^static-(\d+)$")


def check_policy(name: str) -> None:
    if name in ("saber", "saber-paper", *REFERENCES):
        return
    m = _STATIC.match(name)
    if m and 1 <= int(m.group(1)) <= 4096:
        return
    raise ValueError(f"unknown policy {name!r}: use static-N (1..4096), saber-paper, saber or saber-oracle")


def sidecar_config(policy: str, classes: dict[str, Task]) -> SidecarConfig:
    """The sidecar config a policy runs with, for a workload's SLA classes."""
    check_policy(policy)
    m = _STATIC.match(policy)
    scheduling = (
        SchedulingConfig(policy="static", static_max_concurrency=int(m.group(1)))
        if m
        else SchedulingConfig(policy="saber-paper" if policy == "saber-paper" else "saber")
    )
    slas = [
        # The paper's tasks always generate max_tokens, so the class states it; humaneval's
        # class states nothing (output lengths vary) and saber has to learn it.
        SLAClass(name=t.name, deadline_seconds=t.sla_s, output_tokens=t.max_tokens if t.fixed_output else None)
        for t in classes.values()
    ]
    return SidecarConfig(classes=slas, default_class=slas[0].name, scheduling=scheduling)


def config_for_workload(policy: str, workload: str) -> SidecarConfig:
    return sidecar_config(policy, classes_of(workload))


def build_policy(policy: str, config: SidecarConfig, seed: int) -> Policy:
    from saber_sidecar.policy import make_policy

    return make_policy(config, seed)


def request_builder(policy: str, config: SidecarConfig):
    """How the driver turns a RequestSpec into the policy's Request at its arrival time `now`.

    The sidecar's own `request_for` (class deadline, class estimate or max_tokens as the expected
    length); `saber-oracle` is then told the true output length.
    """
    from saber_sidecar.policy import request_for

    oracle = policy == "saber-oracle"

    def build(spec: RequestSpec, now: float) -> Request:
        req = request_for(config, spec.sla_class, spec.id, now, spec.max_tokens, spec.prompt_tokens)
        if oracle:
            req.expected_tokens, req.exact_length = spec.output_tokens, True
        return req

    return build
