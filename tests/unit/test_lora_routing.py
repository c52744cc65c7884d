"""A LoRA layer routing a micro-batch of many adapters' rows: the batched path (stacked A/B gathered per row, two
batched matmuls) equals the per-segment split/cat path, outputs and every adapter's gradients."""

import pytest
import torch
from torch import nn

from rl_lora.learner import lora
from rl_lora.learner.lora import LoRALinear, Routing


def _layer(ranks, seed=0, missing=()):
    torch.manual_seed(seed)
    routing = Routing()
    layer = LoRALinear(nn.Linear(12, 10), routing)
    layer.base.weight.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    for k, r in enumerate(ranks):
        if k not in missing:
            layer.add_adapter(k, r, alpha=32, generator=g)
    with torch.no_grad():
        for B in layer.lora_B:
            B.normal_(generator=g)
    return layer


def _run(layer, x, segments, batched: bool, monkeypatch):
    monkeypatch.setattr(lora, "ROUTED_BMM_MIN", 3 if batched else 10**9)
    layer.routing.segments = segments
    layer._route_cache = None
    for p in layer.parameters():
        p.grad = None
    x = x.clone().requires_grad_(True)
    out = layer(x)
    (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
    return out.detach(), x.grad, [(p.grad.clone() if p.grad is not None else None) for p in layer.parameters()]


SEGMENTS = [(2, 0, 3), (0, 3, 4), (3, 4, 7), (1, 7, 8), (2, 8, 10)]  # adapter 2 twice, adapter 4 unused


@pytest.mark.parametrize("ranks,missing,uses_batched", [
    ([1, 1, 1, 1, 1], (), True),       # a rank-1 grid: the batched path
    ([4, 4, 4, 4, 4], (), True),       # any one rank
    ([1, 2, 1, 1, 1], (), False),      # mixed ranks: the split path
    ([1, 1, 1, 1, 1], (3,), False),    # a segment whose adapter is not in this layer (attention-only elsewhere)
])
def test_batched_routing_equals_per_segment(ranks, missing, uses_batched, monkeypatch):
    layer = _layer(ranks, missing=missing)
    x = torch.randn(10, 5, 12, generator=torch.Generator().manual_seed(1))
    ref = _run(layer, x, SEGMENTS, batched=False, monkeypatch=monkeypatch)
    got = _run(layer, x, SEGMENTS, batched=True, monkeypatch=monkeypatch)
    assert (layer._route_cache[1] is not None) == uses_batched
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-5)
    for g, r in zip(got[2], ref[2]):
        assert (g is None) == (r is None)
        if r is not None:
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
    grads = dict(zip([n for n, _ in layer.named_parameters()], got[2]))
    unused = grads[f"lora_A.{layer.slots[4]}"]  # adapter 4 has no rows: no gradient
    assert unused is None or not unused.any()


def test_the_route_is_rebuilt_for_a_new_batch(monkeypatch):
    layer = _layer([1, 1, 1, 1, 1])
    x = torch.randn(10, 5, 12)
    first = _run(layer, x, SEGMENTS, batched=True, monkeypatch=monkeypatch)[0]
    other = [(4, 0, 2), (3, 2, 5), (0, 5, 6), (1, 6, 10)]
    monkeypatch.setattr(lora, "ROUTED_BMM_MIN", 3)
    layer.routing.segments = other  # the cache from SEGMENTS must not be reused
    got = layer(x)
    ref = _run(layer, x, other, batched=False, monkeypatch=monkeypatch)[0]
    torch.testing.assert_close(got.detach(), ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(first, ref)
