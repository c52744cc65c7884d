"""rl-lora's vLLM plugin: installs rl-lora's CPU patches of vLLM in every process that builds the model.

vLLM calls every `vllm.general_plugins` entry point (pyproject.toml) in each of its processes -- the frontend, the
engine-core process (VLLM_ENABLE_V1_MULTIPROCESSING=1, the GPU default) and worker processes -- before a model
is built. `register()` installs nothing unless rl-lora asked for it: `rl_lora.sampling.sampler.Sampler` sets
`RL_LORA_VLLM_PATCHES` (the installers' names, comma-separated) in its environment before it starts its engine,
and the engine's processes inherit it; a user's unrelated vLLM use in another process never sees it. Only on
vLLM's CPU platform: the GPU path stays vLLM's own. Idempotent (vLLM may load plugins more than once, and
rl-lora also calls `install()` itself for an in-process engine core, whose frontend may have loaded the
plugins before the variable was set).

    RL_LORA_RANK1=0      do not use the rank-1 LoRA path (vLLM's own CPU LoRA ops), e.g. to compare
"""

from __future__ import annotations

import importlib
import importlib.util
import os

ENV = "RL_LORA_VLLM_PATCHES"
DISABLE_RANK1 = "RL_LORA_RANK1"  # "0": the Sampler does not ask for the rank-1 path
# The rank-1 path also serves engines up to this max_lora_rank (one GEMM per layer for every adapter in the batch;
# on vLLM-CPU's own path rank 8 sampled ~5x slower than rank 1): rl_lora.sampling.vllm_cpu_lora.MAX_RANK.
RANK1_PATH_MAX_RANK = 16

# name -> (module whose apply() installs it, asked for at this max_lora_rank). A module that does not exist in
# this checkout is skipped, so an installer can be listed before its branch is merged.
INSTALLERS = {
    "lora_rank1": ("rl_lora.sampling.vllm_cpu_lora", lambda rank: rank <= RANK1_PATH_MAX_RANK and os.environ.get(DISABLE_RANK1, "1") != "0"),
    "moe": ("rl_lora.sampling.vllm_cpu_moe", lambda rank: True),  # MoE LoRA in torch ops: vLLM-CPU has none at any rank
}

_installed: dict[str, bool] = {}  # name -> what its apply() returned, in this process


def _available(name: str) -> bool:
    return importlib.util.find_spec(INSTALLERS[name][0]) is not None


def wanted(max_lora_rank: int) -> list[str]:
    """The installers rl-lora asks for in an engine with this max_lora_rank (those present in this checkout)."""
    return [n for n, (_, asked) in INSTALLERS.items() if asked(max_lora_rank) and _available(n)]


def request(max_lora_rank: int) -> list[str]:
    """Called by the Sampler before its engine starts: ask the engine's processes for the CPU patches (via the
    environment, read by `register()`) and install them in this process too; a patch an earlier engine of this
    process asked for and this one does not (the rank-1 path, for an engine at a higher rank) is removed first.
    Returns the names asked for."""
    names = wanted(max_lora_rank)
    os.environ[ENV] = ",".join(names)
    for name in [n for n in _installed if n not in names]:
        module = importlib.import_module(INSTALLERS[name][0])
        if hasattr(module, "remove"):
            module.remove()
            del _installed[name]
    install(names)
    return names


def install(names: list[str]) -> dict[str, bool]:
    """Apply the named installers once each, on vLLM's CPU platform only."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return {}
    for name in names:
        if name not in _installed and name in INSTALLERS and _available(name):
            _installed[name] = bool(importlib.import_module(INSTALLERS[name][0]).apply())
    return {n: _installed[n] for n in names if n in _installed}


def register() -> None:
    """vLLM's entry point (group `vllm.general_plugins`): install what `RL_LORA_VLLM_PATCHES` names, if anything."""
    names = [n for n in os.environ.get(ENV, "").split(",") if n]
    if names:
        install(names)
