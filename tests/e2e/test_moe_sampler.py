"""MoE LoRA on vLLM-CPU (rl_lora/sampling/vllm_cpu_moe.py): the punica entry points against a plain per-pair computation on
random tensors (no engine), and in the engine: a tiny random Qwen3-MoE (4 experts, top-2) served with PEFT adapters
on its experts (and attention), whose processed logprobs equal HF transformers' on the same model with each
adapter's delta merged into the weights (W + alpha/r B A per expert), for K = 1 and K = 2 adapters in one batch
with base rows."""

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from sample_builders import chat_prompt
from tiny_models import build_tiny_qwen3_moe

from rl_lora.sampling import vllm_cpu_moe

ATOL = 1e-5  # fp32 op level: the same products summed in another order


# ----------------------------------------------------------------------------------------------------------
# The punica entry points, on random tensors

def _moe_stacks(gen, max_loras, experts, rank, hidden, inter, w13_slices):
    """Stacked MoE LoRA tensors as vLLM's FusedMoEWithLoRA allocates them (every slot filled)."""
    out13 = inter if w13_slices == 2 else 2 * inter  # 3-D fused layout: one w13 slice of 2F rows
    a13 = tuple(torch.randn(max_loras, experts, rank, hidden, generator=gen) for _ in range(w13_slices))
    b13 = tuple(torch.randn(max_loras, experts, out13, rank, generator=gen) for _ in range(w13_slices))
    a2 = (torch.randn(max_loras, experts, rank, inter, generator=gen),)
    b2 = (torch.randn(max_loras, experts, hidden, rank, generator=gen),)
    return a13, b13, a2, b2


def _plain_w13(y, x, a13, b13, topk_ids, slots, enabled):
    out = y.clone()
    for t in range(x.shape[0]):
        for k in range(topk_ids.shape[1]):
            s, e = slots[t], int(topk_ids[t, k])
            if s < 0 or not enabled[s]:
                continue
            off = 0
            for a, b in zip(a13, b13):
                out[t, k, off:off + b.shape[2]] += b[s, e] @ (a[s, e] @ x[t])
                off += b.shape[2]
    return out


def _plain_w2(y, x, a2, b2, topk_ids, topk_w, slots, enabled):
    out = y.clone()
    top_k = topk_ids.shape[1]
    for t in range(topk_ids.shape[0]):
        for k in range(top_k):
            s, e = slots[t], int(topk_ids[t, k])
            if s >= 0 and enabled[s]:
                out[t, k] += topk_w[t, k] * (b2[0][s, e] @ (a2[0][s, e] @ x[t * top_k + k]))
    return out


SLOTS = {  # token -> adapter slot (-1: base row); slot 2 is loaded but disabled below
    "two adapters and base rows": [0, -1, 1, 1, -1, 0, 2],
    "one adapter on every row": [1] * 5,
    "base rows only": [-1] * 4,
}


@pytest.mark.parametrize("w13_slices", [2, 1], ids=["gate and up slices", "fused gate_up (3-D)"])
@pytest.mark.parametrize("rank", [1, 4])
@pytest.mark.parametrize("case", list(SLOTS))
def test_w13_and_w2_match_plain_per_pair_computation(case, rank, w13_slices):
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    gen = torch.Generator().manual_seed(0)
    slots = SLOTS[case]
    n, top_k, experts, hidden, inter, max_loras = len(slots), 2, 4, 24, 16, 3
    a13, b13, a2, b2 = _moe_stacks(gen, max_loras, experts, rank, hidden, inter, w13_slices)
    enabled = torch.tensor([1, 1, 0, 0], dtype=torch.int)
    topk_ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(n)]).to(torch.int32)
    topk_w = torch.rand(n, top_k, generator=gen)
    x = torch.randn(n, hidden, generator=gen)
    y13 = torch.randn(n, top_k, 2 * inter, generator=gen)
    x2 = torch.randn(n * top_k, inter, generator=gen)
    y2 = torch.randn(n, top_k, hidden, generator=gen)
    mapping = torch.tensor(slots)
    wrapper = object.__new__(PunicaWrapperCPU)  # the entry points read only their arguments here

    got13 = y13.clone()
    routing = vllm_cpu_moe.add_lora_w13(wrapper, got13, x, a13, b13, topk_ids, topk_w, None, None, None, n, top_k,
                                        max_loras, enabled, experts, top_k, w13_slices, False, False,
                                        token_lora_mapping=mapping)
    torch.testing.assert_close(got13, _plain_w13(y13, x, a13, b13, topk_ids, slots, enabled), atol=ATOL, rtol=0)
    got2 = y2.clone()
    vllm_cpu_moe.add_lora_w2(wrapper, got2, x2, a2, b2, topk_w, *routing, n, None, None, top_k, max_loras, enabled,
                             top_k, False, 0, False)
    torch.testing.assert_close(got2, _plain_w2(y2, x2, a2, b2, topk_ids, topk_w, slots, enabled), atol=ATOL, rtol=0)
    untouched = [t for t, s in enumerate(slots) if s < 0 or not enabled[s]]
    assert torch.equal(got13[untouched], y13[untouched]) and torch.equal(got2[untouched], y2[untouched])
    if len(untouched) < n:
        assert (got13 - y13).abs().max() > 0.1 and (got2 - y2).abs().max() > 0.1


def test_apply_patches_cpu_only_and_is_idempotent(monkeypatch):
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU
    from vllm.model_executor.layers.fused_moe import unquantized_fused_moe_method
    from vllm.model_executor.layers.fused_moe.oracle import unquantized as oracle
    from vllm.platforms import current_platform

    assert current_platform.is_cpu()
    assert vllm_cpu_moe.apply() and vllm_cpu_moe.apply()
    select = oracle.select_unquantized_moe_backend
    assert unquantized_fused_moe_method.select_unquantized_moe_backend is select
    assert PunicaWrapperCPU.add_lora_w13 is vllm_cpu_moe.add_lora_w13
    vllm_cpu_moe.apply()
    assert oracle.select_unquantized_moe_backend is select  # not wrapped twice
    monkeypatch.setattr(type(current_platform), "is_cpu", lambda self: False)
    assert vllm_cpu_moe.apply() is False


def _experts_layer(experts, top_k, hidden, inter):
    """rl-lora's CPU experts class for a layer of these sizes, as the patched oracle builds it with LoRA on."""
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.model_executor.layers.fused_moe.config import (
        FUSED_MOE_UNQUANTIZED_CONFIG,
        FusedMoEConfig,
        FusedMoEParallelConfig,
        RoutingMethodType,
    )
    from vllm.model_executor.layers.fused_moe.oracle import unquantized as oracle

    vllm_cpu_moe.apply()
    config = FusedMoEConfig(num_experts=experts, experts_per_token=top_k, hidden_dim=hidden, intermediate_size=inter,
                            num_local_experts=experts, num_logical_experts=experts, activation=MoEActivation.SILU,
                            device="cpu", routing_method=RoutingMethodType.Renormalize,
                            moe_parallel_config=FusedMoEParallelConfig.make_no_parallel(), in_dtype=torch.float32,
                            is_lora_enabled=True)
    _, cls = oracle.select_unquantized_moe_backend(config)
    return cls(config, FUSED_MOE_UNQUANTIZED_CONFIG)


@pytest.mark.parametrize("case", list(SLOTS))
def test_rows_without_an_expert_adapter_take_vllms_fused_kernel_with_equal_outputs(case, monkeypatch):
    """TorchLoRAExperts.apply: base rows and rows of a slot without expert LoRA go to vLLM-CPU's fused kernel (on
    the packed weights), the other rows to the torch loop with their LoRA; every row equals the torch loop run on
    the whole batch (fp32 op level), and a batch of adapter rows never reaches the kernel."""
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.model_executor.layers.fused_moe.experts.lora_context import MoELoRAContext

    gen = torch.Generator().manual_seed(1)
    slots = SLOTS[case]
    n, top_k, experts, hidden, inter, max_loras = len(slots), 2, 4, 64, 32, 3
    layer = _experts_layer(experts, top_k, hidden, inter)
    a13, b13, a2, b2 = _moe_stacks(gen, max_loras, experts, 1, hidden, inter, 2)
    ctx = MoELoRAContext(a13, b13, a2, b2, adapter_enabled=torch.tensor([1, 1, 0, 0], dtype=torch.int),
                         max_loras=max_loras, top_k=top_k, w13_num_slices=2, fully_sharded=False, tp_rank=0, tp_size=1,
                         local_num_experts=experts, punica_wrapper=object.__new__(PunicaWrapperCPU),
                         use_tuned_config=False, local_token_lora_mapping=torch.tensor(slots))
    layer.set_lora_context(ctx)
    w1 = torch.randn(experts, 2 * inter, hidden, generator=gen) * 0.2
    w2 = torch.randn(experts, hidden, inter, generator=gen) * 0.2
    x = torch.randn(n, hidden, generator=gen)
    topk_ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(n)]).to(torch.int32)
    topk_w = torch.rand(n, top_k, generator=gen)
    fused_rows = []  # rows each call of vLLM's kernel served
    run_fused = type(layer)._run_fused
    monkeypatch.setattr(type(layer), "_run_fused",
                        lambda self, out, rows_x, *a: (fused_rows.append(len(rows_x)), run_fused(self, out, rows_x, *a)))

    def apply(target):
        out = torch.empty(n, hidden)
        target.apply(out, x, w1, w2, topk_w, topk_ids, MoEActivation.SILU, experts, None, None, None, None, None,
                     None, False)
        return out

    got = apply(layer)
    plain = _experts_layer(experts, top_k, hidden, inter)
    plain.set_lora_context(ctx)
    plain._fused = None  # no kernel: every row in torch ops
    torch.testing.assert_close(got, apply(plain), atol=ATOL, rtol=1e-5)  # outputs ~10: the LoRA deltas are large
    base_rows = sum(s < 0 or s == 2 for s in slots)  # slot 2 has no expert LoRA (adapter_enabled 0)
    assert sum(fused_rows) == base_rows


# ----------------------------------------------------------------------------------------------------------
# In the engine: a tiny Qwen3-MoE served with expert (and attention) adapters vs HF on merged weights

TEMPERATURE = 0.7
TOL = 1e-4  # sampler vs HF fp32 logprobs: measured <= 2e-5; each adapter here moves them by > 1
LAYERS, EXPERTS, HIDDEN, INTER = 2, 4, 128, 128
ATTENTION = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (HIDDEN, 64), "v_proj": (HIDDEN, 64), "o_proj": (HIDDEN, HIDDEN)}
EXPERT = {"gate_proj": (HIDDEN, INTER), "up_proj": (HIDDEN, INTER), "down_proj": (INTER, HIDDEN)}  # (in, out)
EXPERT_KEYS = r"experts\.\d+\.(gate_proj|up_proj|down_proj)"  # rank/alpha pattern, as the learner's exporter writes


@dataclass(frozen=True)
class Adapter:
    """A random PEFT adapter on every expert (and, with `attention`, the attention projections); experts at
    their own rank and alpha (rank_pattern / alpha_pattern) where they differ. alpha / r != 1 throughout."""
    seed: int
    attention: bool
    rank: int = 1
    alpha: float = 3.0
    expert_rank: int = 1
    expert_alpha: float = 3.0

    def scale(self, key: str) -> float:
        return self.expert_alpha / self.expert_rank if ".experts." in key else self.alpha / self.rank

    def tensors(self) -> dict[str, torch.Tensor]:
        """The keys of rl_lora/sampling/vllm_cpu_moe.py's docstring; random non-zero A and B."""
        gen = torch.Generator().manual_seed(self.seed)
        out = {}
        for layer in range(LAYERS):
            modules = [(f"mlp.experts.{e}.{p}", io, self.expert_rank) for e in range(EXPERTS)
                       for p, io in EXPERT.items()]
            if self.attention:
                modules += [(f"self_attn.{p}", io, self.rank) for p, io in ATTENTION.items()]
            for name, (d_in, d_out), r in modules:
                key = f"base_model.model.model.layers.{layer}.{name}"
                out[f"{key}.lora_A.weight"] = torch.randn(r, d_in, generator=gen) * 0.3 / r ** 0.5
                out[f"{key}.lora_B.weight"] = torch.randn(d_out, r, generator=gen) * 0.3 / r ** 0.5
        return out

    def writer(self, base_path):
        from safetensors.torch import save_file

        tensors = self.tensors()
        config = {"peft_type": "LORA", "r": self.rank, "lora_alpha": self.alpha, "bias": "none",
                  "target_modules": sorted({k.split(".")[-3] for k in tensors}),
                  "base_model_name_or_path": str(base_path), "task_type": "CAUSAL_LM"}
        if (self.expert_rank, self.expert_alpha) != (self.rank, self.alpha):
            config |= {"rank_pattern": {EXPERT_KEYS: self.expert_rank},
                       "alpha_pattern": {EXPERT_KEYS: self.expert_alpha}}

        def write(path):
            path = Path(path)
            path.mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(path / "adapter_model.safetensors"))
            (path / "adapter_config.json").write_text(json.dumps(config))
        return write

    def merged(self, base_path, name: str, only: str | None = None):
        """The HF model with W += scale B A for each adapted module (`only`: those whose key contains it)."""
        from safetensors.torch import load_file, save_file
        from transformers import AutoModelForCausalLM

        target = Path(f"{base_path}-merged-{name.replace(' ', '-')}")
        shutil.copytree(base_path, target, dirs_exist_ok=True)
        state = load_file(str(Path(base_path) / "model.safetensors"))
        tensors = self.tensors()
        for key, a in tensors.items():
            if not key.endswith("lora_A.weight") or (only and only not in key):
                continue
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            state[f"{module}.weight"] = state[f"{module}.weight"] + self.scale(key) * tensors[
                key.replace("lora_A", "lora_B")] @ a
        save_file(state, str(target / "model.safetensors"))
        return AutoModelForCausalLM.from_pretrained(str(target), dtype=torch.float32).eval()


def _hf_logprobs(model, prompt, token_ids):
    ids = torch.tensor([list(prompt) + list(token_ids)])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1:-1].float() / TEMPERATURE
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(token_ids)[:, None]).squeeze(1)


def _gap(model, prompt, group):
    return max((_hf_logprobs(model, prompt, c.token_ids) - torch.tensor(c.logprobs)).abs().max().item()
               for c in group)


def _check_rows(sampler, refs, references, rows, prompt, seed):
    """Generate one call of `rows` (adapter names, None: base) and check each row against its merged HF model,
    and against every other reference (the adapter really is served, and no other)."""
    groups = sampler.generate([prompt] * len(rows), n=2, adapters=[refs.get(r) for r in rows], seed=seed,
                              temperature=TEMPERATURE, max_tokens=10)
    for row, group in zip(rows, groups):
        own = row or "base"
        assert all(c.adapter_version == (0 if row is None else refs[row].version) for c in group)
        assert _gap(references[own], prompt, group) < TOL, own
        for other in set(references) - {own}:
            assert _gap(references[other], prompt, group) > 100 * TOL, (own, other)


@pytest.fixture(scope="module")
def moe_path(tmp_path_factory):
    return build_tiny_qwen3_moe(tmp_path_factory.mktemp("tiny-qwen3-moe"))


@pytest.fixture(scope="module")
def moe_sampler(moe_path, _session_sampler):
    """After a dense engine in this process (the session's tiny Llama, rank 1): vLLM's process-global parallel
    groups were made for it without an expert-parallel group (rl_lora.sampling.sampler._add_expert_parallel_group)."""
    from rl_lora.sampling.sampler import Sampler

    s = Sampler(str(moe_path), max_model_len=256, max_lora_rank=1, max_loras=3, kvcache_gib=1)
    yield s
    s.close()


X, Y = Adapter(1, attention=True), Adapter(2, attention=False)  # rank 1: x on experts and attention, y on experts


@pytest.fixture(scope="module")
def references(moe_path):
    from transformers import AutoModelForCausalLM

    return {"base": AutoModelForCausalLM.from_pretrained(str(moe_path), dtype=torch.float32).eval(),
            "x": X.merged(moe_path, "x"), "y": Y.merged(moe_path, "y"),
            "x experts only": X.merged(moe_path, "x experts only", only=".mlp.experts."),
            "x attention only": X.merged(moe_path, "x attention only", only=".self_attn.")}


@pytest.mark.slow
def test_k2_adapters_and_base_rows_in_one_batch_match_merged_hf(moe_sampler, moe_path, references):
    """Base rows, adapter x (experts + attention) and adapter y (experts) interleaved in one engine call (the rank-1
    path batches base rows with adapter rows): each row's logprobs are HF's on the model with its own adapter
    merged; not the base's nor the other adapter's; and for x neither the experts-only nor the attention-only
    merge (both parts of one adapter are served)."""
    s = moe_sampler
    assert s.rank1_path
    refs = {"x": s.push(11, X.writer(moe_path), evict_older=False),
            "y": s.push(12, Y.writer(moe_path), evict_older=False)}
    _check_rows(s, refs, references, [None, "x", "y", None, "y", "x"], chat_prompt(s), seed=7)
    s.evict(11)
    s.evict(12)


@pytest.mark.slow
def test_k1_adapter_on_every_row_matches_merged_hf(moe_sampler, moe_path, references):
    s = moe_sampler
    refs = {"y": s.push(21, Y.writer(moe_path))}
    for text, seed in (("What is 2 + 3?", 3), ("What is 7 - 4?", 4)):
        _check_rows(s, refs, references, ["y", "y", "y"], chat_prompt(s, text), seed=seed)
    s.evict(21)


@pytest.mark.slow
def test_higher_ranks_with_expert_rank_pattern_match_merged_hf(moe_path, _session_sampler):
    """Rank 4 attention with rank 2 experts (rank_pattern / alpha_pattern, the learner's `expert_rank`): the rank-1
    path's one-GEMM form serves the dense layers of this rank-8 engine (vLLM rounds 4 up; adapters zero-padded),
    this module the experts; K = 2 and base rows in one call. The first engine still serves."""
    from transformers import AutoModelForCausalLM

    from rl_lora.sampling.sampler import Sampler

    x4 = Adapter(3, attention=True, rank=4, alpha=8.0, expert_rank=2, expert_alpha=6.0)
    y4 = Adapter(4, attention=True, rank=4, alpha=4.0, expert_rank=2, expert_alpha=2.0)
    references = {"base": AutoModelForCausalLM.from_pretrained(str(moe_path), dtype=torch.float32).eval(),
                  "x4": x4.merged(moe_path, "x4"), "y4": y4.merged(moe_path, "y4"),
                  "x4 experts only": x4.merged(moe_path, "x4 experts only", only=".mlp.experts.")}
    s = Sampler(str(moe_path), max_model_len=256, max_lora_rank=4, max_loras=3, kvcache_gib=1)
    try:
        assert s.rank1_path
        refs = {"x4": s.push(31, x4.writer(moe_path), evict_older=False),
                "y4": s.push(32, y4.writer(moe_path), evict_older=False)}
        _check_rows(s, refs, references, [None, "x4", "y4", "x4"], chat_prompt(s), seed=9)
    finally:
        s.close()
    dense = _session_sampler
    [[c]] = dense.generate([chat_prompt(dense)], n=1, adapters=[None], seed=0, temperature=TEMPERATURE, max_tokens=4)
    assert len(c.token_ids) == 4
