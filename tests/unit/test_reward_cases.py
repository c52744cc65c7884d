"""The labelled case set (tests/reward_cases.py) through reward.score, in-process."""

from __future__ import annotations

import time

import pytest
from reward_cases import CASES, CATEGORIES, by_category

from reward import score

# Correct answers we refuse by design (size / depth limits): they must score 0 quickly, not crash or hang.
BY_DESIGN = {
    "correct, but over our 1000-character limit",
    "deep braces: 1, but beyond our depth limit",
}


def _id(c):
    return f"{c.category}:{c.response[:40]}|{c.gold[:20]}"


@pytest.mark.parametrize("case", [c for c in CASES if c.note not in BY_DESIGN], ids=_id)
def test_case(case):
    assert score(case.response, case.gold) == (1.0 if case.label else 0.0), case.note


@pytest.mark.parametrize("case", [c for c in CASES if c.note in BY_DESIGN], ids=_id)
def test_refused_by_design(case):
    t0 = time.perf_counter()
    assert score(case.response, case.gold) == 0.0
    assert time.perf_counter() - t0 < 1.0


def test_case_set_shape():
    cats = by_category()
    assert len(CASES) >= 200
    for required in ("boxed", "gsm8k", "answer_phrase", "truncated", "multiple_choice", "fallback", "latex_cleanup",
                     "rational", "leading_zeros", "symbolic", "sets_intervals", "lists", "matrices", "complex",
                     "text", "gold_format", "hostile"):
        assert required in CATEGORIES
        labels = {c.label for c in cats[required]}
        assert labels == {True, False} or required == "hostile", f"{required} needs positive and negative cases"
    assert len(cats["hostile"]) >= 20


def test_latency_in_process():
    """Every case, hostile ones included, well under the wall-clock limit; p99 under 100 ms."""
    times = []
    for c in CASES:
        t0 = time.perf_counter()
        score(c.response, c.gold)
        times.append(time.perf_counter() - t0)
    times.sort()
    assert times[-1] < 2.0, f"slowest case took {times[-1]:.2f}s"
    assert times[int(0.99 * (len(times) - 1))] < 0.1
