"""GPU memory plan of a run, from the model's config.json alone: does learner + engine fit the GPU?

`rl-lora plan CONFIG` prints the table and exits 2 with one line if the run cannot fit; `rl-lora train` runs the
same check before any model loads when a GPU is visible. Nothing here imports torch or loads weights.

Learner (one process; the in-process engine shares its GPU unless the engines are Ray actors):
- weights: every parameter of the base in `model.dtype` (embeddings, an untied output layer, decoder layers);
- trainable state: LoRA A and B in fp32 with their gradient and AdamW's two moments (16 bytes per parameter);
  full fine-tuning: a gradient in the base dtype plus fp32 master weights and moments where the base is not
  fp32 (issue 15 point 3), else gradient + moments in fp32;
- activations: tokens of the largest micro-batch (`optim.tokens_per_microbatch`, or one longest sample,
  prompt + completion <= model.max_model_len, which the learner never splits) x bytes per token. Without
  activation checkpointing every layer keeps its activations (layer_activation_bytes, calibrated on reduced-depth
  Qwen3-8B-shaped models by benchmarks/plan_calibration.py); with it each layer keeps only its input, and one
  layer's activations live during its recomputation;
- the prompt's keys/values gathered once per completion (prompt sharing): one group of samples_per_prompt
  completions of a longest prompt (max_model_len - max_tokens), every layer without checkpointing;
- the logits chunk: LOGIT_CHUNK completion tokens x vocabulary in fp32 (logits, probabilities) plus its cast
  (full fine-tuning recomputes it in backward: x3);
- CUDA context and allocator slack: a fixed reserve.
Engine: `sampler.gpu_memory_utilization` x GPU memory is what vLLM claims (its whole budget: weights, activation
peak, CUDA graphs, KV cache); inside it the KV cache must hold at least one max_model_len sequence, or vLLM
refuses at start.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from rl_lora.config import Config, ConfigError, adapter_specs, is_full_finetune
from rl_lora.science import ModelShape, adapter_parameters

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# What `rl-lora plan` assumes when model.gpu_memory_gib is 0 and no GPU is visible: an 80 GB A100/H100, which
# reports 79.3-79.6 GiB of total memory to torch.cuda.
DEFAULT_GPU_GIB = 79.3
LOGIT_CHUNK = 256  # rl_lora.learner.logprobs.LOGIT_CHUNK
CUDA_RESERVE_GIB = 1.5  # CUDA context (~0.5 GiB) and caching-allocator fragmentation, learner process
ENGINE_OVERHEAD_GIB = 3.0  # vLLM's activation peak at its token budget, CUDA graphs, sampler buffers (8B models)
# Saved activations per token per decoder layer, in elements: 2 x d_ff (SwiGLU's gate and up, kept by
# lora._SwiGLUDown) + 6 x q_dim (q-norm input, roped queries, keys and values repeated to the query heads, the
# attention output and o_proj's input) + kv_dim (k-norm input) + ACT_H x hidden (norm inputs and outputs, residual
# stream, LoRA inputs). ACT_H is fitted to benchmarks/plan_calibration.py's measurement: layers 1 -> 2 of Qwen3-8B
# widths in fp32 add 251 KiB per token (64.3k elements: the structural count gives 50.2k + 3.45 x hidden; see its
# docstring). In bf16 the norms' inputs are kept as fp32 copies (2 bytes more each).
ACT_H = 3.45
# Outside the stored layers, at the step's peak (in backward): one layer's gradient workspace (SwiGLU recomputation,
# attention backward), the embedding output, final hidden states and the head's saved d logp / d h; measured as
# 1.33 layers' worth per token (the same calibration: depth 1's peak per token, less the logits chunk, is 2.33
# layers' worth).
OUTSIDE_LAYERS = 1.33

# config.json sizes of the shipped recipes' models (copied from the hub files), used only when the hub cannot
# be reached and the HF cache has no copy, so that `rl-lora plan configs/*.yaml` answers offline.
KNOWN_CONFIGS = {
    "Qwen/Qwen3-8B": {"model_type": "qwen3", "hidden_size": 4096, "intermediate_size": 12288,
                      "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                      "vocab_size": 151936, "tie_word_embeddings": False, "max_position_embeddings": 40960},
    "meta-llama/Llama-3.1-8B-Instruct": {
        "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
        "tie_word_embeddings": False, "max_position_embeddings": 131072},
}
KNOWN_CONFIGS["meta-llama/Llama-3.1-8B"] = KNOWN_CONFIGS["meta-llama/Llama-3.1-8B-Instruct"]


def read_model_config(model_path: str) -> tuple[dict, str]:
    """(config.json as a dict, where it came from) for a local HF directory or a hub name."""
    path = Path(model_path)
    if path.is_dir():
        return json.loads((path / "config.json").read_text()), str(path / "config.json")
    from transformers import AutoConfig

    try:  # the HF cache first: no network wait
        return AutoConfig.from_pretrained(model_path, local_files_only=True).to_dict(), f"{model_path} (HF cache)"
    except Exception:
        pass
    if model_path in KNOWN_CONFIGS:
        return dict(KNOWN_CONFIGS[model_path]), "built-in copy of its config.json sizes"
    try:
        return AutoConfig.from_pretrained(model_path).to_dict(), f"{model_path} (hub)"
    except Exception as exc:
        raise ConfigError(f"model.path: cannot read {model_path}'s config.json ({str(exc).splitlines()[0]})") from None


def shape_of(raw: dict) -> ModelShape:
    raw = {**raw, **raw.get("text_config", {})}
    hidden, heads = int(raw["hidden_size"]), int(raw["num_attention_heads"])
    return ModelShape(str(raw.get("model_type", "")), hidden, int(raw.get("intermediate_size") or 4 * hidden),
                      int(raw["num_hidden_layers"]), heads, int(raw.get("num_key_value_heads") or heads),
                      int(raw.get("head_dim") or hidden // heads),
                      num_experts=int(raw.get("num_experts") or raw.get("num_local_experts") or 0),
                      experts_per_token=int(raw.get("num_experts_per_tok") or 0),
                      moe_intermediate_size=int(raw.get("moe_intermediate_size") or 0))


def base_parameters(shape: ModelShape, vocab: int, tied: bool) -> int:
    h, q, kv = shape.hidden_size, shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    attn = h * q + 2 * h * kv + q * h
    if shape.num_experts:
        f = shape.moe_intermediate_size or shape.intermediate_size
        mlp = shape.num_experts * 3 * h * f + h * shape.num_experts
    else:
        mlp = 3 * h * shape.intermediate_size
    qk_norm = shape.model_type.startswith(("qwen3", "gemma3", "olmo2"))  # per-head RMSNorm of q and k
    norms = 2 * h + (2 * shape.head_dim if qk_norm else 0)
    return vocab * h * (1 if tied else 2) + shape.num_layers * (attn + mlp + norms) + h


def layer_activation_bytes(shape: ModelShape, nbytes: int) -> float:
    """Saved activations per token of one decoder layer, bytes (no checkpointing)."""
    h, q, kv = shape.hidden_size, shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    f = shape.intermediate_size
    if shape.num_experts:  # routed tokens: experts_per_token experts' gate and up
        f = (shape.moe_intermediate_size or f) * max(shape.experts_per_token, 1)
    elements = ACT_H * h + 2 * f + 6 * q + kv
    fp32_copies = 0 if nbytes == 4 else 2 * h + q + kv  # input_layernorm, post_attention_layernorm, q/k norms
    return elements * nbytes + fp32_copies * (4 - nbytes)


def activation_bytes_per_token(shape: ModelShape, nbytes: int, checkpointing: bool, layers: int | None = None) -> float:
    """Bytes per token of the learner's saved activations over `layers` decoder layers (default: all)."""
    L = shape.num_layers if layers is None else layers
    per_layer = layer_activation_bytes(shape, nbytes)
    if checkpointing:  # each layer's input is kept; one layer's activations exist while it is recomputed
        return L * shape.hidden_size * nbytes + (1 + OUTSIDE_LAYERS) * per_layer
    return (L + OUTSIDE_LAYERS) * per_layer


@dataclass
class Plan:
    rows: list = field(default_factory=list)  # (label, GiB, how)
    learner_gib: float = 0.0
    engine_gib: float = 0.0
    available_gib: float = 0.0
    colocated: bool = True
    problems: list = field(default_factory=list)  # one line each; empty = fits
    source: str = ""

    @property
    def fits(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        engine = f" + engine share {self.engine_gib:.1f}" if self.colocated else ""
        return f"GPU memory plan: learner ~{self.learner_gib:.1f} GiB{engine} of {self.available_gib:.1f} GiB (rl-lora plan)"

    def table(self) -> str:
        width = max(len(label) for label, _, _ in self.rows)
        lines = [f"{label:<{width}}  {gib:>7.1f} GiB  {how}" for label, gib, how in self.rows]
        return "\n".join(lines)


def gpu_memory_gib(cfg: Config) -> tuple[float, str]:
    """The GPU memory the run is given: model.gpu_memory_gib, else the visible GPU's, else an 80 GB GPU's."""
    if cfg.model.gpu_memory_gib > 0:
        return cfg.model.gpu_memory_gib, "model.gpu_memory_gib"
    import sys

    torch = sys.modules.get("torch")  # only where torch is already imported (train): plan stays torch-free
    if torch is not None and torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / GIB, torch.cuda.get_device_name(0)
    return DEFAULT_GPU_GIB, "model.gpu_memory_gib=0: assumed an 80 GB GPU"


def learner_rows(shape: ModelShape, vocab: int, tied: bool, b: int, full_finetune: bool, n_lora: int, tokens: int,
                 ckpt: bool, prompt: int, G: int) -> list:
    """(label, GiB, how) of the learner's memory: a micro-batch of `tokens` tokens, one group of G completions of
    a `prompt`-token prompt."""
    n_base = base_parameters(shape, vocab, tied)
    rows = [("learner weights", n_base * b / GIB, f"{n_base / 1e9:.2f}B parameters x {b} B")]
    if full_finetune:
        per = b + (12 if b < 4 else 8)
        rows.append(("trainable state", n_base * per / GIB,
                     f"full FT: gradient ({b} B) + " + ("fp32 master + " if b < 4 else "") + "AdamW m, v (fp32)"))
    else:
        rows.append(("adapters + AdamW", n_lora * 16 / GIB, f"{n_lora:,} fp32 parameters x (weight, grad, m, v)"))
    per_token = activation_bytes_per_token(shape, b, ckpt)
    how = "checkpointed: layer inputs + one layer" if ckpt else f"all {shape.num_layers} layers kept"
    rows.append(("activations", per_token * tokens / GIB,
                 f"{per_token / 2**20:.2f} MiB/token x {tokens:,} tokens ({how})"))
    kv_dim = shape.num_kv_heads * shape.head_dim
    # the prompt pass's keys/values (every layer) and each completion's gathered copy (every layer, or the one
    # being recomputed)
    copies = prompt * 2 * kv_dim * b * (shape.num_layers + G * (1 if ckpt else shape.num_layers))
    rows.append(("prompt K/V copies", copies / GIB, f"{G} completions x prompt <= {prompt:,} tokens"))
    head = LOGIT_CHUNK * vocab * (8 + b) * (3 if full_finetune else 1)
    rows.append(("logits chunk", head / GIB, f"{LOGIT_CHUNK} tokens x {vocab:,} vocab (fp32 logits, probabilities)"))
    rows.append(("CUDA context, slack", CUDA_RESERVE_GIB, "fixed reserve"))
    return rows


def make_plan(cfg: Config, model_path: str) -> Plan:
    raw, source = read_model_config(model_path)
    shape = shape_of(raw)
    vocab = int({**raw, **raw.get("text_config", {})}.get("vocab_size") or 32000)
    tied = bool(raw.get("tie_word_embeddings", False))
    b = DTYPE_BYTES[cfg.model.dtype]
    total_gib, gpu_source = gpu_memory_gib(cfg)
    plan = Plan(available_gib=total_gib, source=source,
                colocated=cfg.sampler.num_engines == 1 and not cfg.sampler.ray_address
                and int(os.environ.get("WORLD_SIZE", "1")) == 1)
    n_base = base_parameters(shape, vocab, tied)
    n_lora = sum(adapter_parameters(shape, s.rank, s.target_modules, s.expert_rank) for s in adapter_specs(cfg))
    context = cfg.model.max_model_len or int(raw.get("max_position_embeddings") or 0) or cfg.sampler.max_tokens
    tokens = max(cfg.optim.tokens_per_microbatch, context)
    ckpt = cfg.optim.activation_checkpointing
    prompt = max(context - cfg.sampler.max_tokens, 0)
    rows = plan.rows
    rows += learner_rows(shape, vocab, tied, b, is_full_finetune(cfg), n_lora, tokens, ckpt, prompt,
                         cfg.sampler.samples_per_prompt)
    per_token = activation_bytes_per_token(shape, b, ckpt)
    kv_dim = shape.num_kv_heads * shape.head_dim
    plan.learner_gib = sum(gib for _, gib, _ in rows)
    util = cfg.sampler.gpu_memory_utilization
    plan.engine_gib = util * total_gib
    tp = cfg.sampler.tensor_parallel_size
    kv_token = 2 * shape.num_layers * kv_dim * b / tp
    kv_room = plan.engine_gib - n_base * b / tp / GIB - ENGINE_OVERHEAD_GIB
    kv_tokens = max(kv_room, 0) * GIB / kv_token
    rows.append(("engine share", plan.engine_gib,
                 f"sampler.gpu_memory_utilization {util:g} x {total_gib:.1f} GiB: weights {n_base * b / tp / GIB:.1f}, "
                 f"~{ENGINE_OVERHEAD_GIB:g} overhead, KV cache ~{kv_tokens / 1000:,.0f}k tokens "
                 f"({kv_tokens / max(context, 1):,.0f} x {context:,})"))
    learner_room = total_gib - plan.engine_gib if plan.colocated else total_gib
    where = (f"the {learner_room:.1f} GiB left beside the engine's share of the {total_gib:.1f} GiB GPU"
             if plan.colocated else f"its {total_gib:.1f} GiB GPU")
    rows.append(("total" if plan.colocated else "learner total",
                 plan.learner_gib + (plan.engine_gib if plan.colocated else 0.0),
                 f"of {total_gib:.1f} GiB available ({gpu_source})"))
    if plan.learner_gib > learner_room:
        act_gib = per_token * tokens / GIB
        fixes = [] if ckpt else ["optim.activation_checkpointing=true"]
        if tokens > context:
            fixes.append("a lower optim.tokens_per_microbatch")
        if plan.colocated:
            fixes.append("a lower sampler.gpu_memory_utilization")
        if plan.learner_gib - act_gib > learner_room:  # weights and optimizer state alone do not fit
            fixes = (["LoRA (lora.rank: 1)"] if is_full_finetune(cfg) else []) + ["a GPU with more memory"] + fixes[-1:]
        plan.problems.append(
            f"plan: the learner needs ~{plan.learner_gib:.1f} GiB (activations {per_token * tokens / GIB:.1f} GiB for "
            f"{tokens:,} tokens) but has {where}; try {' or '.join(fixes) or 'a larger GPU'}")
    if kv_tokens < context:
        plan.problems.append(
            f"plan: the engine's share ({util:g} x {total_gib:.1f} GiB) leaves KV cache for ~{kv_tokens:,.0f} tokens, "
            f"less than one {context:,}-token sequence (model.max_model_len); raise sampler.gpu_memory_utilization "
            "or lower model.max_model_len")
    return plan


def check_fits(cfg: Config, model_path: str) -> Plan:
    """make_plan, raising ConfigError (one line) when the run cannot fit the GPU memory it is given."""
    plan = make_plan(cfg, model_path)
    if plan.problems:
        raise ConfigError(plan.problems[0])
    return plan
