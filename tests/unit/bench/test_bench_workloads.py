import numpy as np
import pytest

from saber_bench.workloads import (
    HUMANEVAL_TASK,
    MIXES,
    PAPER_TASKS,
    code_tokens,
    make_workload,
    mix_classes,
    rng_for,
    uniform_arrivals,
)


def test_paper_run_has_100_requests_over_100_over_rate_seconds():
    for rate in (1, 7, 20):
        specs = make_workload("W3", rate, seed=0)
        arrivals = [s.arrival for s in specs]
        assert len(specs) == 100
        assert arrivals == sorted(arrivals)
        assert 0 <= arrivals[0] and arrivals[-1] <= 100 / rate


def test_same_seed_same_arrivals_other_seed_differs():
    a = make_workload("W1", 5, seed=1)
    b = make_workload("W1", 5, seed=1)
    c = make_workload("W1", 5, seed=2)
    assert [(s.arrival, s.sla_class) for s in a] == [(s.arrival, s.sla_class) for s in b]
    assert [s.arrival for s in a] != [s.arrival for s in c]


@pytest.mark.parametrize("name", sorted(MIXES))
def test_mix_shares_are_exact(name):
    specs = make_workload(name, 10, seed=0)
    for cls, share in MIXES[name].items():
        assert sum(s.sla_class == cls for s in specs) == round(100 * share)


def test_paper_tasks_have_stated_sizes_budgets_and_slas():
    specs = make_workload("W3", 10, seed=0)
    for s in specs:
        task = PAPER_TASKS[s.sla_class]
        assert len(s.prompt) == task.prompt_chars
        assert s.max_tokens == s.output_tokens == task.max_tokens
        assert s.sla_s == task.sla_s
        assert s.deadline == pytest.approx(s.arrival + task.sla_s)
    sizes = {(t.name, t.max_tokens, t.sla_s) for t in PAPER_TASKS.values()}
    assert sizes == {("qna", 51, 1.0), ("summary", 48, 1.0), ("generation", 387, 8.0), ("translation", 617, 12.0)}


def test_mix_classes_rounds_by_largest_remainder():
    classes = mix_classes({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}, 10, np.random.default_rng(0))
    counts = sorted(classes.count(k) for k in "abc")
    assert counts == [3, 3, 4]


def test_uniform_arrivals_rejects_bad_rate():
    with pytest.raises(ValueError):
        uniform_arrivals(10, 0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="unknown workload"):
        make_workload("W9", 1, 0)


def test_humaneval_uses_real_prompts_and_solution_lengths():
    specs = make_workload("humaneval", 5, seed=0)
    assert len(specs) == 100
    assert all("def " in s.prompt for s in specs)
    lengths = [s.output_tokens for s in specs]
    assert all(1 <= n <= HUMANEVAL_TASK.max_tokens for n in lengths)
    # Canonical solutions are much shorter than the budget: that is what an estimate can exploit.
    assert np.median(lengths) < HUMANEVAL_TASK.max_tokens / 3


def test_code_tokens_counts_words_punctuation_and_lines():
    assert code_tokens("return a + b\n") == 5  # return, a, +, b, newline


def test_shapes_have_their_mean_rate():
    rate = 4.0
    for name, duration in (("bursty", 60.0), ("ramp", 60.0), ("steady", 600.0)):
        counts = [len(make_workload(name, rate, seed)) for seed in range(3)]
        mean_rate = np.mean(counts) / duration
        expected = rate if name != "ramp" else 1.05 * rate  # ramp: rate/10 -> 2 x rate
        assert mean_rate == pytest.approx(expected, rel=0.2), name


def test_bursty_has_silences():
    specs = make_workload("bursty", 4.0, seed=0)
    phases = {int(s.arrival % 10.0 // 2.5) for s in specs}
    assert phases == {0}  # every arrival falls in the on-phase of its period


def test_rng_is_independent_of_python_hash_seed():
    assert rng_for("W1", 5, 0).integers(1 << 30) == rng_for("W1", 5.0, 0).integers(1 << 30)
