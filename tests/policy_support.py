"""Helpers shared by the policy unit tests."""

from saber_sidecar.policy.base import Admit, Demote, Reject


def fmt(actions) -> str:
    """Actions as a short string, e.g. "admit:a be:b demote:c reject:d", for table-driven checks."""
    out = []
    for a in actions:
        if isinstance(a, Admit):
            out.append(f"{'be' if a.best_effort else 'admit'}:{a.request_id}")
        elif isinstance(a, Demote):
            out.append(f"demote:{a.request_id}")
        elif isinstance(a, Reject):
            out.append(f"reject:{a.request_id}")
    return " ".join(out)
