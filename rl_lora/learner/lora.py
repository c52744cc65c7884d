"""Our own low-rank adapters: W' = W + (alpha/r) B A on every targeted linear layer, base frozen.

Parametrisation follows LoRA Without Regret (and PEFT's defaults, so files load in PEFT and vLLM as they
are): A ~ U(-1/sqrt(d_in), 1/sqrt(d_in)), B = 0, alpha = 32. The update is computed as two skinny matmuls
x -> (x A^T) -> (x A^T) B^T, so a rank-1 adapter adds ~2(d_in + d_out) FLOPs per token and saves only the
layer input (already alive) and a [tokens, r] activation for the backward pass.

One base can carry K adapters at once (a learning-rate sweep, several tenants). Each `LoRALinear` holds
every adapter that targets it, each with its own parameters (so each has its own optimizer and LR); a shared
`Routing` says which contiguous rows of the batch belong to which adapter, and each adapter's update is
applied only to its rows (views, no copies). A gradient of one adapter never touches another: the rows of
adapter k see only A_k and B_k. With one adapter the forward is exactly the single-adapter computation.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rl_lora import atomic
from rl_lora.config import AdapterSpec

PEFT_PREFIX = "base_model.model."


# From this many segments in one micro-batch, a layer routes rows by gathered batched matmuls (_routed) instead of
# two matmuls per segment.
ROUTED_BMM_MIN = 3


class Routing:
    """Row segments of the current batch, [(adapter index, start row, end row)], set by the learner before each
    forward. None = every row under adapter 0."""

    def __init__(self):
        self.segments: list[tuple[int, int, int]] | None = None

    def checkpoint_context(self):
        """For torch.utils.checkpoint's `context_fn`: the recomputation of a checkpointed layer (in backward, after
        later forwards may have changed the routing) runs under the routing its forward saw."""
        saved = self.segments

        @contextlib.contextmanager
        def recompute():
            current, self.segments = self.segments, saved
            try:
                yield
            finally:
                self.segments = current

        return contextlib.nullcontext(), recompute()


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, routing: Routing | None = None):
        super().__init__()
        self.base = base
        self.routing = routing or Routing()
        self.lora_A = nn.ParameterList()
        self.lora_B = nn.ParameterList()
        self.scales: list[float] = []
        self.slots: dict[int, int] = {}  # adapter index -> position in lora_A / lora_B
        # position -> trainable scalars s of a sub-rank-1 adapter (rl_lora/learner/tinylora.py), whose lora_A / lora_B at that
        # position are its fixed directions V^T / U (frozen) and whose B is U diag(s); s may be shared with other layers
        self.gains = nn.ParameterDict()
        self._route_cache = None  # (segments, slots used, row -> position in them, their scales): see _routed

    def add_adapter(self, index: int, rank: int, alpha: float, generator: torch.Generator | None = None) -> None:
        d_out, d_in = self.base.weight.shape
        bound = 1.0 / math.sqrt(d_in)
        a = torch.empty(rank, d_in, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
        # Adapters are kept in fp32 (tiny) whatever the base dtype; cast at use.
        self.slots[index] = len(self.lora_A)
        self.lora_A.append(nn.Parameter(a.to(self.base.weight.device)))
        self.lora_B.append(nn.Parameter(torch.zeros(d_out, rank, dtype=torch.float32, device=self.base.weight.device)))
        self.scales.append(alpha / rank)

    def add_fixed(self, index: int, A: torch.Tensor, U: torch.Tensor, gains: nn.Parameter, scale: float) -> None:
        """A sub-rank-1 adapter (rl_lora/learner/tinylora.py): fixed A = V^T [r, d_in] and U [d_out, r], trainable gains [r]."""
        self.slots[index] = len(self.lora_A)
        self.gains[str(len(self.lora_A))] = gains
        self.lora_A.append(nn.Parameter(A, requires_grad=False))
        self.lora_B.append(nn.Parameter(U, requires_grad=False))
        self.scales.append(scale)

    def B(self, slot: int) -> torch.Tensor:
        """The B of a slot: its parameter, or U diag(s) for a sub-rank-1 adapter."""
        gains = self.gains.get(str(slot)) if len(self.gains) else None
        return self.lora_B[slot] if gains is None else self.lora_B[slot] * gains

    def _low(self, index: int, x: torch.Tensor) -> torch.Tensor:
        i = self.slots[index]
        # the scale multiplies the [tokens, r] intermediate, not the [tokens, d_out] result
        return F.linear(self.scales[i] * F.linear(x, self.lora_A[i].to(x.dtype)), self.B(i).to(x.dtype))

    def active_slot(self) -> int | None:
        """The slot of the one adapter applied to every row of the current batch; -1 if none is; None if the
        batch mixes adapters (then only `forward` knows how to route it)."""
        segments = self.routing.segments
        if segments is not None and len(segments) > 1:
            return None
        index = 0 if segments is None else segments[0][0]
        return self.slots.get(index, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        slot = self.active_slot()
        if slot is not None:
            if slot < 0:
                return out
            xa = F.linear(x, self.lora_A[slot].to(x.dtype))
            return _add_low_rank(out, xa, self.B(slot).to(x.dtype), self.scales[slot])
        segments = self.routing.segments
        if not any(k in self.slots for k, _, _ in segments):
            return out
        if len(segments) >= ROUTED_BMM_MIN and x.dim() == 3:
            routed = self._routed(out, x, segments)
            if routed is not None:
                return routed
        # split/cat, not per-segment indexing: their backward is one cat/split, where indexing would materialise a
        # full-size zero gradient per segment (measured 1.5x slower at K = 4).
        rows = x.split([e - s for _, s, e in segments])
        lows = [self._low(k, xs) if k in self.slots else out.new_zeros(xs.shape[:-1] + out.shape[-1:])
                for (k, _, _), xs in zip(segments, rows)]
        return out + torch.cat(lows)

    def _routed(self, out: torch.Tensor, x: torch.Tensor, segments) -> torch.Tensor | None:
        """Many segments in one pass: the segments' A and B stacked (one stack op each, whose backward hands each
        adapter its own gradient), gathered per row, two batched matmuls. Its cost does not grow with the number
        of segments, where the split/cat path runs two matmuls per segment. None (use that path) if a segment's
        adapter is not in this layer or the ranks differ."""
        cached = self._route_cache
        if cached is None or cached[0] is not segments:
            slots = [self.slots.get(k) for k, _, _ in segments]
            if None in slots or len({self.lora_A[i].shape[0] for i in slots}) != 1:
                self._route_cache = (segments, None, None, None)
            else:
                used = sorted(set(slots))
                where = {s: j for j, s in enumerate(used)}
                row = torch.repeat_interleave(torch.tensor([where[s] for s in slots]),
                                              torch.tensor([e - s for _, s, e in segments])).to(x.device)
                scale = torch.tensor([self.scales[i] for i in used], dtype=torch.float32, device=x.device)
                self._route_cache = (segments, used, row, scale)
        _, used, row, scale = self._route_cache
        if used is None:
            return None
        A = torch.stack([self.lora_A[i] for i in used]).to(x.dtype)  # [S, r, d_in]
        B = torch.stack([self.B(i) for i in used]).to(x.dtype)  # [S, d_out, r]
        xa = torch.bmm(x, A.transpose(1, 2)[row]) * scale.to(x.dtype)[row, None, None]  # [rows, T, r]
        return torch.baddbmm(out, xa, B.transpose(1, 2)[row])


def _add_low_rank(out: torch.Tensor, xa: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """out + scale * xa B^T as one addmm: no [tokens, d_out] temporaries for the scale or the sum, forward or
    backward (measured ~5% of a rank-1 learner step on CPU)."""
    return torch.addmm(out.reshape(-1, out.shape[-1]), xa.reshape(-1, xa.shape[-1]), B.t(), alpha=scale).view(out.shape)


class _SwiGLUDown(torch.autograd.Function):
    """down(silu(gate) * up) + scale * (act A^T) B^T with a frozen `down` weight, saving only gate and up (and the
    [tokens, r] intermediate): the [tokens, d_ff] silu(gate) and act = silu(gate) * up that autograd would keep
    (silu's output for the product, act for dA) are recomputed in backward, one cheap elementwise pass."""

    @staticmethod
    def forward(ctx, gate, up, weight, bias, A, B, scale):
        act = F.silu(gate) * up
        out = F.linear(act, weight, bias)
        xa = None
        if A is not None:
            xa = F.linear(act, A)
            out = _add_low_rank(out, xa, B, scale)
        ctx.scale = scale
        ctx.save_for_backward(gate, up, weight, A, B, xa)
        return out

    @staticmethod
    def backward(ctx, grad):
        gate, up, weight, A, B, xa = ctx.saved_tensors
        sig = torch.sigmoid(gate)
        silu = gate * sig
        g2 = grad.reshape(-1, grad.shape[-1])
        dact = (g2 @ weight).view(gate.shape)
        dA = dB = None
        if A is not None:
            gB = ctx.scale * (g2 @ B)  # [tokens, r]
            dact = dact.view(-1, dact.shape[-1]).addmm_(gB, A).view(gate.shape)
            if ctx.needs_input_grad[4]:
                dA = gB.t() @ (silu * up).reshape(-1, gate.shape[-1])
            if ctx.needs_input_grad[5]:
                dB = ctx.scale * g2.t() @ xa.reshape(-1, xa.shape[-1])
        d_up = dact * silu if ctx.needs_input_grad[1] else None
        d_gate = dact * up * sig * (1 + gate * (1 - sig)) if ctx.needs_input_grad[0] else None
        return d_gate, d_up, None, None, dA, dB, None


def fuse_swiglu(model: nn.Module) -> int:
    """Give every SwiGLU MLP (gate_proj, up_proj, down_proj, SiLU: Llama, Qwen, Mistral families) whose down
    projection is frozen a forward through `_SwiGLUDown` (exact; less activation memory). Returns how many."""
    count = 0
    for module in model.modules():
        down = getattr(module, "down_proj", None)
        if not (hasattr(module, "gate_proj") and hasattr(module, "up_proj") and down is not None
                and type(getattr(module, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation")):
            continue
        base = down.base if isinstance(down, LoRALinear) else down
        if not isinstance(base, nn.Linear) or base.weight.requires_grad:
            continue
        module.forward = _fused_mlp_forward.__get__(module)
        count += 1
    return count


def _fused_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    gate, up = self.gate_proj(x), self.up_proj(x)
    down = self.down_proj
    slot = down.active_slot() if isinstance(down, LoRALinear) else -1
    if slot is None:  # a batch that mixes adapters: the routed layer
        return down(F.silu(gate) * up)
    base = down.base if isinstance(down, LoRALinear) else down
    if slot < 0:
        return _SwiGLUDown.apply(gate, up, base.weight, base.bias, None, None, 1.0)
    return _SwiGLUDown.apply(gate, up, base.weight, base.bias, down.lora_A[slot].to(x.dtype),
                             down.B(slot).to(x.dtype), down.scales[slot])


class AdapterView:
    """Adapter `index` of one LoRALinear, seen as a single-adapter layer (.lora_A, .lora_B, .rank, .scale)."""

    __slots__ = ("module", "slot")

    def __init__(self, module: LoRALinear, index: int):
        self.module, self.slot = module, module.slots[index]

    @property
    def lora_A(self) -> nn.Parameter:
        return self.module.lora_A[self.slot]

    @property
    def lora_B(self) -> torch.Tensor:
        """The parameter B; for a sub-rank-1 adapter, U diag(s) (computed)."""
        return self.module.B(self.slot)

    @property
    def base(self) -> nn.Linear:
        return self.module.base

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    @property
    def scale(self) -> float:
        return self.module.scales[self.slot]


def _targets(model: nn.Module, target_modules: list[str], key: str) -> list[str]:
    """Linear layers whose name ends with a target suffix; a target may instead name a projection of fused MoE
    experts (rl_lora/learner/moe.py), which are not linear layers."""
    from rl_lora.learner.moe import EXPERT_PROJECTIONS, fused_expert_modules

    fused = bool(fused_expert_modules(model))
    experts = [p for p in EXPERT_PROJECTIONS if p in target_modules] if fused else []
    what = "linear layer or MoE expert projection" if fused else "linear layer"
    names = []
    for name, module in model.named_modules():
        leaf = name.split(".")[-1]
        if isinstance(module, LoRALinear):
            continue
        if leaf == "base" and isinstance(model.get_submodule(name.rpartition(".")[0]), LoRALinear):
            name = name.rpartition(".")[0]  # already wrapped by an earlier adapter
            leaf = name.split(".")[-1]
        elif not isinstance(module, nn.Linear):
            continue
        if leaf in target_modules and "lm_head" not in name:
            names.append(name)
    if not names and not experts:
        raise ValueError(f"{key} {target_modules} match no {what} of the model")
    found = {n.split(".")[-1] for n in names} | set(experts)
    missing = [m for m in target_modules if m not in found]
    if missing:
        raise ValueError(f"{key}: {missing} match no {what} of the model")
    return sorted(names)  # sorted: the init does not depend on module registration order


def wrap(model: nn.Module, name: str, routing: Routing) -> LoRALinear:
    """The LoRALinear at module path `name`, wrapping the linear layer there on first use."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    layer = getattr(parent, child)
    if not isinstance(layer, LoRALinear):
        layer = LoRALinear(layer, routing)
        setattr(parent, child, layer)
    return layer


def inject_adapters(model: nn.Module, specs: list[AdapterSpec]) -> tuple[Routing, list[dict[str, AdapterView]]]:
    """Wrap every linear layer that some adapter targets; add each adapter where it is targeted; freeze the rest.

    Returns the shared routing and, per adapter, {module path: AdapterView}. Raises ValueError if a spec's
    target_modules match no module (a typo). MoE experts get the spec's expert rank (rl_lora/learner/moe.py).
    """
    from rl_lora.learner import moe, tinylora

    for p in model.parameters():
        p.requires_grad_(False)
    routing = Routing()
    sets = []
    for index, spec in enumerate(specs):
        key = "lora.target_modules" if len(specs) == 1 else f"adapters[{index}].target_modules"
        if spec.scalars is not None:  # a sub-rank-1 adapter: its own init and parameters
            names = _targets(model, spec.target_modules, key)
            sets.append(tinylora.inject(model, index, spec, {n: wrap(model, n, routing) for n in names}))
            continue
        gen = torch.Generator().manual_seed(spec.seed)
        views = {}
        expert_rank = moe.resolve_expert_rank(spec.expert_rank, spec.rank, moe.active_experts(model))
        for name in _targets(model, spec.target_modules, key):
            layer = wrap(model, name, routing)
            layer.add_adapter(index, expert_rank if moe.is_linear_expert(name) else spec.rank, spec.alpha, gen)
            views[name] = AdapterView(layer, index)
        views.update(moe.inject_experts(model, index, spec.target_modules, expert_rank, spec.alpha, gen, routing))
        sets.append(views)
    return routing, sets


def adapter_parameters(adapters: dict[str, AdapterView], lora_plus_ratio: float, lr: float) -> list[dict]:
    """Optimizer parameter groups: A at lr, B at lr * lora_plus_ratio (LoRA+; 1.0 = same LR); a sub-rank-1 adapter's
    scalars at lr (rl_lora/learner/tinylora.py)."""
    from rl_lora.learner import tinylora

    if tinylora.is_scalars(adapters):
        return [{"params": tinylora.scalars_of(adapters), "lr": lr, "name": "scalars"}]
    a_params = [m.lora_A for m in adapters.values()]
    b_params = [m.lora_B for m in adapters.values()]
    return [{"params": a_params, "lr": lr, "name": "lora_A"},
            {"params": b_params, "lr": lr * lora_plus_ratio, "name": "lora_B"}]


# ----------------------------------------------------------------------------------------------------------
# PEFT-format files (adapter_config.json + adapter_model.safetensors), loadable by PEFT and `vllm serve`.


def _peft_pairs(adapters: dict[str, AdapterView]):
    """(A key, B key, A tensor, B tensor) per PEFT module: one per linear layer, one per expert of fused MoE experts
    (their [E, ...] parameters indexed by expert: views)."""
    for name, m in adapters.items():
        if hasattr(m, "peft_keys"):
            for i, key_a, key_b in m.peft_keys(name, PEFT_PREFIX):
                yield key_a, key_b, m.lora_A[i], m.lora_B[i]
        else:
            yield f"{PEFT_PREFIX}{name}.lora_A.weight", f"{PEFT_PREFIX}{name}.lora_B.weight", m.lora_A, m.lora_B


def peft_state_dict(adapters: dict[str, AdapterView]) -> dict[str, torch.Tensor]:
    out = {}
    for key_a, key_b, a, b in _peft_pairs(adapters):
        out[key_a] = a.detach().to("cpu", torch.float32).contiguous()
        out[key_b] = b.detach().to("cpu", torch.float32).contiguous()
    return out


def peft_tensor_views(adapters: dict[str, AdapterView]) -> dict[str, torch.Tensor]:
    """peft_state_dict's keys, mapped to the live parameters (or their views) themselves: no copy, any device."""
    return {key: t for key_a, key_b, a, b in _peft_pairs(adapters) for key, t in ((key_a, a), (key_b, b))}


def copy_peft_tensors(adapters: dict[str, AdapterView], tensors: dict[str, torch.Tensor], where: str = "") -> None:
    """Copy PEFT-named tensors (peft_state_dict's keys) into the adapters' parameters, in place."""
    from rl_lora.learner import tinylora

    if tinylora.is_scalars(adapters):  # B = U diag(s) does not give s back bit for bit
        raise ValueError(f"adapter{where}: a scalars adapter is restored from its {tinylora.STATE_FILE}, not from A and B")
    with torch.no_grad():
        for key_a, key_b, a, b in _peft_pairs(adapters):
            for key, param in ((key_a, a), (key_b, b)):
                if key not in tensors:
                    raise ValueError(f"adapter{where} lacks {key}")
                if tensors[key].shape != param.shape:
                    raise ValueError(f"adapter{where}: {key} has shape {tuple(tensors[key].shape)}, "
                                     f"expected {tuple(param.shape)} (different rank or model?)")
                param.copy_(tensors[key])


def peft_config(rank: int, alpha: float, target_modules: list[str], base_model: str,
                adapters: dict[str, AdapterView] | None = None) -> dict:
    """adapter_config.json; `adapters` adds the MoE experts' rank/alpha patterns where their rank is not `rank`."""
    from rl_lora.learner.moe import file_target_modules, peft_patterns

    rank_pattern, alpha_pattern = peft_patterns(adapters or {}, rank, alpha)
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
        "target_modules": file_target_modules(target_modules, adapters or {}), "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "modules_to_save": None,
        "init_lora_weights": True, "base_model_name_or_path": base_model, "inference_mode": True,
        **({"rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern} if rank_pattern else {}),
    }


def write_peft_adapter(path: str | Path, tensors: dict[str, torch.Tensor], config: dict,
                       extra: dict[str, dict[str, torch.Tensor]] | None = None) -> None:
    """Write both files (and `extra` safetensors files by name: a sub-rank-1 adapter's state, rl_lora/learner/tinylora.py) into
    `path` atomically (a temp dir renamed into place). Not fsynced: a push to the engine needs none, and a checkpoint
    or the final export fsyncs the folder it is in."""
    from safetensors.torch import save_file

    def fill(tmp: Path) -> None:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        for name, more in (extra or {}).items():
            save_file(more, str(tmp / name), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))

    atomic.write_dir(path, fill, durable=False)


def load_peft_adapter(path: str | Path, adapters: dict[str, AdapterView]) -> dict:
    """Copy a PEFT adapter's tensors into our modules (shapes must match); a sub-rank-1 adapter's scalars and
    directions from its own file. Returns its config."""
    from safetensors.torch import load_file

    from rl_lora.learner import tinylora

    path = Path(path)
    config = json.loads((path / "adapter_config.json").read_text())
    if tinylora.is_scalars(adapters):
        tinylora.load_state(path, adapters)
        return config
    tensors = load_file(str(path / "adapter_model.safetensors"))
    copy_peft_tensors(adapters, tensors, f" at {path}")
    return config
