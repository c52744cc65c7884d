"""The math-answer verifier: extract the final answer from a response and compare it with the reference.

    score(response, answer) -> 1.0 if the response's final answer is equivalent to `answer`, else 0.0

`answer` may be raw ("25", "\\frac{1}{2}"), contain a \\boxed{}, or be a GSM8K solution ending in "#### 25".
Never raises on bad input (anything unparseable scores 0.0). Safe on hostile strings: no Python evaluation
anywhere, size and depth limits (see reward/parse.py). Run it under a wall-clock limit all the same
(RewardRunner does).
"""

from __future__ import annotations

import logging

from reward.extraction import extract, extract_gold
from reward.grade import equivalent
from reward.parse import MAX_CHARS

log = logging.getLogger(__name__)

__all__ = ["extract", "extract_gold", "equivalent", "score", "is_correct"]


def is_correct(response: str, answer) -> bool:
    pred = extract(response)
    if pred is None or len(pred) > MAX_CHARS:
        return False
    gold = extract_gold(answer)
    if gold is None or len(gold) > MAX_CHARS:
        return False
    try:
        return equivalent(pred, gold)
    except RecursionError:
        return False
    except Exception as exc:  # a grader bug must not crash a training run; it scores 0
        log.debug("math_answer: %s: %s", type(exc).__name__, exc)
        return False


def score(response: str, answer) -> float:
    """1.0 if the final answer in `response` is equivalent to the reference `answer`, else 0.0."""
    return 1.0 if is_correct(response, answer) else 0.0


_WARMUP = [
    (r"\boxed{\frac{1}{2}}", "0.5"), (r"\boxed{(x+1)^2}", "x^2+2x+1"), (r"\boxed{x^{2}+\frac{1}{x^{2}}}", "x^2+x^{-2}"),
    (r"\boxed{\sin 30^\circ}", r"\frac12"), (r"\boxed{[0, \infty)}", r"x \ge 0"), (r"\boxed{\pm 2}", "2, -2"),
    (r"\boxed{\begin{pmatrix}1\\2\end{pmatrix}}", "(1,2)"), ("The answer is (B).", "B"), (r"\boxed{3+4i}", "|3+4i|"),
    (r"\boxed{\text{Monday}}", "monday"), ("#### 1,000", "1000"),
]


def warmup() -> None:
    """Exercise the main code paths once (sympy lazily imports and caches a lot on first use)."""
    for response, answer in _WARMUP:
        score(response, answer)
