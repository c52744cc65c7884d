"""Group rewards: scored over one prompt's G completions together.

`group_length_correctness` (built-in name "group_length_correctness") is correctness, with the shorter correct
completions of a group preferred:

    r_i = 0                                                           if completion i is wrong
    r_i = 1 - alpha * (len_i - min_len) / (max_len - min_len)         if it is right

where min_len / max_len are over the group's *correct* completions (lengths in characters). A group whose
correct completions are all equally long (or has one) gets 1.0 for each of them. With alpha < 1, every right
answer still beats every wrong one, so the length term only orders the right answers. It is a group reward
because the normalisation needs the other completions of the same prompt: a per-completion length penalty
cannot tell "long for this problem" from "long".
"""

from __future__ import annotations

from reward.registry import group


@group
def group_length_correctness(prompt: str, completions: list[str], answer=None, alpha: float = 0.5,
                             **_) -> list[float]:
    if answer is None:
        raise ValueError("group_length_correctness needs the example field 'answer'")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"group_length_correctness: alpha must be in [0, 1], got {alpha!r}")
    from reward.math_answer import score

    correct = [score(c, answer) > 0 for c in completions]
    lengths = [len(c) for c, ok in zip(completions, correct) if ok]
    if not lengths:
        return [0.0] * len(completions)
    lo, hi = min(lengths), max(lengths)
    span = hi - lo
    return [(1.0 - alpha * ((len(c) - lo) / span if span else 0.0)) if ok else 0.0
            for c, ok in zip(completions, correct)]
