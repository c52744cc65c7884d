"""Sub-rank-1 adapters (`lora.trainable: scalars`): a few trainable scalars per module, through fixed directions.

After TinyLoRA ("Learning to Reason in 13 Parameters", 2026: RL gains on GSM8K with 13 trained parameters, and only
with RL). Each adapted linear layer W [d_out, d_in] gets r = `scalars.count` fixed pairs of unit directions
(u_i, v_i) and its update is

    dW = (alpha / r) * sum_i s_i u_i v_i^T = (alpha / r) U diag(s) V^T,

with s in R^r trained and shared by every module of its share group: `none` (each module its own s), `layer` (the
modules of one decoder layer), `model` (one s for the whole model: r parameters in all).

- Init s = 0: the policy is the base, as with LoRA's B = 0; but the first gradient is not zero (U and V are fixed
  and nonzero): dL/ds_i = (alpha/r) sum over tokens of (g . u_i)(v_i . x), g = dL/d(output), x = the layer input.
- Directions: `random` = orthonormal columns (QR of a Gaussian) from a generator seeded by (seed, module path), so
  the same seed and targets give the same directions whatever the other adapters; `svd` = the top-r singular
  vectors of the frozen weight (exact SVD in float64; randomised, seeded, for matrices over SVD_EXACT_MAX). Both are
  unit-norm, so s means the same in both: the update's singular value along each direction, times alpha/r.
- Export: a standard PEFT LoRA of rank r, A = V^T and B = U diag(s), lora_alpha = alpha: PEFT and vLLM compute
  exactly the learner's (alpha/r) (x A^T) B^T, and r = 1 takes the rank-1 sampling path.
- State: s and the directions are also written beside the PEFT files (STATE_FILE), and a checkpoint restores them
  from there bit for bit (B = U diag(s) does not give s back exactly). PEFT and vLLM read only their own files.

The hooks elsewhere are small: `lora.LoRALinear.add_fixed` / `.B(slot)` (B = U diag(s) at use), the dispatch in
`lora.inject_adapters`, `lora.adapter_parameters` (the optimizer sees only the scalars), the state file in
`Learner.write_adapter` / `lora.load_peft_adapter`; `policy.Adapters` swaps the previous version in for the push
check as the learner's trainable parameters (for LoRA: A and B, as before), not as PEFT tensors.
"""

from __future__ import annotations

import re
import zlib
from pathlib import Path

import torch
from torch import nn

STATE_FILE = "scalars.safetensors"
SVD_EXACT_MAX = 2048  # min(d_out, d_in) up to which the SVD is exact (float64, CPU)
_LAYER = re.compile(r"^(.*?\.\d+)\.")  # "model.layers.3.self_attn.q_proj" -> "model.layers.3"


def group_of(name: str, share: str) -> str:
    """The share group of module `name`: itself (none), its decoder layer (layer), or the model (model)."""
    if share == "model":
        return "model"
    if share == "layer":
        m = _LAYER.match(name)
        return m.group(1) if m else name
    return name


def num_scalars(names: list[str], count: int, share: str) -> int:
    """Trainable scalars of a scalars adapter on modules `names`: count per share group."""
    return count * len({group_of(n, share) for n in names})


def random_directions(name: str, d_out: int, d_in: int, r: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(U [d_out, r], V^T [r, d_in]) with orthonormal columns / rows, from a generator seeded by (seed, name)."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
    U = torch.linalg.qr(torch.randn(d_out, r, generator=gen, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(d_in, r, generator=gen, dtype=torch.float64))[0]
    return U.float().contiguous(), V.t().float().contiguous()  # row-major, as svd_directions: the same matmul paths


def svd_directions(weight: torch.Tensor, r: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(U [d_out, r], V^T [r, d_in]): the top-r singular vectors of `weight`."""
    w = weight.detach().double().cpu()
    if min(w.shape) <= SVD_EXACT_MAX:
        U, _, Vh = torch.linalg.svd(w, full_matrices=False)
    else:  # randomised subspace iteration: large matrices in seconds, not minutes
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            U, _, V = torch.svd_lowrank(w, q=min(r + 16, min(w.shape)), niter=6)
        Vh = V.t()
    return U[:, :r].float().contiguous(), Vh[:r].float().contiguous()


def inject(model: nn.Module, index: int, spec, layers: dict) -> dict:
    """Adapter `index` (`spec.scalars` a ScalarsConfig) on each LoRALinear of `layers` {module path: layer}: fixed
    directions, one zero-initialised scalar vector per share group. Returns {module path: AdapterView}."""
    from rl_lora.learner.lora import AdapterView
    from rl_lora.learner.moe import EXPERT_PROJECTIONS, fused_expert_modules

    sc = spec.scalars
    if fused_expert_modules(model) and any(t in EXPERT_PROJECTIONS for t in spec.target_modules):
        raise ValueError("lora.trainable: scalars adapts linear layers only, not fused MoE experts")
    seed = spec.seed if sc.seed < 0 else sc.seed
    gains: dict[str, nn.Parameter] = {}
    views = {}
    for name in sorted(layers):
        layer = layers[name]
        weight = layer.base.weight
        d_out, d_in = weight.shape
        if sc.count > min(d_out, d_in):
            raise ValueError(f"lora.scalars.count: {sc.count} directions exceed {name}'s smallest dimension "
                             f"({min(d_out, d_in)})")
        U, A = (svd_directions(weight, sc.count, seed) if sc.directions == "svd"
                else random_directions(name, d_out, d_in, sc.count, seed))
        group = group_of(name, sc.share)
        if group not in gains:
            gains[group] = nn.Parameter(torch.zeros(sc.count, device=weight.device))
        layer.add_fixed(index, A.to(weight.device), U.to(weight.device), gains[group], spec.alpha / sc.count)
        views[name] = AdapterView(layer, index)
    return views


def gains_of(view) -> nn.Parameter | None:
    """The scalars of one module's view (an AdapterView), or None for a LoRA adapter (MoE experts' views included)."""
    gains = getattr(getattr(view, "module", None), "gains", None)
    return gains[str(view.slot)] if gains is not None and str(view.slot) in gains else None


def is_scalars(views: dict) -> bool:
    return any(gains_of(v) is not None for v in views.values())


def scalars_of(views: dict) -> list[nn.Parameter]:
    """The adapter's trainable parameters: each share group's scalars once, in module order."""
    out = {}
    for name in sorted(views):
        g = gains_of(views[name])
        out.setdefault(id(g), g)
    return list(out.values())


def state_tensors(views: dict) -> dict[str, torch.Tensor]:
    """Everything a scalars adapter is, by name: `scalars.<i>` (the share groups' s, in scalars_of order) and each
    module's `U.<path>` [d_out, r] and `Vt.<path>` [r, d_in]."""
    out = {f"scalars.{i}": g.detach().cpu().clone() for i, g in enumerate(scalars_of(views))}
    for name, v in views.items():
        out[f"U.{name}"] = v.module.lora_B[v.slot].detach().cpu().clone()
        out[f"Vt.{name}"] = v.module.lora_A[v.slot].detach().cpu().clone()
    return out


def state_files(views: dict) -> dict[str, dict[str, torch.Tensor]]:
    """Files to write beside the PEFT ones: {STATE_FILE: state_tensors} for a scalars adapter, {} for LoRA."""
    return {STATE_FILE: state_tensors(views)} if is_scalars(views) else {}


def load_state(path: str | Path, views: dict) -> None:
    """Restore s and the directions bit for bit from `path`/STATE_FILE (Learner.write_adapter's)."""
    from safetensors.torch import load_file

    file = Path(path) / STATE_FILE
    if not file.is_file():
        raise ValueError(f"adapter at {path}: no {STATE_FILE} (a LoRA adapter, not a scalars one?)")
    saved = load_file(str(file))
    targets = [(f"scalars.{i}", g) for i, g in enumerate(scalars_of(views))]
    for name, v in views.items():
        targets += [(f"U.{name}", v.module.lora_B[v.slot]), (f"Vt.{name}", v.module.lora_A[v.slot])]
    extra = sorted(set(saved) - {key for key, _ in targets})
    if extra:
        raise ValueError(f"adapter at {path}: {extra[0]} is not part of this adapter (a different count, share or "
                         "targets?)")
    with torch.no_grad():
        for key, param in targets:
            if key not in saved or saved[key].shape != param.shape:
                got = "missing" if key not in saved else f"shape {tuple(saved[key].shape)}"
                raise ValueError(f"adapter at {path}: {key} is {got}, expected {tuple(param.shape)} (a different "
                                 "count, share or targets?)")
            param.copy_(saved[key])
