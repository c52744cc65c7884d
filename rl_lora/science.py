"""The paper's hyper-parameter rules (LoRA Without Regret), computed from a model's config.json alone.

- Learning rate. Optimal LoRA LR is ~10x the full fine-tuning LR (~15x for runs under ~100 steps, because B
  starts at zero and the effective step grows with B). Fitted rule, used when no full-FT LR is given:
  LR_LoRA = 9.8 * M_FullFT * (2000 / hidden_size) ** p, with the public fitted values M_FullFT = 5e-5 and
  p = 0.781 (Llama family) or 0.0775 (Qwen family). Rank does not enter: the 1/r in alpha/r makes the
  optimal LR nearly rank-independent.
- Capacity. Policy-gradient RL carries ~1 bit per episode (one scalar advantage per sequence) and a network
  stores up to ~2 bits per parameter, so an adapter with P parameters is large enough for ~2P episodes.
  Adapter parameters = sum over adapted matrices of r * (d_in + d_out).
- MoE. A separate adapter on every routed expert, each of rank e = r / experts active per token (so the ratio of
  LoRA to full-FT parameters in MoE layers equals the dense layers'); `lora.expert_rank: auto` is
  max(1, r // active), so at r = 1 each expert still gets rank 1: N x the paper's ratio for N active experts (the
  capacity line says so). Shared experts and attention take rank r, as dense layers.

- Sub-rank-1 adapters (`lora.trainable: scalars`, rl_lora/learner/tinylora.py): the trainable parameters are the scalars,
  count per share group (per adapted module, per decoder layer, or one set for the model); the capacity line counts
  them at the same ~2 bits each, and says when a run is below ~1 bit per episode on purpose (TinyLoRA learns with
  13). Their LR is far above LoRA's: SCALARS_LR (measured: README "Sub-rank-1 adapters").

Nothing here loads weights: only config.json, so `rl-lora lr-suggest` answers in a second.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

M_FULLFT = 5e-5  # fitted full fine-tuning LR multiplier (public value)
LORA_MULTIPLIER = 9.8  # M_LoRA = 9.8 * M_FullFT
SHORT_RUN_STEPS = 100  # below this, LoRA's best LR is ~15x full FT instead of ~10x
MODEL_POW = {"llama": 0.781, "qwen": 0.0775}  # fitted exponents per model family
BITS_PER_EPISODE = 1.0
BITS_PER_PARAMETER = 2.0
# Suggested LR of a scalars adapter: one AdamW step at 0.05 moves SmolLM2-135M's policy (mean |d logp| per token) about
# as far as rank-1 LoRA at 3e-4, the CPU sweep's best (benchmarks/scalars_lr.py; README "Sub-rank-1 adapters").
SCALARS_LR = 0.05


@dataclass
class ModelShape:
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int = 0  # routed experts per MoE layer (0 = dense)
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    moe_layers: int = 0  # layers whose MLP is routed experts (the others keep a dense MLP); 0 with num_experts = all
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE's always-on shared expert (0 = none)

    @property
    def family(self) -> str | None:
        t = self.model_type.lower()
        if t.startswith("qwen"):
            return "qwen"
        if t in ("llama", "mistral", "smollm3"):
            return "llama"
        return None


def read_shape(model_path: str | Path) -> ModelShape:
    """Model dimensions from a local HF directory's config.json (or a hub name's, via the HF cache)."""
    path = Path(model_path)
    if path.is_dir():
        cfg = json.loads((path / "config.json").read_text())
    else:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(str(model_path)).to_dict()
    cfg = {**cfg, **cfg.get("text_config", {})}
    hidden = int(cfg["hidden_size"])
    heads = int(cfg["num_attention_heads"])
    layers = int(cfg["num_hidden_layers"])
    step = int(cfg.get("decoder_sparse_step") or 1)
    dense_only = set(cfg.get("mlp_only_layers") or [])
    moe_layers = sum(1 for i in range(layers) if i not in dense_only and (i + 1) % step == 0)
    return ModelShape(
        model_type=str(cfg.get("model_type", "")), hidden_size=hidden,
        intermediate_size=int(cfg.get("intermediate_size") or 4 * hidden),
        num_layers=int(cfg["num_hidden_layers"]), num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        num_experts=int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0),
        experts_per_token=int(cfg.get("num_experts_per_tok") or 0),
        moe_intermediate_size=int(cfg.get("moe_intermediate_size") or 0),
        moe_layers=moe_layers, shared_expert_intermediate_size=int(cfg.get("shared_expert_intermediate_size") or 0),
    )


def matrix_shapes(shape: ModelShape) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of each linear module name in one decoder layer (dense MLP)."""
    h, q, kv, f = shape.hidden_size, shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim, \
        shape.intermediate_size
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, f), "up_proj": (h, f), "down_proj": (f, h)}


def expert_rank_of(shape: ModelShape, rank: int, expert_rank: int | str = "auto") -> int:
    """Each routed expert's adapter rank: `expert_rank`, or "auto" = max(1, rank // active experts) (the paper's
    rank / active experts; rl_lora.learner.moe.resolve_expert_rank)."""
    return max(1, rank // max(shape.experts_per_token, 1)) if expert_rank == "auto" else int(expert_rank)


def adapter_parameters(shape: ModelShape, rank: int, target_modules: list[str], expert_rank: int | str = "auto") -> int:
    """sum over adapted matrices of r * (d_in + d_out), over all layers. In MoE layers the MLP modules count once
    per routed expert, each at the expert rank (rank / active experts, the paper's rule), plus a shared expert's at
    rank r; layers with a dense MLP count as dense."""
    mlp = ("gate_proj", "up_proj", "down_proj")
    attention = dense_mlp = moe_mlp = 0
    for name, (d_in, d_out) in matrix_shapes(shape).items():
        if name not in target_modules:
            continue
        if name not in mlp:
            attention += rank * (d_in + d_out)
            continue
        dense_mlp += rank * (d_in + d_out)
        if shape.num_experts:
            f = shape.moe_intermediate_size or shape.intermediate_size
            moe_mlp += shape.num_experts * expert_rank_of(shape, rank, expert_rank) * (f + shape.hidden_size)
            if shape.shared_expert_intermediate_size:
                moe_mlp += rank * (shape.shared_expert_intermediate_size + shape.hidden_size)
    moe_layers = (shape.moe_layers or shape.num_layers) if shape.num_experts else 0
    return attention * shape.num_layers + dense_mlp * (shape.num_layers - moe_layers) + moe_mlp * moe_layers


def scalar_parameters(shape: ModelShape, count: int, share: str, target_modules: list[str]) -> int:
    """Trainable scalars of a scalars adapter (rl_lora/learner/tinylora.py): count per share group over the adapted modules."""
    modules = [n for n in matrix_shapes(shape) if n in target_modules]
    if not modules:
        return 0
    groups = {"model": 1, "layer": shape.num_layers, "none": len(modules) * shape.num_layers}[share]
    return count * groups


def expert_ratio_note(shape: ModelShape, rank: int, target_modules: list[str], expert_rank: int | str = "auto") -> str:
    """Where the experts' rank is not the paper's rank / active experts: how many times its ratio it is."""
    if not (shape.num_experts and shape.experts_per_token and set(target_modules) & {"gate_proj", "up_proj",
                                                                                      "down_proj"}):
        return ""
    e, k = expert_rank_of(shape, rank, expert_rank), shape.experts_per_token
    if e * k == rank:
        return f"experts at rank {e} each (rank {rank} / {k} active experts, the paper's ratio)"
    return (f"experts at rank {e} each: {e * k / rank:g}x the paper's ratio (rank {rank} / {k} active experts "
            f"= {rank / k:g} per expert)")


@dataclass
class LRSuggestion:
    lora_lr: float
    fullft_lr: float  # given by the user, or the fitted rule's full-FT LR
    multiplier: float  # lora_lr / fullft_lr
    how: str  # one line: which rule produced it


def suggest_lr(shape: ModelShape, *, fullft_lr: float | None = None, steps: int | None = None) -> LRSuggestion:
    """The paper's LoRA LR for this model: from a known full-FT LR (x10, or x15 for runs < 100 steps), else from
    the fitted rule M_LoRA * (2000/hidden)^p."""
    short = steps is not None and steps < SHORT_RUN_STEPS
    if fullft_lr is not None:
        if not fullft_lr > 0:
            raise ValueError(f"full fine-tuning LR must be > 0, got {fullft_lr}")
        mult = 15.0 if short else 10.0
        return LRSuggestion(fullft_lr * mult, fullft_lr, mult,
                            f"{mult:g} x the full fine-tuning LR" + (f" (run of {steps} < {SHORT_RUN_STEPS} steps)"
                                                                    if short else ""))
    family = shape.family
    pow_ = MODEL_POW.get(family or "llama")
    scale = (2000 / shape.hidden_size) ** pow_
    fullft = M_FULLFT * scale
    lora = LORA_MULTIPLIER * fullft
    how = (f"fitted rule 9.8 x {M_FULLFT:g} x (2000/{shape.hidden_size})^{pow_:g}"
           + ("" if family else f" (model_type {shape.model_type!r} has no fitted exponent; Llama's used)"))
    if short:  # the fitted multiplier is the long-run ~10x; short runs want ~15x
        lora *= 15.0 / 10.0
        how += f", x1.5 for a run of {steps} < {SHORT_RUN_STEPS} steps"
    return LRSuggestion(lora, fullft, lora / fullft, how)


@dataclass
class Capacity:
    adapter_parameters: int
    episodes: int
    bits_needed: float  # episodes x ~1 bit
    bits_capacity: float  # parameters x ~2 bits
    note: str = ""  # MoE: the experts' rank against the paper's rule
    scalars: bool = False  # a sub-rank-1 adapter: the parameters are its trainable scalars

    @property
    def ok(self) -> bool:
        return self.bits_needed <= self.bits_capacity

    def message(self) -> str:
        ratio = self.bits_capacity / max(self.bits_needed, 1e-9)
        what = "trainable scalars" if self.scalars else "adapter parameters"
        headroom = f"{ratio:,.1f}" if ratio >= 0.1 else f"{ratio:.2g}"
        line = (f"capacity: {self.adapter_parameters:,} {what} (~{self.bits_capacity:,.0f} bits) for "
                f"{self.episodes:,} episodes (~{self.bits_needed:,.0f} bits at ~1 bit/episode): {headroom}x headroom")
        if self.note:
            line += f"; {self.note}"
        if not self.ok and self.scalars:
            line += (" -- sub-rank-1 on purpose? (TinyLoRA learns with 13 parameters under RL); for more capacity "
                     "raise lora.scalars.count or share less (layer, none)")
        elif not self.ok:
            line += " -- WARNING: the adapter may be too small for this run; raise lora.rank"
        return line


def capacity_check(shape: ModelShape, rank: int, target_modules: list[str], episodes: int,
                   expert_rank: int | str = "auto", scalars=None) -> Capacity:
    """`scalars`: a ScalarsConfig (count, share) for a sub-rank-1 adapter; None = LoRA of `rank`."""
    if scalars is not None:
        n = scalar_parameters(shape, scalars.count, scalars.share, target_modules)
        return Capacity(n, episodes, episodes * BITS_PER_EPISODE, n * BITS_PER_PARAMETER, scalars=True)
    params = adapter_parameters(shape, rank, target_modules, expert_rank)
    return Capacity(params, episodes, episodes * BITS_PER_EPISODE, params * BITS_PER_PARAMETER,
                    expert_ratio_note(shape, rank, target_modules, expert_rank))


# Committed grids (`rl-lora grid` summaries under experiments/<question>/results.json) that lr-suggest and
# `lr: auto` report beside the fitted rule.
EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def measured_lrs(shape: ModelShape, root: Path | None = None) -> list[str]:
    """One line per committed grid measured on this model family (the same family, else the same model_type):
    its best LR per variant with the interval over seeds, and the LoRA / full fine-tuning LR ratio. [] if none."""
    lines = []
    for path in sorted(Path(root or EXPERIMENTS).glob("*/results.json")):
        try:
            r = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        same = r.get("family") == shape.family if shape.family else r.get("model_type") == shape.model_type
        if not (same and r.get("best")):
            continue
        best = "; ".join(f"{v} {b['lr']:.3g} ({b['mean']:.2f}" + (f" [{b['ci95'][0]:.2f}, {b['ci95'][1]:.2f}])"
                                                                   if b.get("ci95") else ")")
                         for v, b in r["best"].items() if "tied" not in b)  # a tie names no LR
        ratio = "".join(f"; {v}/full FT {x:.3g}x" for v, x in r.get("lr_ratio_vs_full", {}).items())
        lines.append(f"{path.parent.name}/ ({r.get('model')}, hidden {r.get('hidden_size')}, {r.get('data')}, "
                     f"{r.get('steps')} steps, {len(r.get('seeds', []))} seeds): best LR {best}{ratio}")
    return lines
