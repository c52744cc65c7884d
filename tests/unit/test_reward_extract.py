"""Answer extraction (reward.extraction) and the equivalence rules, category by category."""

from __future__ import annotations

import pytest

from reward import extract, score
from reward.extraction import extract_gold
from reward.grade import equivalent


@pytest.mark.parametrize("response, expected", [
    (r"so $\boxed{42}$.", "42"),
    (r"\boxed{\frac{1}{2}} and later \boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt{3}}{2}"),
    (r"\boxed{a_{\{1\}}}", r"a_{\{1\}}"),                          # escaped braces do not count
    (r"\fbox{x+1}", "x+1"),
    (r"\boxed 7 is it", "7"),
    (r"$\boxed{2}$ and $\boxed{3}$", "2, 3"),
    (r"\boxed{2} is wrong, so I reconsider: \boxed{3", None),       # truncated last box
    (r"\boxed{}", None),
    ("He has 16 eggs.\n#### 16", "16"),
    ("#### 1,000", "1,000"),
    ("The final answer is $\\frac{3}{5}$.", "\\frac{3}{5}"),
    ("The answer is 12 because 3 * 4 = 12.", "12"),
    ("Answer: (C)", "(C)"),
    ("**Final Answer**\n\n128", "128"),
    ("The answer is", None),
    ("17", "17"),
    ("$x = 3$", "x = 3"),
    ("Therefore, the total is $14$.", "14"),
    ("So she has 14 apples left.", "14"),
    ("First 3 + 4 = 7, then 7 * 2 = 14 and then", None),
    ("Let me think about this step by step", None),
    ("", None),
    (None, None),
])
def test_extract(response, expected):
    assert extract(response) == expected


@pytest.mark.parametrize("gold, expected", [
    ("25", "25"),
    (r"\frac{1}{2}", r"\frac{1}{2}"),
    (r"The answer is $\boxed{7}$.", "7"),
    ("Janet sells 16 - 3 - 4 = 9 eggs.\n#### 18", "18"),
    (42, "42"),
    (None, None),
])
def test_extract_gold(gold, expected):
    assert extract_gold(gold) == expected


@pytest.mark.parametrize("pred, gold", [
    # numbers, exactly
    ("0.5", r"\frac{1}{2}"), (r"\frac{2}{4}", "0.5"), ("025", "25"), ("1,000", "1000"), ("3.0", "3"),
    (r"0.\overline{6}", r"\frac23"), (r"2\frac{1}{3}", r"\frac{7}{3}"), ("50\\%", "50"), ("50\\%", "0.5"),
    # clean-up
    (r"\left(1, 2\right)", "(1,2)"), (r"\dfrac{1}{3}", r"\tfrac13"), (r"10\text{ m}", "10"), (r"90^\circ", "90"),
    (r"\displaystyle 4", "4"), (r"5\,\mathrm{kg}", "5"), (r"1\!000", "1000"),
    # symbolic
    ("(x+1)^2", "x^2+2x+1"), (r"\sqrt{12}", r"2\sqrt{3}"), (r"\pi/2", r"\frac{\pi}{2}"), ("x=5", "5"),
    (r"e^{\ln 2}", "2"), (r"\sin\frac{\pi}{6}", "0.5"), (r"\frac{a}{b} + \frac{c}{b}", r"\frac{a+c}{b}"),
    (r"\sin 30^\circ", r"\frac12"),
    # structures
    (r"\{3, 1\}", r"\{1, 3\}"), ("3, 1", "1, 3"), ("(1, 2)", r"\left(1,2\right)"), (r"[0, 1)", r"0 \le x < 1"),
    (r"(-\infty, 0) \cup (1, \infty)", r"(-\infty,0)\cup(1,\infty)"), (r"\pm 3", "3, -3"),
    (r"\begin{pmatrix}1\\2\end{pmatrix}", r"\begin{bmatrix}1\\2\end{bmatrix}"),
    ("2+i", "i+2"), (r"\text{Blue}", "blue"),
])
def test_equivalent(pred, gold):
    assert equivalent(pred, gold)


@pytest.mark.parametrize("pred, gold", [
    ("0.333", r"\frac13"), ("0.33", r"\frac13"), ("3.14", r"\pi"), ("250", "025"), ("(2, 1)", "(1, 2)"),
    ("[1, 2]", "(1, 2)"), ("(1, 2]", "(1, 2)"), (r"\{1, 2\}", r"\{1, 2, 3\}"), ("2", "2, -2"), ("x^2-1", "(x-1)^2"),
    ("y", "x"), ("3-4i", "3+4i"), (r"\text{odd}", r"\text{even}"), ("x > 3", r"[3, \infty)"),
    (r"\begin{pmatrix}1&2\\3&4\end{pmatrix}", r"\begin{pmatrix}1&3\\2&4\end{pmatrix}"), ("1/0", "2/0"), ("", "0"),
])
def test_not_equivalent(pred, gold):
    assert not equivalent(pred, gold)


def test_score_type_and_bad_input():
    assert score(r"\boxed{4}", "4") == 1.0
    assert isinstance(score(r"\boxed{4}", "5"), float)
    assert score(None, "4") == 0.0
    assert score(r"\boxed{4}", None) == 0.0
    assert score(r"\boxed{4}", 4) == 1.0          # a numeric reference is fine
    assert score(r"\boxed{4}", "") == 0.0


def test_multiple_choice():
    assert score(r"\boxed{\text{(B)}}", "B") == 1.0
    assert score("The answer is (B).", "B") == 1.0
    assert score("The answer is (B).", "C") == 0.0
    assert score(r"\boxed{\textbf{(A) }12}", "A") == 1.0


def test_boxes_scans_every_box_with_nested_braces():
    from reward.extraction import Box, boxes

    text = r"first \boxed{\frac{1}{2}}, then \fbox 7 and \boxed{x} but \boxed{3"
    assert list(boxes(text)) == [
        Box("boxed", 6, 25, r"\frac{1}{2}", True), Box("fbox", 32, 39, "7", False),
        Box("boxed", 44, 53, "x", True), Box("boxed", 58, len(text), None, True)]  # the last one never closes
    assert list(boxes("no box here")) == []


@pytest.mark.parametrize("completion, expected", [
    (r"so \boxed{42}", 1.0), (r"\boxed{ }", 0.0), (r"\boxed{}", 0.0), (r"\fbox{42}", 0.0), (r"\boxed 42", 0.0),
    (r"\boxed{4} then \boxed{5", 1.0), (r"\boxed{5", 0.0), (r"\boxed {\{\}}", 1.0), (None, 0.0)])
def test_boxed_format_wants_a_complete_nonempty_braced_box(completion, expected):
    from reward.registry import boxed_format

    assert boxed_format("", completion) == expected
