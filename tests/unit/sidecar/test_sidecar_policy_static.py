import pytest

from saber_sidecar.config import SidecarConfig
from saber_sidecar.policy import Admit, Reject, make_policy, request_for
from saber_sidecar.policy.static import StaticPolicy


def config(cap=2, max_queue=3):
    return SidecarConfig.model_validate(
        {
            "classes": [{"name": "c", "deadline_seconds": 5}],
            "default_class": "c",
            "scheduling": {"policy": "static", "static_max_concurrency": cap, "max_queue": max_queue},
        }
    )


def run(script, cap=2, max_queue=3):
    """Play (op, id, t) steps; return the actions of each step as short strings."""
    cfg = config(cap, max_queue)
    pol = make_policy(cfg)
    assert isinstance(pol, StaticPolicy)
    seen = []
    for op, rid, t in script:
        if op == "submit":
            acts = pol.submit(request_for(cfg, "c", rid, t, 10), t)
        elif op == "finish":
            acts = pol.finished(rid, t, 10, None)
        elif op == "cancel":
            acts = pol.cancel(rid, t)
        seen.append(
            " ".join(f"admit:{a.request_id}" if isinstance(a, Admit) else f"reject:{a.request_id}" for a in acts)
        )
    return seen, pol


@pytest.mark.parametrize(
    "script, expected",
    [
        # Under the cap: admitted at once.
        ([("submit", "a", 0), ("submit", "b", 0)], ["admit:a", "admit:b"]),
        # At the cap: queued, then admitted FIFO as capacity frees up.
        (
            [("submit", "a", 0), ("submit", "b", 0), ("submit", "c", 1), ("submit", "d", 2), ("finish", "a", 3),
             ("finish", "b", 4)],
            ["admit:a", "admit:b", "", "", "admit:c", "admit:d"],
        ),
        # Queue overflow is the only rejection.
        (
            [("submit", "a", 0), ("submit", "b", 0), ("submit", "c", 0), ("submit", "d", 0), ("submit", "e", 0),
             ("submit", "f", 0)],
            ["admit:a", "admit:b", "", "", "", "reject:f"],
        ),
        # A cancelled queued request is skipped.
        (
            [("submit", "a", 0), ("submit", "b", 0), ("submit", "c", 0), ("submit", "d", 0), ("cancel", "c", 1),
             ("finish", "a", 2)],
            ["admit:a", "admit:b", "", "", "", "admit:d"],
        ),
        # Nothing waits behind an idle slot: a queue never forms while under the cap.
        ([("submit", "a", 0), ("finish", "a", 1), ("submit", "b", 2)], ["admit:a", "", "admit:b"]),
    ],
)
def test_static_decisions(script, expected):
    seen, _ = run(script)
    assert seen == expected


def test_static_stats_and_no_timers():
    _, pol = run([("submit", "a", 0), ("submit", "b", 0), ("submit", "c", 0)])
    st = pol.stats()
    assert (st.running, st.queued_sla, st.admission_limit) == (2, 1, 2)
    assert pol.next_wake() is None and pol.wake(10.0) == []


def test_static_rejects_duplicate_ids():
    cfg = config()
    pol = make_policy(cfg)
    pol.submit(request_for(cfg, "c", "a", 0, 10), 0)
    with pytest.raises(ValueError, match="already known"):
        pol.submit(request_for(cfg, "c", "a", 0, 10), 0)


def test_queue_full_rejection_has_retry_after():
    seen, pol = run([("submit", x, 0) for x in "abcdef"])
    acts = pol.submit(request_for(config(), "c", "g", 0, 10), 0)
    assert isinstance(acts[0], Reject) and acts[0].retry_after_s > 0 and "queue full" in acts[0].reason
