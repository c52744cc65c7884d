"""The output layer of each model family, as the learner must reproduce it.

The learner computes logits itself (rl_lora/learner/learner.py: only at completion positions, in chunks, with its own
backward), so it must apply whatever a family's `ForCausalLM.forward` does after the last hidden state, or its
logprobs differ from the model's own `log_softmax(model(ids).logits / T)` and from the sampler's (vLLM applies
the same transforms in its logits processor). Families with a transform, from transformers' modeling code:
- final-logit soft-capping z -> c tanh(z / c): Gemma-2/3/3n/4, VaultGemma, nanochat (`final_logit_softcapping`),
  RecurrentGemma (`logits_soft_cap`);
- a scale: Granite (all variants) divides by `logits_scaling`, MiniCPM3 divides its hidden state by it; Cohere
  multiplies by `logit_scale`, Falcon-H1 by `lm_head_multiplier`, HyperCLOVA X by `logits_scaling`;
- an lm_head bias (Phi-1/2): taken from the module itself at load.

Any other architecture must compute `logits = self.<head>(hidden_states[...])` and nothing more; `check_output_layer`
reads the family's forward source and refuses one that does more (one line naming it, before any model loads),
and the learner verifies its logprobs against the model's own forward once at load (Learner._check_head).
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass

import torch

from rl_lora.config import ConfigError

_SOFTCAP = {t: "final_logit_softcapping" for t in (
    "gemma2", "gemma3_text", "gemma3n_text", "gemma4_text", "gemma4_unified_text", "vaultgemma", "nanochat")}
_SOFTCAP["recurrent_gemma"] = "logits_soft_cap"
_DIVIDE = {t: "logits_scaling" for t in (
    "granite", "granite_swa", "granitemoe", "granitemoe_swa", "granitemoehybrid", "granitemoeshared", "minicpm3")}
_MULTIPLY = {"cohere": "logit_scale", "cohere2": "logit_scale", "cohere2_moe": "logit_scale",
             "cohere_compass_text": "logit_scale", "falcon_h1": "lm_head_multiplier", "hyperclovax": "logits_scaling"}
KNOWN = set(_SOFTCAP) | set(_DIVIDE) | set(_MULTIPLY)

# The one line a plain head's forward computes logits with (optionally cast), as transformers writes it.
_PLAIN = re.compile(r"(\w*logits) = self\.\w+\(hidden_states(\[:, slice_indices, :\])?(\.to\([^()]*\))?\)"
                    r"(\.float\(\)|\.contiguous\(\))?$")
_ASSIGN = re.compile(r"^(\w*logits|hidden_states)(\[.*\])? = (.*)$")
_HIDDEN_OK = re.compile(r"(outputs|\w+_outputs)(\.last_hidden_state|\[0\])$")


@dataclass(frozen=True)
class Head:
    """logits = softcap(scale * (h W^T + b)), softcap(z) = c tanh(z / c); the bias lives on the module."""

    scale: float = 1.0
    softcap: float | None = None

    def describe(self) -> str:
        parts = ([f"x {self.scale:g}"] if self.scale != 1.0 else []) + (
            [f"soft-cap {self.softcap:g}"] if self.softcap else [])
        return ", ".join(parts) or "plain"


def head_of(config) -> Head:
    """The output transform of a (loaded or AutoConfig) model config. Raises ConfigError for a nonsensical value."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = text.model_type
    scale, softcap = 1.0, None
    if model_type in _SOFTCAP:
        softcap = getattr(text, _SOFTCAP[model_type], None) or None
        if softcap is not None and not softcap > 0:
            raise ConfigError(f"model.path: {_SOFTCAP[model_type]} = {softcap} (must be > 0)")
    if model_type in _DIVIDE:
        value = getattr(text, _DIVIDE[model_type], 1.0) or 1.0
        scale = 1.0 / value
    if model_type in _MULTIPLY:
        value = getattr(text, _MULTIPLY[model_type], 1.0)
        scale = 1.0 if value is None else float(value)
    if not scale > 0:
        raise ConfigError(f"model.path: the {model_type} logit scale is {scale:g} (must be > 0)")
    return Head(scale=float(scale), softcap=None if softcap is None else float(softcap))


def attn_implementation(config) -> str | None:
    """The attention the learner must load the model with, None for transformers' default. Attention-logit
    soft-capping (Gemma-2's `attn_logit_softcapping`) is applied by eager attention (and by vLLM's), but silently
    dropped by the default SDPA: on the tiny Gemma-2 that moved logits by 4e-3 and the sampler/learner gap on the
    probe from 4e-7 to 8e-4 per token (issue 15). Eager keeps [heads, L, L] scores: more memory at long contexts."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return "eager" if getattr(text, "attn_logit_softcapping", None) else None


def unsupported_line(cls) -> str | None:
    """The first line of `cls.forward` that changes the hidden state or the logits beyond a plain head, if any."""
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return None
    after_backbone = False
    for raw in source.splitlines():
        line = raw.strip()
        if line.startswith("#"):
            continue
        line = line.split("  #")[0].strip()
        if re.match(r"^\w*outputs(: \w+)? = self\.\w+\(", line):
            after_backbone = True
            continue
        m = _ASSIGN.match(line)
        if not (after_backbone and m):
            continue
        name, _, value = m.groups()
        if name == "hidden_states":
            if not _HIDDEN_OK.match(value):
                return line
        elif not _PLAIN.match(line):
            return line
    return None


def check_output_layer(model_path: str) -> Head:
    """Before any model loads: the model's config is readable, and its output layer is one the learner reproduces.
    Returns its Head. Raises ConfigError (one line naming the feature) otherwise."""
    import transformers
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"model.path: transformers cannot read the config of {model_path} ({first})") from None
    head = head_of(config)
    text_type = (config.get_text_config() if hasattr(config, "get_text_config") else config).model_type
    if text_type in KNOWN:
        return head
    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
    if name is None:
        raise ConfigError(f"model.path: model_type {config.model_type!r} has no causal-LM class in transformers "
                          f"{transformers.__version__}")
    cls = getattr(transformers, name, None)
    line = unsupported_line(cls) if cls is not None else None
    if line is not None:
        raise ConfigError(f"model.path: {name} transforms its output logits in a way the learner does not "
                          f"reproduce (`{line}`); this architecture is not supported")
    return head


def logits(hidden_N: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, head: Head,
           inv_temperature: float) -> torch.Tensor:
    """[N, V] fp32 logits / T of the model's own output layer (differentiable: the full fine-tuning path)."""
    z = torch.nn.functional.linear(hidden_N, weight, bias).float()
    if head.scale != 1.0:
        z = z * head.scale
    if head.softcap:
        z = torch.tanh(z / head.softcap) * head.softcap
    return z * inv_temperature
