"""Our LoRA: parametrisation, PEFT-format round trip, and that training moves exactly the adapter."""

import math

import pytest
import torch

from rl_lora.config import ALL_LINEAR
from rl_lora.learner import Learner, TrainSample
from rl_lora.lora import LoRALinear


@pytest.fixture()
def learner(tiny_model):
    return Learner(tiny_model, rank=1, alpha=32, target_modules=ALL_LINEAR, lr=1e-2, seed=0)


def test_all_linear_layers_adapted_with_paper_init(learner):
    names = {n.split(".")[-1] for n in learner.adapters}
    assert names == set(ALL_LINEAR)
    layers = learner.model.config.num_hidden_layers
    assert len(learner.adapters) == 7 * layers
    for m in learner.adapters.values():
        d_in = m.base.weight.shape[1]
        assert m.lora_A.abs().max() <= 1 / math.sqrt(d_in) and m.lora_A.abs().max() > 0.5 / math.sqrt(d_in)
        assert torch.count_nonzero(m.lora_B) == 0
        assert m.scale == 32.0
    trainable = {n for n, p in learner.model.named_parameters() if p.requires_grad}
    assert trainable and all(n.rsplit(".", 2)[-2] in ("lora_A", "lora_B") for n in trainable)


def test_unknown_target_module_is_an_error(tiny_model):
    with pytest.raises(ValueError, match="qkv_proj"):
        Learner(tiny_model, target_modules=["q_proj", "qkv_proj"])


def _samples(n=4):
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        prompt = torch.randint(0, 250, (6,), generator=g).tolist()
        completion = torch.randint(0, 250, (5,), generator=g).tolist()
        out.append(TrainSample(prompt, completion, [-5.5] * 5, 1.0 if i % 2 else -1.0))
    return out


def test_step_changes_every_adapter_param_and_no_frozen_one(learner):
    frozen = {n: p.detach().clone() for n, p in learner.model.named_parameters() if not p.requires_grad}
    before = {n: p.detach().clone() for n, p in learner.model.named_parameters() if p.requires_grad}
    # Two steps: with B = 0 at init, A's first gradient is exactly zero (standard LoRA); B moves first.
    for _ in range(2):
        metrics = learner.train_step(_samples())
        assert metrics["loss/skipped"] == 0.0
    for n, p in learner.model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, before[n]), f"{n} did not change"
        else:
            assert torch.equal(p, frozen[n]), f"frozen {n} changed"


def test_peft_round_trip_gives_same_logits(learner, tiny_model, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        for m in learner.adapters.values():
            m.lora_B.normal_(0, 0.02)
    learner.write_adapter(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    ids = torch.tensor([[5, 17, 99, 3, 42, 7, 11]])
    ours = learner.model(input_ids=ids).logits
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    plain = base(input_ids=ids).logits
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "adapter")(input_ids=ids).logits
    assert (ours - plain).abs().max() > 1e-3  # the adapter does something
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    # and back: a fresh learner loading the files reproduces the logits
    other = Learner(tiny_model, target_modules=ALL_LINEAR, seed=1)
    other.load_adapter(tmp_path / "adapter")
    torch.testing.assert_close(other.model(input_ids=ids).logits, ours, atol=1e-6, rtol=1e-6)


def test_lora_linear_is_base_plus_scaled_low_rank():
    base = torch.nn.Linear(8, 6, bias=False)
    layer = LoRALinear(base)
    layer.add_adapter(0, rank=1, alpha=32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        layer.lora_B[0].fill_(0.1)
    x = torch.randn(3, 8)
    expected = x @ (base.weight + 32 * layer.lora_B[0] @ layer.lora_A[0]).T
    torch.testing.assert_close(layer(x), expected)


def test_routed_rows_see_only_their_adapter():
    """Rows 0-1 under adapter 0, row 2 under adapter 1 (rank 2), row 3 under adapter 2 (not on this layer)."""
    base = torch.nn.Linear(8, 6, bias=False)
    layer = LoRALinear(base)
    layer.add_adapter(0, rank=1, alpha=32, generator=torch.Generator().manual_seed(0))
    layer.add_adapter(1, rank=2, alpha=16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        layer.lora_B[0].fill_(0.1)
        layer.lora_B[1].fill_(-0.2)
    layer.routing.segments = [(0, 0, 2), (1, 2, 3), (2, 3, 4)]
    x = torch.randn(4, 5, 8)
    out = layer(x)
    w0 = base.weight + 32 * layer.lora_B[0] @ layer.lora_A[0]
    w1 = base.weight + 8 * layer.lora_B[1] @ layer.lora_A[1]
    torch.testing.assert_close(out[:2], x[:2] @ w0.T)
    torch.testing.assert_close(out[2:3], x[2:3] @ w1.T)
    torch.testing.assert_close(out[3:], x[3:] @ base.weight.T)
    out[:2].sum().backward()  # adapter 0's rows only: adapter 1 gets no gradient at all
    assert layer.lora_A[0].grad is not None and layer.lora_A[0].grad.abs().sum() > 0
    assert layer.lora_B[1].grad is None or layer.lora_B[1].grad.abs().sum() == 0


def test_nonfinite_step_is_skipped(learner):
    before = {n: p.detach().clone() for n, p in learner.model.named_parameters() if p.requires_grad}
    bad = _samples()
    bad[0].sampler_logprobs = [float("nan")] * 5
    metrics = learner.train_step(bad)
    assert metrics["loss/skipped"] == 1.0
    for n, p in learner.model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, before[n])
    assert not learner.optimizer.state or all(
        not torch.isnan(s["exp_avg"]).any() for s in learner.optimizer.state.values())
