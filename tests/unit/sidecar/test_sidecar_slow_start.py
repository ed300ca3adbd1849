"""The slow-start cap on running grows from what the engine's own step counters show.

Until the gate has confirmed its engine model, it plans for at most 8 running, then 2x the largest
batch the engine has been seen at. A slow engine's first completed requests take tens of seconds;
its step counters (scraped every half second) show it running a batch well before that.
"""

import math

import pytest

from saber_sidecar.policy.base import EngineSnapshot, Request
from saber_sidecar.policy.engine_model import EngineModel
from saber_sidecar.policy.saber_batch import Batch
from saber_sidecar.policy.saber_engine import SLOW_START_MIN, EngineView

STEP = 0.035  # the model's step time (s), at every batch


def _view_running(n):
    batch = Batch()
    view = EngineView(EngineModel((STEP, 0.0, 0.0), 5e-5), batch, None, 0.05)
    batch.advance(0.0, view.model, view.seats)
    for i in range(n):
        batch.add(Request(f"r{i}", "c", 0.0, 600.0, 1000, 1000), 1000, 0.0, math.inf, 0.0, view)
    view.observe_counters(EngineSnapshot(running=n, waiting=0, steps=0, prompt_tokens=0, generation_tokens=0), 0.0, n)
    return batch, view


def _scrape(view, n, now, slower):
    """An interval in which the engine ran `n` decoding at `slower` x the model's step."""
    steps = now / (STEP * slower)
    snap = EngineSnapshot(running=n, waiting=0, steps=steps, prompt_tokens=0, generation_tokens=n * steps)
    return view.observe_counters(snap, now, n)


def test_a_busy_interval_the_model_predicted_grows_the_cap():
    batch, view = _view_running(8)
    assert view.cap == SLOW_START_MIN
    # 15% slower than predicted: within the slow-start bound, not close enough to lift the cap
    # on one observation. No request has completed yet.
    _, cap_changed = _scrape(view, 8, 2.5, 1.15)
    assert cap_changed
    assert view.cap == 16  # 2x the batch the engine ran
    assert view.confirmed == 1 and view.streak == 1


def test_a_busy_interval_the_model_got_wrong_grows_nothing():
    batch, view = _view_running(8)
    # The paper's prior on an engine 3.3x slower: the model is wrong at this batch.
    _scrape(view, 8, 2.5, 3.3)
    assert view.cap == SLOW_START_MIN
    assert view.batch_seen == 0.0
    assert view.model_error == pytest.approx(math.log(3.3), rel=1e-6)
