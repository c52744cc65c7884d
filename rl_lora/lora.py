"""Our own low-rank adapter: W' = W + (alpha/r) B A on every targeted linear layer, base frozen.

Parametrisation follows LoRA Without Regret (and PEFT's defaults, so files load in PEFT and vLLM as they
are): A ~ U(-1/sqrt(d_in), 1/sqrt(d_in)), B = 0, alpha = 32. The update is computed as two skinny matmuls
x -> (x A^T) -> (x A^T) B^T, so a rank-1 adapter adds ~2(d_in + d_out) FLOPs per token and saves only the
layer input (already alive) and a [tokens, r] activation for the backward pass.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

PEFT_PREFIX = "base_model.model."


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator | None = None):
        super().__init__()
        self.base = base
        self.rank = rank
        self.scale = alpha / rank
        d_out, d_in = base.weight.shape
        bound = 1.0 / math.sqrt(d_in)
        a = torch.empty(rank, d_in, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
        # Adapters are kept in fp32 (tiny) whatever the base dtype; cast at use.
        self.lora_A = nn.Parameter(a.to(base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(d_out, rank, dtype=torch.float32, device=base.weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        low = F.linear(F.linear(x, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))
        return out + self.scale * low


def inject_lora(model: nn.Module, target_modules: list[str], rank: int, alpha: float, seed: int) -> dict[str, LoRALinear]:
    """Replace every nn.Linear whose name ends with a target suffix; freeze everything else.

    Returns {module path: LoRALinear}. Raises ValueError if no module matches (a typo in target_modules).
    """
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    targets = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.split(".")[-1] in target_modules and "lm_head" not in name:
            targets.append(name)
    if not targets:
        raise ValueError(f"lora.target_modules {target_modules} match no linear layer of the model")
    found = {name.split(".")[-1] for name in targets}
    missing = [m for m in target_modules if m not in found]
    if missing:
        raise ValueError(f"lora.target_modules: {missing} match no linear layer of the model")
    adapters = {}
    for name in sorted(targets):  # sorted: the init does not depend on module registration order
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        wrapped = LoRALinear(getattr(parent, child), rank, alpha, gen)
        setattr(parent, child, wrapped)
        adapters[name] = wrapped
    return adapters


def adapter_parameters(adapters: dict[str, LoRALinear], lora_plus_ratio: float, lr: float) -> list[dict]:
    """Optimizer parameter groups: A at lr, B at lr * lora_plus_ratio (LoRA+; 1.0 = same LR)."""
    a_params = [m.lora_A for m in adapters.values()]
    b_params = [m.lora_B for m in adapters.values()]
    return [{"params": a_params, "lr": lr, "name": "lora_A"},
            {"params": b_params, "lr": lr * lora_plus_ratio, "name": "lora_B"}]


def num_adapter_parameters(adapters: dict[str, LoRALinear]) -> int:
    return sum(m.lora_A.numel() + m.lora_B.numel() for m in adapters.values())


# ----------------------------------------------------------------------------------------------------------
# PEFT-format files (adapter_config.json + adapter_model.safetensors), loadable by PEFT and `vllm serve`.


def peft_state_dict(adapters: dict[str, LoRALinear]) -> dict[str, torch.Tensor]:
    out = {}
    for name, m in adapters.items():
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.detach().to("cpu", torch.float32).contiguous()
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.detach().to("cpu", torch.float32).contiguous()
    return out


def peft_config(rank: int, alpha: float, target_modules: list[str], base_model: str) -> dict:
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
        "target_modules": sorted(target_modules), "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "modules_to_save": None,
        "init_lora_weights": True, "base_model_name_or_path": base_model, "inference_mode": True,
    }


def write_peft_adapter(path: str | Path, tensors: dict[str, torch.Tensor], config: dict) -> None:
    """Write both files into `path` atomically (a temp dir renamed into place)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
    if path.exists():
        import shutil

        shutil.rmtree(path)
    os.replace(tmp, path)


def load_peft_adapter(path: str | Path, adapters: dict[str, LoRALinear]) -> dict:
    """Copy a PEFT adapter's tensors into our modules (shapes must match). Returns its config."""
    from safetensors.torch import load_file

    path = Path(path)
    config = json.loads((path / "adapter_config.json").read_text())
    tensors = load_file(str(path / "adapter_model.safetensors"))
    for name, m in adapters.items():
        for part, param in (("lora_A", m.lora_A), ("lora_B", m.lora_B)):
            key = f"{PEFT_PREFIX}{name}.{part}.weight"
            if key not in tensors:
                raise ValueError(f"adapter at {path} lacks {key}")
            if tensors[key].shape != param.shape:
                raise ValueError(f"adapter at {path}: {key} has shape {tuple(tensors[key].shape)}, "
                                 f"expected {tuple(param.shape)} (different rank or model?)")
            with torch.no_grad():
                param.copy_(tensors[key])
    return config
