"""The rank-1 LoRA path for vLLM-CPU (rl_lora/sampling/vllm_cpu_lora.py): exact against vLLM's own torch ops on random
tensors (no engine), and in the engine: a mixed batch of base rows and several adapters, in one call, gives
every row its own adapter's logprobs (the learner's), base rows included."""

import pytest
import torch
from sample_builders import chat_prompt, push_random_versions, version_gap

from rl_lora.sampling import vllm_cpu_lora
from rl_lora.sampling.vllm_cpu_lora import PunicaWrapperCPURank1

ATOL, RTOL = 1e-5, 1e-6  # fp32: the two paths sum the same products in a different order


def _layer(n_slices, max_loras, in_size, out_sizes, gen, rank=1):
    """A LoRA linear layer's stacked adapter tensors, as vLLM allocates them (at the engine's max rank), every slot
    filled."""
    a = tuple(torch.randn(max_loras, 1, rank, in_size, generator=gen) for _ in range(n_slices))
    b = tuple(torch.randn(max_loras, 1, size, rank, generator=gen) for size in out_sizes)
    return a, b


def _wrapper(token_ids, lora_index_to_id):
    from vllm.lora.layers import LoRAMapping

    w = PunicaWrapperCPURank1(max_num_batched_tokens=256, max_batches=64, device="cpu")
    # vLLM-CPU marks every batch prefill (so its sgmv ops run); ids 0 = no adapter
    w.update_metadata(LoRAMapping(token_ids, token_ids, is_prefill=True), lora_index_to_id,
                      len(lora_index_to_id) + 1, 320)
    return w


def _expected(x, y, a, b, token_ids, lora_index_to_id, out_sizes):
    """vLLM's own torch ops (bgmv shrink / expand_slice), applied to the rows that have an adapter only."""
    from vllm.lora.ops.torch_ops import bgmv_expand_slice, bgmv_shrink

    slot_of = {lid: i for i, lid in enumerate(lora_index_to_id) if lid is not None}
    rows = [i for i, t in enumerate(token_ids) if t > 0]
    out = y.clone()
    if not rows:
        return out
    idx = torch.tensor([slot_of[token_ids[i]] for i in rows])
    sub = out[rows]
    off = 0
    for a_s, b_s, size in zip(a, b, out_sizes):
        buf = torch.zeros(len(rows), a_s.shape[2])
        bgmv_shrink(x[rows], a_s, buf, idx, 1.0)
        bgmv_expand_slice(buf, b_s, sub, idx, off, size, add_inputs=True)
        off += size
    out[rows] = sub
    return out


MAPPINGS = {  # token -> LoRA id (0: base row), slots hold ids 11..15
    "mixed adapters and base rows": [11, 0, 12, 13, 0, 11, 15, 14, 0, 12, 11, 11],
    "one adapter, every row": [13] * 7,
    "one adapter and base rows": [0, 13, 13, 0, 13],
    "base rows only": [0] * 6,
}


@pytest.mark.parametrize("rank", [1, 8, 16], ids=lambda r: f"rank {r}")
@pytest.mark.parametrize("gather", [False, True], ids=["one GEMM", "gathered per row"])
@pytest.mark.parametrize("out_sizes", [(48,), (40, 40), (64, 16, 16)], ids=["1 slice", "gate/up", "q/k/v"])
@pytest.mark.parametrize("case", list(MAPPINGS))
def test_op_matches_vllm_torch_ops(case, out_sizes, gather, rank, monkeypatch):
    """Both forms of the rank-1 path (the gathered one serves batches of GATHER_MIN_SLOTS adapters and more, at
    rank 1; above rank 1 every batch takes the one-GEMM form), at the engine ranks it serves."""
    from rl_lora.sampling import vllm_cpu_lora

    monkeypatch.setattr(vllm_cpu_lora, "GATHER_MIN_SLOTS", 1 if gather else 10**6)
    gen = torch.Generator().manual_seed(0)
    token_ids = MAPPINGS[case]
    lora_index_to_id = [11, 12, 13, 14, 15]
    a, b = _layer(len(out_sizes), 5, 32, out_sizes, gen, rank)
    x = torch.randn(len(token_ids), 32, generator=gen)
    y = torch.randn(len(token_ids), sum(out_sizes), generator=gen)
    want = _expected(x, y, a, b, token_ids, lora_index_to_id, out_sizes)
    w = _wrapper(token_ids, lora_index_to_id)
    got = y.clone()
    calls = w.rank1_calls
    w.add_lora_linear(got, x, a, b, 1.0, out_sizes)
    assert (w._r1_pos is not None) == (gather and any(t > 0 for t in token_ids))
    assert w.rank1_calls == calls + any(t > 0 for t in token_ids)  # served here, not by vLLM's ops
    torch.testing.assert_close(got, want, atol=ATOL * rank, rtol=RTOL)  # sums of rank x 32 products (values ~30)
    base = [i for i, t in enumerate(token_ids) if t == 0]
    assert torch.equal(got[base], y[base])  # base rows: exactly untouched
    if any(t > 0 for t in token_ids):
        assert (got - y).abs().max() > 0.1  # the adapters did change the other rows


def test_vllm_cpu_path_gives_base_rows_an_adapter():
    """Why base rows must be handled: vLLM-CPU's own path (ENABLED off) gathers slot -1, i.e. the last slot's
    adapter, for a row without one; the rank-1 path leaves such rows alone (test above)."""
    gen = torch.Generator().manual_seed(1)
    token_ids, ids = [0, 11, 0, 12], [11, 12]
    a, b = _layer(1, 2, 16, (24,), gen)
    x, y = torch.randn(4, 16, generator=gen), torch.randn(4, 24, generator=gen)
    w = _wrapper(token_ids, ids)
    vllm_cpu_lora.ENABLED = False
    try:
        theirs = y.clone()
        w.add_lora_linear(theirs, x, a, b, 1.0, (24,))
    finally:
        vllm_cpu_lora.ENABLED = True
    assert (theirs[[0, 2]] - y[[0, 2]]).abs().max() > 0.1
    torch.testing.assert_close(theirs[[1, 3]], _expected(x, y, a, b, token_ids, ids, (24,))[[1, 3]],
                               atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("gather", [False, True], ids=["one GEMM", "gathered per row"])
def test_new_adapter_in_a_used_slot_is_seen(gather, monkeypatch):
    """The stacked A/B are cached per layer; loading another adapter into a slot (vLLM copies it in place) must
    invalidate the cache."""
    from rl_lora.sampling import vllm_cpu_lora

    monkeypatch.setattr(vllm_cpu_lora, "GATHER_MIN_SLOTS", 1 if gather else 10**6)
    gen = torch.Generator().manual_seed(2)
    token_ids, ids = [11, 11, 0, 12], [11, 12]
    a, b = _layer(2, 2, 16, (8, 8), gen)
    x, y = torch.randn(4, 16, generator=gen), torch.randn(4, 16, generator=gen)
    w = _wrapper(token_ids, ids)
    first = y.clone()
    w.add_lora_linear(first, x, a, b, 1.0, (8, 8))
    for t in a + b:  # what set_lora does: copy into the slot's view
        t[0].copy_(torch.randn(t[0].shape, generator=gen))
    second = y.clone()
    w.add_lora_linear(second, x, a, b, 1.0, (8, 8))
    torch.testing.assert_close(second, _expected(x, y, a, b, token_ids, ids, (8, 8)), atol=ATOL, rtol=RTOL)
    assert (second - first).abs().max() > 0.1


def test_gathered_tables_are_built_once_per_push_not_per_set_of_adapters_in_the_batch(monkeypatch):
    """The gathered form's tables hold every slot: a forward with another set of adapters in the batch (requests
    finish one by one while decoding) reuses them; a slot's new tensors (a push) rebuild them."""
    from rl_lora.sampling import vllm_cpu_lora

    monkeypatch.setattr(vllm_cpu_lora, "GATHER_MIN_SLOTS", 2)
    gen = torch.Generator().manual_seed(4)
    ids = [11, 12, 13, 14, 15]
    a, b = _layer(2, 5, 16, (8, 8), gen)
    w = PunicaWrapperCPURank1(max_num_batched_tokens=256, max_batches=64, device="cpu")
    from vllm.lora.layers import LoRAMapping

    tables = []
    for token_ids in ([11, 12, 13, 0, 15], [12, 0, 15, 15], [14, 11, 0]):
        w.update_metadata(LoRAMapping(token_ids, token_ids, is_prefill=True), ids, len(ids) + 1, 320)
        x, y = torch.randn(len(token_ids), 16, generator=gen), torch.randn(len(token_ids), 16, generator=gen)
        got = y.clone()
        w.add_lora_linear(got, x, a, b, 1.0, (8, 8))
        torch.testing.assert_close(got, _expected(x, y, a, b, token_ids, ids, (8, 8)), atol=ATOL, rtol=RTOL)
        tables.append(w._r1_gather[id(a)][1])
    assert tables[0] is tables[1] is tables[2]
    for t in a + b:
        t[3].copy_(torch.randn(t[3].shape, generator=gen))  # a push into slot 3 (id 14)
    got = y.clone()
    w.add_lora_linear(got, x, a, b, 1.0, (8, 8))
    torch.testing.assert_close(got, _expected(x, y, a, b, [14, 11, 0], ids, (8, 8)), atol=ATOL, rtol=RTOL)
    assert w._r1_gather[id(a)][1] is not tables[0]


def test_higher_rank_falls_through_to_vllm():
    gen = torch.Generator().manual_seed(3)
    token_ids, ids = [11, 12, 11], [11, 12]
    a = (torch.randn(2, 1, 8, 16, generator=gen),)
    b = (torch.randn(2, 1, 24, 8, generator=gen),)
    x, y = torch.randn(3, 16, generator=gen), torch.randn(3, 24, generator=gen)
    w = _wrapper(token_ids, ids)
    got = y.clone()
    w.add_lora_linear(got, x, a, b, 1.0, (24,))
    want = y.clone()
    idx = torch.tensor([0, 1, 0])
    shrunk = torch.einsum("ti,tri->tr", x, a[0][idx, 0])
    want += torch.einsum("tr,tor->to", shrunk, b[0][idx, 0])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_lm_head_lora_only_on_adapter_rows():
    """The lm_head wrapper: adapter rows get vLLM's own result, base rows nothing (vLLM's path would give them
    the last slot's lm_head adapter), and all-zero lm_head slots are skipped."""
    from vllm.lora.ops.torch_ops import bgmv_expand, bgmv_shrink

    gen = torch.Generator().manual_seed(4)
    token_ids, ids = [12, 0, 11, 0], [11, 12]
    a, b = torch.randn(2, 1, 1, 16, generator=gen), torch.randn(2, 1, 40, 1, generator=gen)
    x, y = torch.randn(4, 16, generator=gen), torch.randn(4, 40, generator=gen)
    w = _wrapper(token_ids, ids)
    got = y.clone()
    w.add_lora_logits(got, x, a, b, 1.0)
    rows, idx = [0, 2], torch.tensor([1, 0])
    want, buf = y[rows].clone(), torch.zeros(2, 1)
    bgmv_shrink(x[rows], a, buf, idx, 1.0)
    bgmv_expand(buf, b, want, idx, add_inputs=True)
    torch.testing.assert_close(got[rows], want, atol=ATOL, rtol=RTOL)
    assert torch.equal(got[[1, 3]], y[[1, 3]]) and (got[rows] - y[rows]).abs().max() > 0.1
    zero = y.clone()
    w.add_lora_logits(zero, x, torch.zeros_like(a), torch.zeros_like(b), 1.0)
    assert torch.equal(zero, y)


# ----------------------------------------------------------------------------------------------------------
# In the engine (the session's tiny-model Sampler: CPU, rank 1, in-process engine core)

TOL = 1e-3  # as tests/e2e/test_sampler.py: sampler vs learner logprobs (measured ~5e-6)


@pytest.fixture(scope="module")
def learner(tiny_model):
    from sample_builders import build_learner

    from rl_lora.config import AdapterSpec

    return build_learner(tiny_model, AdapterSpec(lr=1e-2), temperature=0.7)


@pytest.mark.slow
def test_engine_mixed_batch_one_call_matches_learner_and_vllm_path(sampler, learner):
    """Base rows and two adapters interleaved in ONE engine call (vLLM's own CPU path would give the base rows
    the last slot's adapter: they would fail the learner check); each row's logprobs are the learner's under its
    own adapter, and (where the sampled tokens agree) vLLM's own path's for the adapter rows."""

    assert sampler.rank1_path
    prompt = chat_prompt(sampler)
    weights = push_random_versions(sampler, learner, (301, 302))
    refs = [None, sampler.live[301], sampler.live[302], None, sampler.live[301]]
    seeds = [0, 10, 20, 30, 40]
    args = ([prompt] * len(refs), refs, seeds, 2, 0.7, 10, 1.0, -1, False)
    mixed = sampler._generate_seeded(*args)  # one engine call
    vllm_cpu_lora.ENABLED = False
    try:
        theirs = sampler._generate_seeded(*args)
    finally:
        vllm_cpu_lora.ENABLED = True

    def gap(group, version):
        return version_gap(learner, weights, prompt, group, version)

    compared = 0
    for group, old, ref in zip(mixed, theirs, refs):
        own = 0 if ref is None else ref.version
        assert gap(group, own) < TOL
        assert gap(group, 302 if own != 302 else 301) > 10 * TOL  # and not another adapter's
        if ref is not None:
            for c, d in zip(group, old):
                same = next((i for i, (s, t) in enumerate(zip(c.token_ids, d.token_ids)) if s != t),
                            len(c.token_ids))
                if same:
                    compared += 1
                    assert max(abs(p - q) for p, q in zip(c.logprobs[:same], d.logprobs[:same])) < ATOL * 10
    assert compared >= 3
    sampler.evict(301)
    sampler.evict(302)


# ----------------------------------------------------------------------------------------------------------
# The vLLM plugin (rl_lora/sampling/vllm_plugin.py): how the path reaches an engine-core process of its own


@pytest.fixture
def fresh_plugin(monkeypatch):
    """The plugin's state and vLLM's CPU platform restored after the test."""
    from vllm.platforms import current_platform

    from rl_lora.sampling import vllm_plugin

    cls = type(current_platform)
    monkeypatch.setattr(cls, "get_punica_wrapper", cls.__dict__["get_punica_wrapper"])
    monkeypatch.setattr(vllm_plugin, "_installed", {})
    monkeypatch.delenv(vllm_plugin.ENV, raising=False)
    monkeypatch.delenv(vllm_plugin.DISABLE_RANK1, raising=False)
    monkeypatch.setattr(cls, "get_punica_wrapper", classmethod(lambda _cls: "vllm.stock.Wrapper"))
    return vllm_plugin, current_platform


def test_plugin_installs_only_what_rl_lora_asked_for(fresh_plugin, monkeypatch):
    vllm_plugin, platform = fresh_plugin
    vllm_plugin.register()  # a user's vLLM without rl-lora's request: untouched
    assert platform.get_punica_wrapper() == "vllm.stock.Wrapper"
    assert "lora_rank1" in vllm_plugin.wanted(8) and "lora_rank1" in vllm_plugin.wanted(vllm_cpu_lora.MAX_RANK)
    assert "lora_rank1" not in vllm_plugin.wanted(32)  # vLLM's own path above MAX_RANK
    monkeypatch.setenv(vllm_plugin.DISABLE_RANK1, "0")
    assert "lora_rank1" not in vllm_plugin.wanted(1)
    monkeypatch.delenv(vllm_plugin.DISABLE_RANK1)
    assert "lora_rank1" in vllm_plugin.wanted(1)
    monkeypatch.setenv(vllm_plugin.ENV, "lora_rank1")  # what Sampler sets for the engine's processes
    vllm_plugin.register()
    vllm_plugin.register()  # vLLM may load plugins more than once
    assert platform.get_punica_wrapper() == vllm_cpu_lora.QUALNAME


def test_a_later_engine_at_a_higher_rank_gets_vllms_own_wrapper(fresh_plugin):
    """Two Samplers in one process: the first (rank 8) installs the rank-1 wrapper; the second (rank 32, above
    MAX_RANK) must not inherit it (its base rows would then be batched with adapter rows through vLLM's own ops,
    which give them the last slot's adapter), and a third at rank 1 gets it back."""
    vllm_plugin, platform = fresh_plugin
    assert "lora_rank1" in vllm_plugin.request(8)
    assert platform.get_punica_wrapper() == vllm_cpu_lora.QUALNAME
    assert "lora_rank1" not in vllm_plugin.request(32)
    assert platform.get_punica_wrapper() == "vllm.lora.punica_wrapper.punica_cpu.PunicaWrapperCPU"
    assert "moe" in vllm_plugin.request(32) and vllm_plugin.install(["moe"]) == {"moe": True}
    vllm_plugin.request(1)
    assert platform.get_punica_wrapper() == vllm_cpu_lora.QUALNAME


def test_plugin_declared_as_vllm_entry_point():
    import tomllib
    from pathlib import Path

    from rl_lora.sampling import vllm_plugin

    meta = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    module, _, func = meta["project"]["entry-points"]["vllm.general_plugins"]["rl_lora"].partition(":")
    assert module == vllm_plugin.__name__ and func == "register"


def _entry_point_installed() -> bool:
    from importlib.metadata import entry_points

    return any(e.value == "rl_lora.sampling.vllm_plugin:register" for e in entry_points(group="vllm.general_plugins"))


@pytest.mark.slow
def test_engine_at_rank_3_mixed_batch_matches_learner(tiny_model):
    """Above rank 1 (max_lora_rank 3: a rank-8 engine, the adapters zero-padded by vLLM) the one-GEMM form serves
    the engine: base rows and three rank-3 adapters interleaved in one call, each row the learner's logprobs under
    its own adapter and not another's."""
    from sample_builders import build_learner

    from rl_lora.config import AdapterSpec
    from rl_lora.sampling.sampler import Sampler

    sampler = Sampler(tiny_model, max_model_len=512, max_lora_rank=3, max_loras=3, kvcache_gib=1)
    try:
        assert sampler.rank1_path
        learner = build_learner(tiny_model, AdapterSpec(rank=3, lr=1e-2), temperature=0.7)
        with torch.no_grad():  # B = 0 at init: A alone would not tell the rank components apart
            for m in learner.adapters.values():
                m.lora_A.normal_(0, 0.3)
        prompt = chat_prompt(sampler)
        weights = push_random_versions(sampler, learner, (1, 2, 3))
        versions = [0, 1, 2, 0, 3, 1]
        refs = [sampler.live.get(v) for v in versions]
        groups = sampler.generate([prompt] * len(refs), n=2, adapters=refs, seed=0, temperature=0.7, max_tokens=6)
        calls = sum(n for worker in sampler.llm.collective_rpc("rl_lora_punica") for _, n in worker)
        assert calls > 0  # served by the rank-1 path's module, not vLLM's ops
        for group, v in zip(groups, versions):
            assert version_gap(learner, weights, prompt, group, v) < TOL
            assert version_gap(learner, weights, prompt, group, 3 if v != 3 else 1) > 10 * TOL
    finally:
        sampler.close()


def _multiproc_child(model: str) -> None:
    """Runs in a subprocess whose engine core is spawned (so nothing patched in this process can leak into it):
    three adapters and base rows in one call; prints each row's gap to the learner and the workers' report."""
    import json

    from sample_builders import build_learner

    from rl_lora.config import AdapterSpec
    from rl_lora.learner.learner import TrainSample
    from rl_lora.sampling.sampler import Sampler

    sampler = Sampler(model, max_model_len=512, max_loras=4, kvcache_gib=1)
    learner = build_learner(model, AdapterSpec(lr=1e-2), temperature=0.7)
    prompt = chat_prompt(sampler)
    weights = {0: [torch.zeros_like(m.lora_B) for m in learner.adapters.values()]}
    for version in (1, 2, 3):
        with torch.no_grad():
            for m in learner.adapters.values():
                m.lora_B.normal_(0, 0.05)
        weights[version] = [m.lora_B.detach().clone() for m in learner.adapters.values()]
        sampler.push(version, learner.write_adapter, evict_older=False)
    versions = [0, 1, 2, 0, 3, 1, 0, 2]
    refs = [sampler.live.get(v) for v in versions]
    groups = sampler.generate([prompt] * len(refs), n=1, adapters=refs, seed=0, temperature=0.7, max_tokens=6)

    def gap(group, version):
        with torch.no_grad():
            for m, b in zip(learner.adapters.values(), weights[version]):
                m.lora_B.copy_(b)
        scored = learner.score([TrainSample(prompt, c.token_ids, c.logprobs, 0.0) for c in group])
        return max(abs(a - b) for c, lp in zip(group, scored) for a, b in zip(c.logprobs, lp))

    print("@@ " + json.dumps({
        "rank1_path": sampler.rank1_path, "report": sampler.llm.collective_rpc("rl_lora_punica"),
        "own": [gap(g, v) for g, v in zip(groups, versions)],
        "other": [gap(g, 3 if v != 3 else 1) for g, v in zip(groups, versions)]}), flush=True)
    sampler.close()


@pytest.mark.slow
@pytest.mark.skipif(not _entry_point_installed(), reason="rl-lora's vllm.general_plugins entry point is not "
                    "installed in this interpreter (pip install -e .): an engine-core process cannot get the path")
def test_multiprocess_engine_core_serves_rank1_path(tiny_model):
    """VLLM_ENABLE_V1_MULTIPROCESSING=1 (the GPU default) with a spawned engine core: the path gets there only through
    the entry point; the worker reports the rank-1 wrapper with calls served, one call mixing three adapters and
    base rows matches the learner row by row, and not another adapter."""
    import json
    import os
    import subprocess
    import sys

    from runhelpers import ROOT, TESTS

    env = dict(os.environ, PYTHONPATH=f"{TESTS / 'unit'}:{TESTS}:{ROOT}", VLLM_ENABLE_V1_MULTIPROCESSING="1",
               VLLM_WORKER_MULTIPROC_METHOD="spawn", WANDB_MODE="disabled")
    res = subprocess.run([sys.executable, "-c", f"import test_rank1_sampler as t; t._multiproc_child({tiny_model!r})"],
                         check=False, capture_output=True, text=True, cwd=ROOT, timeout=900, env=env)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "(EngineCore" in res.stdout + res.stderr  # vLLM's log prefix of an engine-core process
    got = json.loads(next(line[3:] for line in res.stdout.splitlines() if line.startswith("@@ ")))
    assert got["rank1_path"]
    [[(name, calls)]] = got["report"]  # one worker, one wrapper
    assert name == vllm_cpu_lora.QUALNAME and calls > 0
    assert max(got["own"]) < TOL
    assert min(got["other"]) > 10 * TOL


# ----------------------------------------------------------------------------------------------------------
# The fused rank-1 Triton kernel for GPUs (rl_lora/sampling/triton_rank1.py; not wired into vLLM), under Triton's interpreter


def _triton_child() -> None:
    """Runs with TRITON_INTERPRET=1: the kernel against vLLM's torch ops on a mixed batch, per slice layout."""
    import json

    from rl_lora.sampling.triton_rank1 import lora_rank1

    gen = torch.Generator().manual_seed(5)
    token_ids, ids = MAPPINGS["mixed adapters and base rows"], [11, 12, 13, 14, 15]
    slot = torch.tensor([ids.index(t) if t else -1 for t in token_ids], dtype=torch.int32)
    errors = {}
    for out_sizes in [(48,), (40, 24), (64, 16, 16)]:
        a, b = _layer(len(out_sizes), 5, 40, out_sizes, gen)
        x = torch.randn(len(token_ids), 40, generator=gen)
        y = torch.randn(len(token_ids), sum(out_sizes), generator=gen)
        want = _expected(x, y, a, b, token_ids, ids, out_sizes)
        got = y.clone()
        ends = tuple(sum(out_sizes[:i + 1]) for i in range(len(out_sizes)))
        lora_rank1(got, x, torch.stack([t[:, 0, 0, :] for t in a]), torch.cat([t[:, 0, :, 0] for t in b], 1),
                   slot, 1.0, ends, block_n=32, block_h=16)
        base = [i for i, t in enumerate(token_ids) if t == 0]
        errors[str(out_sizes)] = [(got - want).abs().max().item(), torch.equal(got[base], y[base]),
                                  (got - y).abs().max().item()]
    print("@@ " + json.dumps(errors), flush=True)


def test_triton_rank1_kernel_matches_vllm_ops_in_interpreter():
    import json
    import os
    import subprocess
    import sys

    from runhelpers import ROOT, TESTS

    pytest.importorskip("triton")
    env = dict(os.environ, PYTHONPATH=f"{TESTS / 'unit'}:{TESTS}:{ROOT}", TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", "import test_rank1_sampler as t; t._triton_child()"], check=False,
                         capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-4000:]
    got = json.loads(next(line[3:] for line in res.stdout.splitlines() if line.startswith("@@ ")))
    assert len(got) == 3
    for err, base_untouched, changed in got.values():
        assert err < 1e-4 and base_untouched and changed > 0.1
