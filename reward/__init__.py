"""Rewards for RL on math: a safe answer verifier and a runner for weighted, time-limited reward functions.

    from reward import extract, score                 # the verifier
    from reward import RewardRunner, RewardSpec       # batch scoring in worker processes

Imports neither torch nor vLLM. sympy is only imported when the verifier is first used (`extract`/`score`
are loaded lazily), so `import reward` is fast in the trainer process.
"""

from __future__ import annotations

from reward.registry import RewardSpec, batched, group, register, resolve
from reward.runner import RewardResult, RewardRunner

__all__ = ["extract", "score", "RewardSpec", "RewardRunner", "RewardResult", "resolve", "register", "batched", "group"]


def __getattr__(name):
    if name in ("extract", "score"):
        from reward import math_answer

        return getattr(math_answer, name)
    raise AttributeError(f"module 'reward' has no attribute {name!r}")
