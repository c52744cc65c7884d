"""The fused step of K adapters' AdamW (rl_lora/learner/optim.py) equals K torch AdamW steps with per-adapter clip and
skip: LoRA+ groups, per-adapter LRs, weight decay, an adapter with no samples, a non-finite one; its state dicts
are torch's and resume either way."""

import copy
import math

import torch

from rl_lora.learner.optim import FusedAdamW

SHAPES = [(1, 7), (5, 1), (3, 2, 4)]  # rank-1 A and B, and an [E, ...] expert parameter


def _adapters(K, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.nn.Parameter(torch.randn(*s, generator=g)) for s in SHAPES] for _ in range(K)]


def _optimizers(params_K, wd):
    opts = []
    for k, ps in enumerate(params_K):
        lr = 1e-3 * (k + 1)
        groups = [{"params": ps[:1], "lr": lr}, {"params": ps[1:], "lr": lr * 16.0}]  # LoRA+ ratio 16
        opts.append(torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.99), weight_decay=wd, foreach=True))
    return opts


def _reference_step(params_K, opts, grads_K, active_K, clip):
    """Today's learner: per adapter, clip_grad_norm_ then step, skipped when not finite or without samples."""
    norms = []
    for ps, opt, grads, active in zip(params_K, opts, grads_K, active_K):
        for p, gr in zip(ps, grads):
            p.grad = gr.clone()
        norm = torch.nn.utils.clip_grad_norm_(ps, clip).item() if active else 0.0
        if active and math.isfinite(norm):
            opt.step()
        opt.zero_grad(set_to_none=True)
        norms.append(norm)
    return norms


def _fused_step(params_K, fused, grads_K, active_K, clip):
    for ps, grads in zip(params_K, grads_K):
        for p, gr in zip(ps, grads):
            p.grad.add_(gr)  # as backward accumulates into .grad
    norms = fused.clip_grad_norms(clip, active_K).tolist()
    fused.step([a and math.isfinite(n) for a, n in zip(active_K, norms)])
    fused.zero_grad()
    return norms


def _grads(K, step):
    g = torch.Generator().manual_seed(100 + step)
    grads_K = [[torch.randn(*s, generator=g) * (k + 1) for s in SHAPES] for k in range(K)]
    if step == 2:
        grads_K[1][0][0, 0] = float("nan")  # adapter 1 skipped this step
    return grads_K


def _check(K=4, steps=5, wd=0.01, clip=1.0):
    ref_p, fused_p = _adapters(K), _adapters(K)
    ref_o, fused_o = _optimizers(ref_p, wd), _optimizers(fused_p, wd)
    fused = FusedAdamW(fused_o)
    for step in range(steps):
        active = [k != 2 or step % 2 == 0 for k in range(K)]  # adapter 2 has no samples every other step
        grads = _grads(K, step)
        n_ref = _reference_step(ref_p, ref_o, grads, active, clip)
        n_fused = _fused_step(fused_p, fused, grads, active, clip)
        for a, b in zip(n_ref, n_fused):
            assert (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6)
        for ps_r, ps_f in zip(ref_p, fused_p):
            for p, q in zip(ps_r, ps_f):
                torch.testing.assert_close(q.detach(), p.detach(), rtol=1e-6, atol=1e-7)
    return ref_p, ref_o, fused_p, fused_o, fused


def test_fused_step_equals_per_adapter_adamw():
    ref_p, ref_o, fused_p, fused_o, fused = _check()
    # the adapters did move, differently (per-adapter LR), and the skipped / idle ones less often
    assert [float(fused_o[k].state[fused_p[k][0]]["step"]) for k in range(4)] == [5.0, 4.0, 3.0, 5.0]
    for k in range(4):
        for p, q in zip(ref_p[k], fused_p[k]):
            torch.testing.assert_close(fused_o[k].state[q]["exp_avg"], ref_o[k].state[p]["exp_avg"])


def test_fused_step_without_clip_or_weight_decay():
    _check(wd=0.0, clip=math.inf)


def test_state_dicts_resume_both_ways():
    ref_p, ref_o, fused_p, fused_o, fused = _check(steps=3)
    # a checkpoint of the per-adapter AdamW (today's format) loaded into a fused one, and continued
    params2 = [[torch.nn.Parameter(p.detach().clone()) for p in ps] for ps in ref_p]
    opts2 = _optimizers(params2, 0.01)
    fused2 = FusedAdamW(opts2)
    for opt, src in zip(opts2, ref_o):
        opt.load_state_dict(copy.deepcopy(src.state_dict()))
    fused2.reload_state()
    # a fused checkpoint loaded into plain torch AdamW
    params3 = [[torch.nn.Parameter(p.detach().clone()) for p in ps] for ps in fused_p]
    opts3 = _optimizers(params3, 0.01)
    for opt, src in zip(opts3, fused_o):
        opt.load_state_dict(copy.deepcopy(src.state_dict()))
    for opts in (ref_o, opts2, opts3):  # settings changed after the load (checkpoint.load restores the config's)
        for opt in opts:
            opt.param_groups[1]["lr"] *= 0.5
    active = [True] * 4
    for step in range(3, 5):
        grads = _grads(4, step)
        _reference_step(ref_p, ref_o, grads, active, 1.0)
        _fused_step(params2, fused2, grads, active, 1.0)
        _reference_step(params3, opts3, grads, active, 1.0)
    for ps_r, ps2, ps3 in zip(ref_p, params2, params3):
        for p, q, r in zip(ps_r, ps2, ps3):
            torch.testing.assert_close(q.detach(), p.detach(), rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(r.detach(), p.detach(), rtol=1e-6, atol=1e-7)


def test_snapshot_restore_is_one_copy_of_every_adapter():
    params = _adapters(3)
    fused = FusedAdamW(_optimizers(params, 0.0))
    snap = fused.snapshot()
    with torch.no_grad():
        for ps in params:
            for p in ps:
                p.mul_(2.0)
    assert torch.equal(fused.view_in(snap, params[1][2]), params[1][2].detach() / 2.0)
    fused.restore(snap)
    assert torch.equal(params[2][0].detach(), _adapters(3)[2][0].detach())
