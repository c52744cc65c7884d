"""Checks of a run's config against its rewards and its model that need no weights: one line (ConfigError) each,
before any model loads or any engine starts.

- rewards: every named reward resolves to a callable (a registry name, or an importable `package.module:function`)
  that takes (prompt, completion) positionally;
- lora.target_modules: matched against the linear layers (and fused MoE expert projections) of the model's own
  architecture, built from its config.json on the meta device (no weights, no memory), with the learner's own
  matching rule (lora._targets);
- sampler settings against the model: LoRA ranks vLLM can serve, tensor parallelism that divides the attention
  heads, model.max_model_len within the model's context.
"""

from __future__ import annotations

from rl_lora.config import Config, ConfigError, adapter_specs

VLLM_MAX_LORA_RANK = 512  # vLLM 0.32's largest max_lora_rank (vllm/config/lora.py MaxLoRARanks)


def check_rewards(cfg: Config) -> None:
    """Every reward of the run (the run's list and each adapter's own) resolves to a callable whose signature
    fits its kind (completion, batched, group; async or not), and a config `kind` agrees with the function."""
    from reward.registry import check_spec

    lists = [("reward.rewards", cfg.reward.rewards)]
    lists += [(f"adapters[{i}].rewards", a.rewards) for i, a in enumerate(cfg.adapters) if a.rewards is not None]
    for key, rewards in lists:
        for j, raw in enumerate(rewards):
            try:
                check_spec(raw)  # name resolves, kind agrees with the function, signature fits the kind
            except ValueError as exc:
                raise ConfigError(f"{key}[{j}]: {exc}") from None


def _model_config(model_path: str):
    """The model's transformers config, from a local directory or the HF cache (never the network); None if
    neither has it."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_path, local_files_only=True)
    except Exception:
        return None


def check_model(cfg: Config, model_path: str) -> None:
    """The model's output layer (one the learner reproduces, rl_lora/learner/heads.py), target_modules and sampler settings
    against the model's config.json."""
    from rl_lora.learner.heads import check_output_layer

    check_output_layer(model_path)
    specs = adapter_specs(cfg)  # none under full fine-tuning
    for i, rank in enumerate(s.rank for s in specs):
        if rank > VLLM_MAX_LORA_RANK:
            key = "lora.rank" if not cfg.adapters else f"adapters[{i}].rank"
            raise ConfigError(f"{key}: {rank} is above the largest LoRA rank vLLM serves ({VLLM_MAX_LORA_RANK})")
    for i, spec in enumerate(specs):
        if isinstance(spec.expert_rank, int) and spec.expert_rank > VLLM_MAX_LORA_RANK:
            key = "lora.expert_rank" if not cfg.adapters else f"adapters[{i}].expert_rank"
            raise ConfigError(f"{key}: {spec.expert_rank} is above the largest LoRA rank vLLM serves "
                              f"({VLLM_MAX_LORA_RANK})")
    config = _model_config(model_path)
    if config is None:
        return  # no local config.json: the learner checks target_modules when it builds the model
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    own = getattr(text, "max_position_embeddings", None)
    if own and cfg.model.max_model_len > own:
        raise ConfigError(f"model.max_model_len: {cfg.model.max_model_len} exceeds the model's context ({own} tokens)")
    tp = cfg.sampler.tensor_parallel_size
    heads = getattr(text, "num_attention_heads", None)
    if heads and heads % tp:
        raise ConfigError(f"sampler.tensor_parallel_size: {tp} does not divide the model's {heads} attention heads "
                          "(vLLM shards heads evenly)")
    _check_transformers_backend(config)
    if specs:
        _check_targets(cfg, config, specs)


def _transformers_backend_archs() -> set[str]:
    """Architectures vLLM 0.32 serves through its Transformers backend ("transformers" in its model registry), read
    from the registry's source: importing vLLM here would precede the CPU settings rl_lora.sampling.sampler makes first."""
    import importlib.util
    import re
    from pathlib import Path

    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return set()
    registry = Path(list(spec.submodule_search_locations)[0]) / "model_executor" / "models" / "registry.py"
    try:
        return set(re.findall(r'"(\w+)": \("transformers",', registry.read_text()))
    except OSError:
        return set()


def _check_transformers_backend(config) -> None:
    """vLLM's Transformers backend (Phi-1/2, OLMo, SmolLM3, GPT-NeoX, Starcoder2, ...) patches transformers' own
    model classes in the process that loads it; with the engine in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0,
    the CPU default here) the learner's copy of the model then fails to build with an AssertionError."""
    import os

    import torch

    mp = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1" if torch.cuda.is_available() else "0")
    arch = (getattr(config, "architectures", None) or [""])[0]
    if mp == "0" and arch in _transformers_backend_archs():
        raise ConfigError(f"model.path: vLLM serves {arch} through its Transformers backend, which cannot share a "
                          "process with the learner; run with VLLM_ENABLE_V1_MULTIPROCESSING=1 (the engine in its "
                          "own process)")


def _check_targets(cfg: Config, config, specs: list) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from rl_lora.learner.lora import _targets
    from rl_lora.learner.moe import EXPERT_PROJECTIONS, fused_expert_modules

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception:
        return  # an architecture transformers cannot build here: the learner checks when it builds the model
    for i, spec in enumerate(specs):
        key = "lora.target_modules" if not cfg.adapters else f"adapters[{i}].target_modules"
        try:
            _targets(model, spec.target_modules, key)
        except ValueError as exc:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                             if isinstance(m, torch.nn.Linear) and "lm_head" not in n})
            experts = f"; fused MoE experts: {', '.join(EXPERT_PROJECTIONS)}" if fused_expert_modules(model) else ""
            raise ConfigError(f"{exc} (model_type {config.model_type!r} has: {', '.join(linear)}{experts})") from None
        _check_expert_family(model, spec, config.model_type, key)
        if spec.scalars is not None:
            _check_scalars(model, spec, "lora" if not cfg.adapters else f"adapters[{i}]")


def _check_scalars(model, spec, where: str) -> None:
    """A scalars adapter (rl_lora/learner/tinylora.py) adapts linear layers only, each with at most min(d_out, d_in) directions."""
    import torch

    from rl_lora.learner.lora import _targets
    from rl_lora.learner.moe import EXPERT_PROJECTIONS, fused_expert_modules

    if fused_expert_modules(model) and any(t in EXPERT_PROJECTIONS for t in spec.target_modules):
        raise ConfigError(f"{where}.target_modules: a scalars adapter adapts linear layers only, not the fused MoE "
                          "experts; adapt attention (target_modules: attention)")
    smallest = min(min(model.get_submodule(n).weight.shape) for n in _targets(model, spec.target_modules, where)
                   if isinstance(model.get_submodule(n), torch.nn.Linear))
    if spec.scalars.count > smallest:
        raise ConfigError(f"{where}.scalars.count: {spec.scalars.count} directions exceed the smallest adapted "
                          f"dimension ({smallest})")


# MoE families whose expert LoRA has been checked end to end (push check gap <= 1e-6, rho = 1: qwen3_moe and
# mixtral in tests/e2e/test_moe_e2e.py; tiny random qwen2_moe (shared expert) and olmoe by hand, `rl-lora train`, 2
# steps). Mixtral since its files name the experts as its checkpoints and vLLM do (rl_lora/learner/moe.py FILE_NAMES;
# before, a 0.21 nats/token push-check gap). Other families may need such a mapping too, so they are refused.
MOE_VERIFIED = ("qwen3_moe", "qwen2_moe", "olmoe", "mixtral")


def _check_expert_family(model, spec, model_type: str, key: str) -> None:
    from rl_lora.learner.moe import EXPERT_PROJECTIONS, fused_expert_modules

    if model_type in MOE_VERIFIED or not fused_expert_modules(model):
        return
    if any(t in EXPERT_PROJECTIONS for t in spec.target_modules):
        raise ConfigError(f"{key}: LoRA on the routed experts is verified for {', '.join(MOE_VERIFIED)} only, not "
                          f"{model_type!r} (its sampler and learner disagree); adapt attention only "
                          f"(target_modules: attention) or use a verified family")
