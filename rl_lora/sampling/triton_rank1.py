"""A fused rank-1 LoRA kernel for one linear layer (Triton), for GPUs: NOT wired into vLLM.

vLLM 0.32's GPU path spends three kernels per LoRA layer on it whatever the rank (docs/sampling.md): zero a
buffer, `lora_shrink` (tiles of 16 rank columns, split-K 64 with atomics, to produce one number per token and
slice at rank 1) and `lora_expand` (a 32-long `tl.dot` of which 31 terms are padding). At rank 1 the layer's
update is, per token t with adapter slot k (none: -1) and slice s:

    y[t, cols(s)] += scale * (x[t] . A[s, k]) * B[s, k, :]

`lora_rank1` does this in ONE launch: a program per (token, block of output columns) loads the token's slot,
returns at once for a row without an adapter, recomputes the (<= 3) dot products of length `hidden` (cheap next
to the columns it writes) and adds the scaled B columns. No buffer, no zeroing, no padding, no atomics.

Correctness is tested on CPU under Triton's interpreter (tests/unit/test_rank1_sampler.py, TRITON_INTERPRET=1);
speed only on a GPU (benchmarks/rank1_triton_gpu.py, against vLLM's lora_shrink + lora_expand). rl-lora keeps
vLLM's GPU path until that benchmark shows this one faster.

Layout (one layer, rank 1, n_slices <= 3): A (n_slices, max_loras, hidden) -- vLLM's lora_a_stacked[s][:, 0, 0, :]
stacked; B (max_loras, sum(out)) -- lora_b_stacked[s][:, 0, :, 0] concatenated along the output; `slice_ends`:
the cumulative output sizes.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _lora_rank1_kernel(x_ptr, y_ptr, a_ptr, b_ptr, idx_ptr, scale, hidden, n_out, max_loras,
                       end0, end1, stride_x, stride_y,
                       N_SLICES: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(idx_ptr + t)
    if slot < 0:  # no adapter on this row: nothing to do
        return
    d0 = 0.0
    d1 = 0.0
    d2 = 0.0
    for h0 in range(0, hidden, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        hm = h < hidden
        xv = tl.load(x_ptr + t * stride_x + h, mask=hm, other=0.0).to(tl.float32)
        d0 += tl.sum(xv * tl.load(a_ptr + slot * hidden + h, mask=hm, other=0.0).to(tl.float32))
        if N_SLICES > 1:
            d1 += tl.sum(xv * tl.load(a_ptr + (max_loras + slot) * hidden + h, mask=hm, other=0.0).to(tl.float32))
        if N_SLICES > 2:
            d2 += tl.sum(xv * tl.load(a_ptr + (2 * max_loras + slot) * hidden + h, mask=hm, other=0.0).to(tl.float32))
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cm = cols < n_out
    coef = tl.where(cols < end0, d0, tl.where(cols < end1, d1, d2)) * scale
    bv = tl.load(b_ptr + slot * n_out + cols, mask=cm, other=0.0).to(tl.float32)
    yp = y_ptr + t * stride_y + cols
    yv = tl.load(yp, mask=cm, other=0.0)
    tl.store(yp, (yv.to(tl.float32) + coef * bv).to(yv.dtype), mask=cm)


def lora_rank1(y, x, a, b, slot_of_token, scale: float, slice_ends: tuple[int, ...], block_n: int = 128,
               block_h: int = 256) -> None:
    """y (T, sum(out)) += the rank-1 LoRA update of x (T, hidden), in place; see the module docstring."""
    n_slices, max_loras, hidden = a.shape
    if not 1 <= n_slices <= 3 or len(slice_ends) != n_slices or slice_ends[-1] != y.shape[1]:
        raise ValueError(f"lora_rank1: {n_slices} slices with ends {slice_ends} for {y.shape[1]} output columns")
    ends = list(slice_ends) + [y.shape[1]] * (3 - n_slices)
    grid = (x.shape[0], triton.cdiv(y.shape[1], block_n))
    _lora_rank1_kernel[grid](x, y, a, b, slot_of_token, scale, hidden, y.shape[1], max_loras, ends[0], ends[1],
                             x.stride(0), y.stride(0), N_SLICES=n_slices, BLOCK_H=block_h, BLOCK_N=block_n)
