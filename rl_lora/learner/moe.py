"""Per-expert LoRA on mixture-of-experts layers: a separate rank-e adapter on each routed expert's projections.

LoRA Without Regret applies LoRA to every expert, each with rank e = total rank / experts active per token (8 for
Qwen3 MoE), which keeps the ratio of LoRA to full-FT parameters in MoE layers equal to the dense layers'.
`lora.expert_rank: auto` is max(1, rank // active experts); with rank 1 that is 1 per expert, N x the paper's
ratio for N active experts (rl_lora/science.py says so in the capacity line).

Where the experts are. transformers 5.x stores a layer's experts fused, as 3-D parameters of one module
(`mlp.experts.gate_up_proj` [E, 2F, H] = [gate; up] per expert, `mlp.experts.down_proj` [E, H, F]: Qwen2/3-MoE,
Mixtral, OLMoE, ...). `ExpertLoRA` replaces that module: it keeps the frozen 3-D weights and, per adapter and per
targeted projection (the names `gate_proj`, `up_proj`, `down_proj`, as in dense layers and in PEFT/vLLM files),
A [E, e, d_in] and B [E, d_out, e]. Older layouts, with every expert an MLP of nn.Linear layers
(`mlp.experts.3.gate_proj`), go through rl_lora.learner.lora.LoRALinear like any linear layer, at the expert rank.

The computation. Tokens are routed by the model's own router (frozen: rl_lora.learner.lora freezes every base parameter)
and its top-k weights; the (token, expert) assignments are sorted by expert once, as transformers' grouped_mm
experts path does, and every projection is one grouped matmul over all experts: the base weights, then each
adapter's update as two skinny grouped matmuls, (x A_e^T) then (.) B_e^T for each row's expert e. No loop over
tokens or experts. With K adapters (rl_lora.learner.lora.Routing: contiguous batch rows per adapter) each adapter's
[rows, e] intermediate is masked to its own rows (others get an exact zero), so a gradient of one adapter never
touches another.

Files. Each expert's adapter is written under per-expert keys, `...mlp.experts.<i>.gate_proj.lora_A.weight`
[e, H] etc.: the layout vLLM 0.32 loads for Qwen3-MoE (its packed "experts" module lists experts.<i>.gate_proj /
up_proj / down_proj; vllm/lora/utils.py process_packed_modules_mapping) and the one PEFT 0.21 converts onto
transformers 5's fused parameters (peft/utils/transformers_weight_conversion.py). Where e != r the adapter
config carries rank_pattern / alpha_pattern entries for the experts, in both spellings (per-expert modules for
vLLM, fused parameters for PEFT, whose conversion would otherwise give gate_up_proj rank 2r).
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
# Families whose checkpoints name the experts otherwise than transformers 5's modules (`mlp.experts`, gate_proj /
# up_proj / down_proj): their adapter files use the checkpoint's names, (block, {projection: name}). vLLM builds
# the layer under the checkpoint's names and matches LoRA keys against them (a Mixtral file under `mlp.experts`
# loaded without error and served no expert delta: push-check gap 0.21 nats/token), and PEFT's conversion onto the
# fused parameters starts from them (peft/utils/transformers_weight_conversion.py: mixtral w1 + w3 -> gate_up_proj).
FILE_NAMES = {"mixtral": ("block_sparse_moe", {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"})}
_LINEAR_EXPERT = re.compile(r"\.experts\.\d+\.")  # a Linear inside a per-expert MLP (older layouts)


def active_experts(model: nn.Module) -> int:
    """Experts each token is routed to (num_experts_per_tok), 0 for a dense model."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(getattr(text, "num_experts_per_tok", 0) or 0) if text is not None else 0


def resolve_expert_rank(expert_rank: int | str, rank: int, active: int) -> int:
    """`lora.expert_rank`: an integer, or "auto" = max(1, rank // active experts) (the paper's per-expert rank)."""
    if expert_rank == "auto":
        return max(1, rank // max(active, 1))
    return int(expert_rank)


def is_fused_experts(module: nn.Module) -> bool:
    """A transformers 5.x experts module in the layout ExpertLoRA reproduces: gate_up_proj [E, 2F, H] ([gate; up]
    concatenated, not interleaved or transposed), down_proj [E, H, F], no biases, a gated activation."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not (isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter) and gate_up.dim() == 3
            and down.dim() == 3 and hasattr(module, "act_fn")):
        return False
    if getattr(module, "is_transposed", False) or getattr(module, "has_bias", False) \
            or not getattr(module, "is_concatenated", True) or not getattr(module, "has_gate", True):
        return False
    apply_gate = getattr(type(module), "_apply_gate", None)  # a model's own gating (gpt-oss clamps): not ours
    if apply_gate is not None and apply_gate.__name__ != "_default_apply_gate":
        return False
    e, two_f, h = gate_up.shape
    return down.shape == (e, h, two_f // 2) and two_f % 2 == 0


def fused_expert_modules(model: nn.Module) -> list[str]:
    """Paths of the fused experts modules (already wrapped or not), sorted."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, ExpertLoRA):
            names.append(name)
        elif is_fused_experts(module) and not name.endswith(".base"):
            names.append(name)
    return sorted(names)


def is_linear_expert(name: str) -> bool:
    return bool(_LINEAR_EXPERT.search(name))


class ExpertLoRA(nn.Module):
    """A fused experts module with per-expert adapters on gate_proj / up_proj / down_proj; same call signature
    (hidden_states [N, H], top_k_index [N, k], top_k_weights [N, k]) -> [N, H]."""

    def __init__(self, base: nn.Module, routing, model_type: str = ""):
        super().__init__()
        self.base = base
        self.routing = routing
        self.file_names = FILE_NAMES.get(model_type, ("", {}))  # the names its adapter files use (FILE_NAMES)
        self.num_experts = base.gate_up_proj.shape[0]
        self.lora = nn.ParameterDict()  # f"{slot}_{projection}_A" / _B
        self.projections: list[tuple[str, ...]] = []  # per slot: the projections it adapts
        self.scales: list[float] = []
        self.slots: dict[int, int] = {}

    def dims(self, projection: str) -> tuple[int, int]:
        """(d_in, d_out) of one expert's projection."""
        _, two_f, h = self.base.gate_up_proj.shape
        return (two_f // 2, h) if projection == "down_proj" else (h, two_f // 2)

    def add_adapter(self, index: int, projections: list[str], rank: int, alpha: float,
                    generator: torch.Generator | None = None) -> None:
        slot = self.slots[index] = len(self.scales)
        device = self.base.gate_up_proj.device
        for p in EXPERT_PROJECTIONS:
            if p not in projections:
                continue
            d_in, d_out = self.dims(p)
            bound = 1.0 / math.sqrt(d_in)  # PEFT's init, per expert, as for a linear layer
            a = torch.empty(self.num_experts, rank, d_in, dtype=torch.float32).uniform_(-bound, bound,
                                                                                       generator=generator)
            self.lora[f"{slot}_{p}_A"] = nn.Parameter(a.to(device))
            self.lora[f"{slot}_{p}_B"] = nn.Parameter(torch.zeros(self.num_experts, d_out, rank, dtype=torch.float32,
                                                                  device=device))
        self.projections.append(tuple(p for p in EXPERT_PROJECTIONS if p in projections))
        self.scales.append(alpha / rank)

    def _slot_of_assignments(self, n_tokens: int, k: int, perm: torch.Tensor) -> tuple[list[int], torch.Tensor | None]:
        """The adapter slots present in the batch, and each sorted assignment's slot (None: one slot, every row)."""
        segments = self.routing.segments
        if segments is None or len(segments) == 1:
            return [self.slots.get(0 if segments is None else segments[0][0], -1)], None
        per_row = n_tokens // segments[-1][2]
        slot_T = torch.empty(n_tokens, dtype=torch.long, device=perm.device)
        for index, first, end in segments:
            slot_T[first * per_row:end * per_row] = self.slots.get(index, -1)
        return sorted({self.slots.get(index, -1) for index, _, _ in segments}), slot_T[perm // k]

    def _update(self, x: torch.Tensor, projection: str, offsets: torch.Tensor, slots: list[int],
                slot_S: torch.Tensor | None):
        """The adapters' low-rank update s (x A_e^T) B_e^T of every sorted assignment's expert e, as two grouped
        matmuls per adapter; with several adapters each one's rows are kept by a 0/1 mask (rows of other adapters
        get an exact zero). None if no adapter in the batch targets `projection`."""
        out = None
        for slot in slots:
            key = f"{slot}_{projection}_A"
            if slot < 0 or key not in self.lora:
                continue
            A, B = _pad_rank(self.lora[key].to(x.dtype), self.lora[f"{slot}_{projection}_B"].to(x.dtype))
            xa = _grouped_mm(x, A.transpose(1, 2), offsets) * self.scales[slot]  # [S, e]
            if slot_S is not None:
                xa = xa * (slot_S == slot).to(xa.dtype)[:, None]
            low = _grouped_mm(xa, B.transpose(1, 2), offsets)  # [S, d_out]
            out = low if out is None else out + low
        return out

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        base = self.base
        n_tokens, k = top_k_index.shape
        # (token, expert) assignments sorted by expert: every expert's rows are contiguous (the offsets), and each
        # projection is one grouped matmul over all experts (transformers' own grouped_mm path does the same)
        expert_S, perm = torch.sort(top_k_index.reshape(-1))
        x = hidden_states[perm // k]
        offsets = torch.cumsum(torch.bincount(expert_S, minlength=self.num_experts), 0).to(torch.int32)
        slots, slot_S = self._slot_of_assignments(n_tokens, k, perm)
        gate, up = _grouped_mm(x, base.gate_up_proj.transpose(1, 2), offsets).chunk(2, dim=-1)
        dg = self._update(x, "gate_proj", offsets, slots, slot_S)
        du = self._update(x, "up_proj", offsets, slots, slot_S)
        gate = gate if dg is None else gate + dg
        up = up if du is None else up + du
        act = base.act_fn(gate) * up
        y = _grouped_mm(act, base.down_proj.transpose(1, 2), offsets)
        dd = self._update(act, "down_proj", offsets, slots, slot_S)
        y = y if dd is None else y + dd
        y = y * top_k_weights.reshape(-1)[perm].unsqueeze(-1)
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.numel(), device=perm.device)
        return y[inverse].view(n_tokens, k, -1).sum(dim=1).to(hidden_states.dtype)


def _pad_rank(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A [E, e, d_in] and B [E, d_out, e] with zero rank rows / columns up to 16 bytes: torch's grouped_mm kernel
    needs every stride a multiple of 16 bytes ("strides should be multiple of 16 bytes" at rank 1 in fp32). The
    padded product B A is the same; the padding costs a [E, 4, d_in] copy and a few zero FLOPs per row."""
    pad = -A.shape[1] % max(1, 16 // A.element_size())
    if not pad:
        return A, B
    return (torch.cat([A, A.new_zeros(A.shape[0], pad, A.shape[2])], 1),
            torch.cat([B, B.new_zeros(B.shape[0], B.shape[1], pad)], 2))


def _grouped_mm(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x [S, d_in] (rows sorted by group, group g ending at offsets[g]) @ weight[g] [d_in, d_out] per group:
    transformers' dispatcher (torch's grouped_mm kernel where it runs, CPU included; else a per-group loop)."""
    from transformers.integrations.moe import _grouped_mm as grouped

    return grouped(x, weight, offs=offsets)


class ExpertView:
    """Adapter `index` on one projection of one ExpertLoRA, seen as a layer: .lora_A [E, e, d_in], .lora_B
    [E, d_out, e], .rank, .scale (rl_lora.learner.lora.AdapterView's interface, one leading expert axis)."""

    __slots__ = ("module", "slot", "projection")

    def __init__(self, module: ExpertLoRA, index: int, projection: str):
        self.module, self.slot, self.projection = module, module.slots[index], projection

    @property
    def lora_A(self) -> nn.Parameter:
        return self.module.lora[f"{self.slot}_{self.projection}_A"]

    @property
    def lora_B(self) -> nn.Parameter:
        return self.module.lora[f"{self.slot}_{self.projection}_B"]

    @property
    def rank(self) -> int:
        return self.lora_A.shape[1]

    @property
    def scale(self) -> float:
        return self.module.scales[self.slot]

    def peft_keys(self, name: str, prefix: str):
        """[(expert, A key, B key)] of this view, `name` being its path ("...mlp.experts.gate_proj"), in the names
        of the family's checkpoints (FILE_NAMES)."""
        experts = name.rpartition(".")[0]
        block, names = self.module.file_names
        if block:
            experts = experts.replace(".mlp.experts", f".{block}.experts")
        projection = names.get(self.projection, self.projection)
        return [(i, f"{prefix}{experts}.{i}.{projection}.lora_A.weight",
                 f"{prefix}{experts}.{i}.{projection}.lora_B.weight") for i in range(self.module.num_experts)]


def inject_experts(model: nn.Module, index: int, target_modules: list[str], rank: int, alpha: float,
                   generator: torch.Generator, routing) -> dict[str, ExpertView]:
    """Add adapter `index` (per-expert rank `rank`) on the targeted projections of every fused experts module,
    wrapping it in an ExpertLoRA the first time. Returns {"<experts path>.<projection>": ExpertView}."""
    projections = [p for p in EXPERT_PROJECTIONS if p in target_modules]
    views = {}
    if not projections:
        return views
    for name in fused_expert_modules(model):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = getattr(parent, child)
        if not isinstance(layer, ExpertLoRA):
            layer = ExpertLoRA(layer, routing, getattr(model.config, "model_type", ""))
            setattr(parent, child, layer)
        layer.add_adapter(index, projections, rank, alpha, generator)
        for p in projections:
            views[f"{name}.{p}"] = ExpertView(layer, index, p)
    return views


def _file_names(views: dict) -> dict[str, str]:
    return next((v.module.file_names[1] for v in views.values() if isinstance(v, ExpertView)), {})


def file_target_modules(target_modules: list[str], views: dict) -> list[str]:
    """adapter_config.json's target_modules: the expert projections in the names of the family's files."""
    names = _file_names(views)
    return sorted({names.get(t, t) for t in target_modules})


def peft_patterns(views: dict, rank: int, alpha: float) -> tuple[dict, dict]:
    """rank_pattern / alpha_pattern for an adapter whose expert rank differs from its rank (empty otherwise):
    per-expert module names as vLLM matches them (`...experts.3.gate_proj`), and transformers 5's fused
    parameters as PEFT matches them after converting the per-expert keys (`...experts.gate_up_proj`: gate and up
    concatenated, so rank 2e and alpha 2 alpha, keeping alpha/e; PEFT's own conversion assumes 2r)."""
    ranks = {v.rank for v in views.values() if isinstance(v, ExpertView)}
    ranks |= {v.rank for n, v in views.items() if not isinstance(v, ExpertView) and is_linear_expert(n)}
    if not ranks or ranks == {rank}:
        return {}, {}
    (e,) = ranks
    ranks_, alphas = {}, {}
    names = _file_names(views)
    per_expert = r"experts\.\d+\.(" + "|".join(names.get(p, p) for p in EXPERT_PROJECTIONS) + ")"
    ranks_[per_expert] = e
    alphas[per_expert] = alpha
    ranks_[r"experts\.gate_up_proj"] = 2 * e
    alphas[r"experts\.gate_up_proj"] = 2 * alpha
    ranks_[r"experts\.down_proj"] = e
    alphas[r"experts\.down_proj"] = alpha
    return ranks_, alphas
