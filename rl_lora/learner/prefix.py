"""One prompt forward per GRPO group: the G completions of a prompt attend to one shared copy of its keys/values.

A step's batch is groups of G completions of the same prompt (under the same adapter). Run naively, the
learner computes the prompt G times, forward and backward. Here it runs each distinct prompt once, keeps every
layer's keys/values (with their autograd graph), and runs the completions against them: completion i sees
keys/values `prompt_kv[group of i]`, gathered by index, so in backward the G completions' gradients are summed
into the one prompt computation, exactly as if each had its own copy. The result equals the unshared forward up
to floating-point rounding; the base work drops by (G-1)/G of the prompt tokens.

The keys/values travel through HF's `Cache` interface (the attention layers call `update`). Our caches never
append: the prompt pass's cache *sets* them and the completion pass's cache *returns* `cat(prefix[index], new)`
without storing it, so a layer re-run by activation checkpointing (in backward) computes the same thing.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

# Families whose every layer is plain causal attention (no sliding-window or linear-attention layers), for which
# one prefix cache serves every layer. Others fall back to the unshared forward.
SUPPORTED = {"llama", "qwen2", "qwen3"}


class _CaptureLayer(DynamicLayer):
    """Prompt pass: keep this layer's keys/values (set, never appended) and attend to them alone."""

    def update(self, key_states, value_states, *args, **kwargs):
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys, self.values, self.is_initialized = key_states, value_states, True
        return key_states, value_states

    def get_seq_length(self) -> int:
        return 0  # nothing precedes the prompt


class _ServeLayer(DynamicLayer):
    """Completion pass: attend to the row's prompt (gathered by index) followed by the new tokens; store nothing."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor):
        super().__init__()
        self.keys, self.values, self.index, self.is_initialized = keys, values, index, True
        self.dtype, self.device = keys.dtype, keys.device

    def update(self, key_states, value_states, *args, **kwargs):
        return (torch.cat([self.keys.index_select(0, self.index), key_states], dim=-2),
                torch.cat([self.values.index_select(0, self.index), value_states], dim=-2))


def capture_cache(num_layers: int) -> Cache:
    return Cache(layers=[_CaptureLayer() for _ in range(num_layers)])


def serve_cache(captured: Cache, index: torch.Tensor) -> Cache:
    """Completion row i attends to prompt row index[i] of `captured`."""
    return Cache(layers=[_ServeLayer(layer.keys, layer.values, index) for layer in captured.layers])


def supported(model) -> bool:
    config = model.config
    if config.model_type not in SUPPORTED:
        return False
    # Qwen2 can enable sliding windows per layer; its default is off.
    return not getattr(config, "use_sliding_window", False)


def kv_copy_weight(config) -> float:
    """What one completion's gathered copy of one prompt token's keys/values costs, in the micro-batch budget's unit
    (one token through the model). Per layer, the completion pass keeps cat(prompt, new) keys and values for
    attention's backward: 2 x kv_dim values, or 2 x q_dim where SDPA's GQA path repeats them per query head (counted,
    to be safe); a token through the layer keeps ~7 hidden-size tensors (norm inputs and outputs, q, attention
    output, o_proj input) plus k, v and the fused MLP's gate and up (lora._SwiGLUDown). An estimate from what
    autograd saves (issue 15: uncounted, the copies are GBs at 8B with long prompts); ~0.17 for the tiny test
    Llama, ~0.15 for Qwen3-8B."""
    d = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    kv_dim = getattr(config, "num_key_value_heads", None) or heads
    kv_dim *= head_dim
    d_ff = getattr(config, "intermediate_size", None) or 4 * d
    return 2 * max(kv_dim, heads * head_dim) / (7 * d + 2 * kv_dim + 2 * d_ff)


def allow_with_checkpointing(model) -> None:
    """HF drops the cache under activation checkpointing (a recomputed layer would append twice to a normal cache);
    ours is recompute-safe (see the module doc), so let the decoder layers keep it."""
    for module in model.modules():
        if hasattr(module, "_can_checkpoint_with_cache"):
            module._can_checkpoint_with_cache = True


def shared_hidden(backbone, samples, groups, device, set_routing) -> torch.Tensor:
    """[N, d] last hidden states at the positions that predict each completion token of `samples` (in order):
    the prompt's last position, then completion positions 0 .. len-2. `groups` is `batching.group_keys(samples)`;
    `set_routing(adapters)` tells the LoRA layers which adapter each row of the next forward belongs to."""
    units, index = groups
    num_layers = backbone.config.num_hidden_layers
    width = max(len(p) for _, p in units)
    ids_U = torch.zeros(len(units), width, dtype=torch.long)
    mask_U = torch.zeros(len(units), width, dtype=torch.long)
    for u, (_, prompt) in enumerate(units):
        ids_U[u, : len(prompt)] = torch.tensor(prompt)  # right-padded: pads come after, so causal rows ignore them
        mask_U[u, : len(prompt)] = 1
    captured = capture_cache(num_layers)
    set_routing([adapter for adapter, _ in units])
    hidden_U = backbone(input_ids=ids_U.to(device), attention_mask=mask_U.to(device),
                        past_key_values=captured).last_hidden_state  # [U, width, d]
    d = hidden_U.shape[-1]
    flat = [hidden_U.reshape(-1, d)]
    # Completion inputs: every completion token but the last (the last one's hidden state predicts nothing).
    steps = max(len(s.completion_ids) - 1 for s in samples)
    if steps > 0:
        ids_C = torch.zeros(len(samples), steps, dtype=torch.long)
        mask_C = torch.zeros(len(samples), steps, dtype=torch.long)
        pos_C = torch.zeros(len(samples), steps, dtype=torch.long)
        for i, s in enumerate(samples):
            n = len(s.completion_ids) - 1
            ids_C[i, :n] = torch.tensor(s.completion_ids[:-1], dtype=torch.long)
            mask_C[i, :n] = 1
            pos_C[i] = len(s.prompt_ids) + torch.arange(steps)
        index_t = torch.tensor(index)
        set_routing([s.adapter for s in samples])
        mask = torch.cat([mask_U[index_t], mask_C], dim=1)
        out_C = backbone(input_ids=ids_C.to(device), attention_mask=mask.to(device), position_ids=pos_C.to(device),
                         past_key_values=serve_cache(captured, index_t.to(device)))
        flat.append(out_C.last_hidden_state.reshape(-1, d))  # [N * steps, d]
    rows = []
    base = len(units) * width
    for i, s in enumerate(samples):
        rows.append(index[i] * width + len(s.prompt_ids) - 1)
        rows.extend(base + i * steps + j for j in range(len(s.completion_ids) - 1))
    return torch.cat(flat)[torch.tensor(rows, device=device)]
