"""Holdout evaluation metrics: pure functions of per-sample outcomes (no model, no engine).

All from the same k samples per problem:

- avg@k: mean accuracy over all samples (= pass@1). The number to compare runs by.
- pass@j, j = 1..k: the unbiased estimator of Chen et al. 2021 (Codex), 1 - C(n-c, j)/C(n, j) per problem with n
  samples of which c are correct, computed as a product so no huge binomial is formed; averaged over problems.
- maj@k: majority vote over the extracted final answers. Samples without an answer do not vote. Answers the
  verifier marked correct are one vote cluster (they are all equivalent to the reference); other answers are
  grouped by their text with whitespace removed. Ties are counted fractionally: a problem whose top clusters
  tie scores the share of them that is correct (the expected score of a uniformly random tie-break), so the
  result does not depend on sample order.
- 95% intervals: percentile bootstrap over problems (seeded), for avg@k, pass@k and maj@k. On AIME (30
  problems) the interval is typically +-0.1 wide: differences smaller than that are noise. For adapters,
  delta_avg is the paired difference to the base model on the same problems, with a paired bootstrap interval.
- length_mean (completion tokens), truncated (share that hit max_tokens), no_answer (share with no extractable
  answer), timeouts / errors (verifier calls that hit the wall-clock limit or failed; they score 0).
- accuracy_given_answer: accuracy over the samples that gave an answer (None if none did). Beside avg@k it
  separates computing from answering in the asked format: a model that learns only the format raises avg@k and
  leaves this unchanged.
"""

from __future__ import annotations

BOOTSTRAP_RESAMPLES = 2000  # percentile-interval endpoints move < 0.005 between seeds at this count (AIME, k=16)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased P(at least one of k samples is correct), from n samples with c correct.

    1 - C(n-c, k) / C(n, k) = 1 - prod_{i=n-c+1}^{n} (1 - k/i)   (Chen et al. 2021, numerically stable form).
    """
    if not 1 <= k <= n or not 0 <= c <= n:
        raise ValueError(f"pass_at_k needs 1 <= k <= n and 0 <= c <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0  # every k-subset holds a correct sample
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def vote_key(answer: str | None) -> str | None:
    """The text an answer votes with: whitespace removed (so '\\frac{1}{2}' and '\\frac {1}{2}' agree)."""
    if answer is None:
        return None
    key = "".join(str(answer).split())
    return key or None


def majority_vote(answers_K: list[str | None], correct_K: list[float]) -> float:
    """maj@k of one problem: 1 if the most common answer is correct, with ties counted fractionally.

    Answers marked correct form one cluster (all are equivalent to the reference); other answers are grouped
    by `vote_key`. None (no extractable answer) does not vote; no votes at all scores 0. If m clusters tie
    for the most votes, the score is (correct clusters among them) / m.
    """
    if len(answers_K) != len(correct_K):
        raise ValueError("majority_vote: one correctness value per answer")
    keys = [vote_key(a) for a in answers_K]
    # A text verified correct once is correct (another sample with the same text may have timed out).
    correct_keys = {k for k, c in zip(keys, correct_K) if k is not None and c > 0}
    counts: dict[tuple[bool, str], int] = {}
    for key in keys:
        if key is None:
            continue
        cluster = (True, "") if key in correct_keys else (False, key)
        counts[cluster] = counts.get(cluster, 0) + 1
    if not counts:
        return 0.0
    top = max(counts.values())
    tied = [cluster for cluster, n in counts.items() if n == top]
    return sum(is_correct for is_correct, _ in tied) / len(tied)


def bootstrap_ci(values_P, *, seed: int, level: float = 0.95,
                 num_resamples: int = BOOTSTRAP_RESAMPLES) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-problem values (problems resampled with replacement)."""
    import numpy as np

    values = np.asarray(values_P, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError("bootstrap_ci needs a non-empty 1-D sequence of per-problem values")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(num_resamples, values.size))].mean(axis=1)
    alpha = (1.0 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def summarise(correct_PK: list[list[float]], answers_PK: list[list[str | None]], lengths_PK: list[list[int]],
              truncated_PK: list[list[bool]], *, timeouts: int = 0, errors: int = 0, seed: int = 0) -> dict:
    """Every metric of one (model, eval set) from per-sample outcomes. `correct` is 1.0/0.0 per sample."""
    num_problems = len(correct_PK)
    if num_problems == 0:
        raise ValueError("summarise: no problems")
    k = len(correct_PK[0])
    if k == 0 or any(len(row) != k for row in correct_PK):
        raise ValueError("summarise: every problem needs the same number (>= 1) of samples")
    num_correct_P = [sum(1 for c in row if c > 0) for row in correct_PK]
    acc_P = [c / k for c in num_correct_P]
    pass_PJ = [[pass_at_k(k, c, j) for j in range(1, k + 1)] for c in num_correct_P]
    maj_P = [majority_vote(a, c) for a, c in zip(answers_PK, correct_PK)]
    samples = num_problems * k
    answered = [c for row_c, row_a in zip(correct_PK, answers_PK) for c, a in zip(row_c, row_a) if a is not None]
    return {
        "problems": num_problems,
        "k": k,
        "avg_at_k": sum(acc_P) / num_problems,
        "avg_at_k_ci95": bootstrap_ci(acc_P, seed=seed),
        # pass_at_k[j - 1] = pass@j
        "pass_at_k": [sum(row[j] for row in pass_PJ) / num_problems for j in range(k)],
        "pass_at_k_ci95": bootstrap_ci([row[-1] for row in pass_PJ], seed=seed),
        "maj_at_k": sum(maj_P) / num_problems,
        "maj_at_k_ci95": bootstrap_ci(maj_P, seed=seed),
        "length_mean": sum(map(sum, lengths_PK)) / samples,
        "truncated": sum(map(sum, truncated_PK)) / samples,
        "no_answer": sum(a is None for row in answers_PK for a in row) / samples,
        "accuracy_given_answer": sum(1 for c in answered if c > 0) / len(answered) if answered else None,
        "timeouts": int(timeouts),
        "errors": int(errors),
        "correct_per_problem": num_correct_P,  # for paired comparisons between models
    }


def paired_delta(correct_a_P: list[int], correct_b_P: list[int], k: int, *, seed: int) -> tuple[float, tuple]:
    """avg@k of a minus that of b on the same problems, with a paired bootstrap 95% interval."""
    diff_P = [(a - b) / k for a, b in zip(correct_a_P, correct_b_P, strict=True)]
    return sum(diff_P) / len(diff_P), bootstrap_ci(diff_P, seed=seed)
