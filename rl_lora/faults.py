"""Fault injection points for the reliability tests (tests/faults/). Inert unless RL_LORA_FAULTS is set.

    RL_LORA_FAULTS="sampler_crash@3,nan_logprobs@2-4,stale_push@2,kill_in_checkpoint@4"

Each entry is name@step or name@first-last; a fault fires once per (name, step), so a redone step runs clean.
Names and where they fire:
  sampler_crash       the sampler engine dies for real (engine-core process SIGKILLed, or the in-process engine
                      shut down; no flag) just after that step's request is submitted: the request fails inside
                      vLLM (Ray: the actor is killed)
  nan_logprobs        a NaN in the sampler logprobs handed to the learner at that step
  stale_push          the push at that step loads the PREVIOUS version's tensors under the new version's id (zeros
                      where there is none; full fine-tuning: the engine keeps its weights)
  stale_request       that step's request is sampled under the previous version, reloaded for it (LoRA): a
                      pipeline bug, for the staleness guard
  kill_in_checkpoint  SIGKILL to the process halfway through writing that step's checkpoint
"""

from __future__ import annotations

import os

_fired: set[tuple[str, int]] = set()


def _spec() -> dict[str, list[tuple[int, int]]]:
    out: dict[str, list[tuple[int, int]]] = {}
    for item in filter(None, (s.strip() for s in os.environ.get("RL_LORA_FAULTS", "").split(","))):
        name, _, steps = item.partition("@")
        first, _, last = steps.partition("-")
        out.setdefault(name, []).append((int(first), int(last or first)))
    return out


def fire(name: str, step: int) -> bool:
    """True once for each step in the configured range of `name`."""
    if "RL_LORA_FAULTS" not in os.environ:
        return False
    if not any(a <= step <= b for a, b in _spec().get(name, [])) or (name, step) in _fired:
        return False
    _fired.add((name, step))
    return True
