"""K adapters' AdamW optimizers stepped as one (issue 18).

Each adapter keeps its own `torch.optim.AdamW` (its parameter groups: A at lr, B at lr x LoRA+ ratio), so
checkpoints keep torch's format and `checkpoint.load` can restore the configured settings per group. Those
optimizers only hold state: every parameter, gradient and moment of all K adapters is a view into one flat
buffer each, and a segment is one parameter group (all of its parameters, contiguous). A step is then a handful
of `torch._foreach_*` calls over the 2K segments with per-segment scalars (LR, betas, weight decay, bias
corrections) — the very operations of torch's foreach AdamW, applied per segment instead of per parameter, so the
result is the same up to fp32 rounding of the clip norm — instead of K optimizer steps over every parameter.
The gradient clip and the non-finite skip stay per adapter: one `_foreach_norm` over the K adapters' gradient
views, each scaled by its own clip coefficient; a skipped adapter's segments are left out of the step.

The flat parameter buffer also makes a snapshot of every adapter one copy (`snapshot` / `restore`: the push and
the push check's previous version).
"""

from __future__ import annotations

import math

import torch


class FusedAdamW:
    """The step of K torch AdamW optimizers (one per adapter), over flat buffers. `optimizers[k]` must hold adapter
    k's parameters only, all of one dtype and device; their state is re-pointed into the flat buffers (and is
    always present: step 0 and zero moments before the first step, which torch's AdamW treats as fresh)."""

    def __init__(self, optimizers: list[torch.optim.AdamW]):
        self.optimizers = optimizers
        self.segments: list[tuple[int, dict]] = [(k, g) for k, opt in enumerate(optimizers) for g in opt.param_groups]
        for _, g in self.segments:
            if g.get("amsgrad") or g.get("maximize") or g.get("capturable") or g.get("differentiable"):
                raise ValueError("FusedAdamW: amsgrad, maximize, capturable and differentiable are not supported")
        params = [p for _, g in self.segments for p in g["params"]]
        first = params[0]
        if any(p.dtype != first.dtype or p.device != first.device for p in params):
            raise ValueError("FusedAdamW: every adapter parameter must have one dtype and device")
        total = sum(p.numel() for p in params)
        like = dict(dtype=first.dtype, device=first.device)
        self.flat_p, self.flat_g = torch.empty(total, **like), torch.zeros(total, **like)
        self.flat_m, self.flat_v = torch.zeros(total, **like), torch.zeros(total, **like)
        self.steps_S = torch.zeros(len(self.segments))  # float32 on the CPU, like torch's non-capturable AdamW
        self.spans_S: list[tuple[int, int]] = []  # [start, end) of each segment in the flat buffers
        self.grads: list[tuple[torch.nn.Parameter, torch.Tensor]] = []  # each parameter and its gradient view
        offset = 0
        with torch.no_grad():
            for _, g in self.segments:
                start = offset
                for p in g["params"]:
                    view = self.flat_p[offset: offset + p.numel()].view_as(p)
                    view.copy_(p)
                    p.data = view  # the parameter now lives in the flat buffer (same Parameter object)
                    self.grads.append((p, self.flat_g[offset: offset + p.numel()].view_as(p)))
                    offset += p.numel()
                self.spans_S.append((start, offset))
        self.adapter_of_S = [k for k, _ in self.segments]
        K = len(optimizers)
        self.spans_K = [(min(s for (a, _), (s, _) in zip(self.segments, self.spans_S) if a == k),
                         max(e for (a, _), (_, e) in zip(self.segments, self.spans_S) if a == k)) for k in range(K)]
        self._bind_state()
        self.zero_grad()

    def _views(self, flat: torch.Tensor, spans) -> list[torch.Tensor]:
        return [flat[s:e] for s, e in spans]

    def _bind_state(self) -> None:
        """Each optimizer's state for each parameter: views into the flat moments and the segment's step count."""
        self.step_tensors_S = []
        for s, (k, g) in enumerate(self.segments):
            state = self.optimizers[k].state
            # each parameter its own step tensor, as torch's: a checkpoint stays loadable by a plain AdamW
            self.step_tensors_S.append([self.steps_S[s].clone() for _ in g["params"]])
            for p, step in zip(g["params"], self.step_tensors_S[-1]):
                start, n = self._start(p), p.numel()
                state[p] = {"step": step, "exp_avg": self.flat_m[start: start + n].view_as(p),
                            "exp_avg_sq": self.flat_v[start: start + n].view_as(p)}

    def _start(self, p: torch.Tensor) -> int:
        return (p.data_ptr() - self.flat_p.data_ptr()) // self.flat_p.element_size()

    def reload_state(self) -> None:
        """After `load_state_dict` on the optimizers (a checkpoint, in torch's AdamW format, of this code or of
        the per-adapter AdamW before it): copy the loaded moments and step counts into the flat buffers and
        re-point the state at them. A parameter without state (an adapter that never stepped) starts fresh. The
        groups are read again: torch's load_state_dict replaces them (checkpoint.load then sets their LRs)."""
        self.segments = [(k, g) for k, opt in enumerate(self.optimizers) for g in opt.param_groups]
        with torch.no_grad():
            for s, (k, g) in enumerate(self.segments):
                state = self.optimizers[k].state
                steps = [float(state[p]["step"]) for p in g["params"] if "step" in state.get(p, {})]
                self.steps_S[s] = steps[0] if steps else 0.0
                for p in g["params"]:
                    st = state.get(p, {})
                    for key, flat in (("exp_avg", self.flat_m), ("exp_avg_sq", self.flat_v)):
                        dst = flat[self._start(p): self._start(p) + p.numel()].view_as(p)
                        dst.copy_(st[key]) if key in st else dst.zero_()
        self._bind_state()

    def zero_grad(self) -> None:
        """Zero every gradient, and point each parameter's .grad at its view of the flat buffer (backward adds into
        a .grad in place; a caller that set it to None gets it back)."""
        self.flat_g.zero_()
        for p, view in self.grads:
            if p.grad is not view:
                p.grad = view

    def all_reduce_grads(self) -> None:
        """Data parallel: sum the gradients over the ranks, one collective on the flat buffer."""
        torch.distributed.all_reduce(self.flat_g)

    def clip_grad_norms(self, max_norm: float, active_K: list[bool]) -> torch.Tensor:
        """[K] gradient norm of each adapter (0 where inactive), each active adapter's gradient scaled by
        min(1, max_norm / (norm + 1e-6)) as torch.nn.utils.clip_grad_norm_ does. Stays on the device."""
        for p, view in (self.grads[0], self.grads[-1]):  # backward added into the flat buffer, in place
            if p.grad is not view:
                raise RuntimeError("FusedAdamW: a gradient was replaced instead of accumulated in place "
                                   "(zero_grad(set_to_none=True) on an adapter optimizer? use Learner.stepper's)")
        norms_K = torch.stack(torch._foreach_norm(self._views(self.flat_g, self.spans_K)))
        norms_K = torch.where(torch.tensor(active_K, device=norms_K.device), norms_K, torch.zeros_like(norms_K))
        if math.isfinite(max_norm):
            coef_K = (max_norm / (norms_K + 1e-6)).clamp(max=1.0)
            active = [k for k, a in enumerate(active_K) if a]
            if active:
                torch._foreach_mul_([self._views(self.flat_g, self.spans_K)[k] for k in active],
                                    list(coef_K[active].unbind()))
        return norms_K

    @torch.no_grad()
    def step(self, step_K: list[bool]) -> None:
        """One AdamW step of the adapters with step_K[k] True (torch's foreach AdamW, per segment)."""
        chosen = [s for s, k in enumerate(self.adapter_of_S) if step_K[k]]
        if not chosen:
            return
        self.steps_S[chosen] += 1
        torch._foreach_add_([t for s in chosen for t in self.step_tensors_S[s]], 1.0)
        steps = self.steps_S.tolist()
        spans = [self.spans_S[s] for s in chosen]
        params, grads = self._views(self.flat_p, spans), self._views(self.flat_g, spans)
        exp_avgs, exp_avg_sqs = self._views(self.flat_m, spans), self._views(self.flat_v, spans)
        groups = [self.segments[s][1] for s in chosen]
        lr = [g["lr"] for g in groups]
        beta1, beta2 = [g["betas"][0] for g in groups], [g["betas"][1] for g in groups]
        if any(g["weight_decay"] for g in groups):
            torch._foreach_mul_(params, [1 - r * g["weight_decay"] for r, g in zip(lr, groups)])
        torch._foreach_lerp_(exp_avgs, grads, [1 - b for b in beta1])
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, [1 - b for b in beta2])
        bias_correction1 = [1 - b ** steps[s] for b, s in zip(beta1, chosen)]
        bias_correction2 = [1 - b ** steps[s] for b, s in zip(beta2, chosen)]
        step_size = [(r / bc) * -1 for r, bc in zip(lr, bias_correction1)]
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, [bc ** 0.5 for bc in bias_correction2])
        torch._foreach_add_(denom, [g["eps"] for g in groups])
        torch._foreach_addcdiv_(params, exp_avgs, denom, step_size)

    def snapshot(self) -> torch.Tensor:
        """A copy of every adapter's parameters (one flat tensor)."""
        return self.flat_p.detach().clone()

    @torch.no_grad()
    def restore(self, snap: torch.Tensor) -> None:
        self.flat_p.copy_(snap)

    def view_in(self, snap: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The part of `snap` (a snapshot) that `t` (a view of the live parameters) is of the flat buffer."""
        if t.untyped_storage().data_ptr() != self.flat_p.untyped_storage().data_ptr():
            raise ValueError("FusedAdamW.view_in: not a view of the adapters' parameters")
        return snap.as_strided(t.size(), t.stride(), t.storage_offset())


class LoopedAdamW:
    """The same interface over K plain torch optimizers stepped one by one (full fine-tuning: one optimizer, its
    parameters possibly fp32 masters of a low-precision model)."""

    def __init__(self, optimizers: list[torch.optim.Optimizer], params_K: list[list[torch.Tensor]]):
        self.optimizers, self.params_K = optimizers, params_K

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def clip_grad_norms(self, max_norm: float, active_K: list[bool]) -> torch.Tensor:
        norms = [torch.nn.utils.clip_grad_norm_(ps, max_norm).float() if a else None
                 for ps, a in zip(self.params_K, active_K)]
        zero = next((n for n in norms if n is not None), torch.zeros(())).new_zeros(())
        return torch.stack([zero if n is None else n for n in norms])

    def all_reduce_grads(self) -> None:
        from rl_lora.learner import distributed

        distributed.all_reduce_grads([p for ps in self.params_K for p in ps])

    def step(self, step_K: list[bool]) -> None:
        for opt, go in zip(self.optimizers, step_K):
            if go:
                opt.step()

    def reload_state(self) -> None:
        pass
