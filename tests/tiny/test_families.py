"""Model families: for every architecture the learner accepts, its logprobs and their gradients equal the model's
own `log_softmax(model(ids).logits / T)` (soft-capping, logit scales and an lm_head bias applied), and an output
layer it cannot reproduce is refused before any model loads. Tiny random models built on the fly (tiny_models.py)."""


import pytest
import tiny_models
import torch
from sample_builders import build_full_learner, build_learner, perturb_B, random_samples

from rl_lora.config import ALL_LINEAR, AdapterSpec, ConfigError
from rl_lora.learner import heads

TEMPERATURE = 0.7
FAMILIES = list(tiny_models.BUILDERS)
PHI_LINEAR = ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"]


@pytest.fixture(scope="module")
def family_paths(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = str(tiny_models.BUILDERS[name](tmp_path_factory.mktemp(name)))
        return cache[name]

    return get


def _targets(name):
    return PHI_LINEAR if name == "phi" else ALL_LINEAR


def _samples(seed=0):
    """Two groups sharing a prompt (the shared-prompt path where the family has it), uneven lengths."""
    return random_samples(seed, groups=2, group_size=3, vocab=(3, 250), prompt_len=(4, 9), completion_len=(1, 7),
                          logprob=-5.0)


def _learner(path, name, full, **kw):
    learner = (build_full_learner(path, temperature=TEMPERATURE, **kw) if full else
               build_learner(path, AdapterSpec(target_modules=_targets(name)), temperature=TEMPERATURE, **kw))
    if not full:  # a non-zero B, so the adapter changes the logprobs and A gets a gradient
        perturb_B(learner, 1, scale=0.05)
    return learner


def _plain_logprobs(model, samples):
    """log softmax(model(ids).logits / T) at each completion token: the model's own forward, plain autograd."""
    out = []
    for s in samples:
        ids = torch.tensor([s.prompt_ids + s.completion_ids])
        logits = model(input_ids=ids).logits[0].float()
        logp = torch.log_softmax(logits / TEMPERATURE, -1)
        positions = torch.arange(len(s.prompt_ids) - 1, len(s.prompt_ids) + len(s.completion_ids) - 1)
        out.append(logp[positions, torch.tensor(s.completion_ids)])
    return torch.cat(out)


def _trained(learner):
    return [p for p in learner.model.parameters() if p.requires_grad]


@pytest.mark.parametrize("full", [False, True], ids=["lora", "full_ft"])
@pytest.mark.parametrize("name", FAMILIES)
def test_learner_logprobs_and_gradients_equal_the_models_own_forward(family_paths, name, full):
    path = family_paths(name)
    samples = _samples()
    learner = _learner(path, name, full)
    # the reference: same weights, the model's own forward (its output layer, unfused MLPs, no prefix sharing)
    reference = _learner(path, name, full, fuse_mlp=False, share_prompts=False)
    if name in ("llama_tied", "qwen2", "qwen3"):
        assert learner.share_prompts
    ours = torch.cat([torch.tensor(row) for row in learner.score(samples)])
    plain = _plain_logprobs(reference.model, samples).detach()
    torch.testing.assert_close(ours, plain, rtol=1e-6, atol=1e-5)  # fp32 rounding of logprobs ~ -17 (Cohere)

    weights = torch.randn(len(plain), generator=torch.Generator().manual_seed(2))
    (learner.token_logprobs(samples) * weights).sum().backward()
    (_plain_logprobs(reference.model, samples) * weights).sum().backward()
    g_ours = torch.cat([p.grad.flatten() for p in _trained(learner)])
    g_plain = torch.cat([p.grad.flatten() for p in _trained(reference)])
    assert g_plain.abs().max() > 0
    torch.testing.assert_close(g_ours, g_plain, rtol=1e-4, atol=1e-5 * g_plain.abs().max().item())


def test_check_output_layer_reads_each_familys_output_layer(family_paths):
    expect = {"gemma2": heads.Head(softcap=5.0), "granite": heads.Head(scale=1 / 8), "cohere": heads.Head(scale=4.0)}
    for name in FAMILIES:
        assert heads.check_output_layer(family_paths(name)) == expect.get(name, heads.Head()), name


def test_families_with_a_known_transform_do_transform():
    """The table of transforms (heads.py) against transformers' own code: each listed family's forward does
    something beyond a plain head (it would be refused if it were not listed), and the plain ones do not."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as CAUSAL_LM

    for model_type in ("gemma2", "gemma3_text", "granite", "granitemoe", "cohere", "cohere2", "falcon_h1"):
        assert model_type in heads.KNOWN
        assert heads.unsupported_line(getattr(transformers, CAUSAL_LM[model_type])) is not None, model_type
    for model_type in ("llama", "qwen2", "qwen3", "mistral", "phi", "phi3", "gemma"):
        assert heads.unsupported_line(getattr(transformers, CAUSAL_LM[model_type])) is None, model_type


def test_unrecognised_output_transform_is_refused_before_any_model_loads(tmp_path):
    """xLSTM soft-caps its logits chunk by chunk: not in the table, so its forward's extra step is named."""
    from transformers import xLSTMConfig

    xLSTMConfig().save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="xLSTMForCausalLM transforms its output logits"):
        heads.check_output_layer(str(tmp_path))


def test_unreadable_config_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "no_such_family"}')
    with pytest.raises(ConfigError, match="model.path: transformers cannot read"):
        heads.check_output_layer(str(tmp_path))


def test_learner_refuses_an_output_layer_it_would_get_wrong(family_paths, monkeypatch):
    """The load-time check: with the soft-cap forgotten (the learner before issue 15) Gemma-2 is refused."""
    monkeypatch.setattr(heads, "head_of", lambda config: heads.Head())
    with pytest.raises(ConfigError, match="Gemma2ForCausalLM's own forward"):
        build_learner(family_paths("gemma2"), temperature=TEMPERATURE)


def test_cli_refuses_the_model_before_any_engine(tmp_path, tiny_model):
    """Through `rl-lora train`: exit 2, one line naming the feature, nothing trained."""
    from runhelpers import run_cli, write_config
    from transformers import xLSTMConfig

    model = tmp_path / "xlstm"
    xLSTMConfig().save_pretrained(model)
    res = run_cli(write_config(tmp_path, str(model)), "--quiet", timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert "xLSTMForCausalLM transforms its output logits" in last
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_gemma2_attention_softcap_is_applied(family_paths):
    """transformers' default SDPA attention drops Gemma-2's attention-logit soft-capping (vLLM applies it): the
    learner loads eager attention, so its logprobs are the true model's (the eager forward)."""
    from transformers import AutoModelForCausalLM

    path = family_paths("gemma2")
    learner = build_learner(path, temperature=TEMPERATURE)  # B = 0: the base model
    eager = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    samples = _samples()
    ours = torch.cat([torch.tensor(row) for row in learner.score(samples)])
    with torch.no_grad():
        torch.testing.assert_close(ours, _plain_logprobs(eager, samples), rtol=1e-6, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gemma2", "granite"])
def test_non_llama_family_trains_through_the_real_sampler(tmp_path, family_paths, name):
    """`rl-lora train` on a tiny Gemma-2 (soft-capped logits and attention) and Granite (scaled logits) through
    vLLM: every push check passes at the fp32 tolerance (1e-3) and step 1 is on-policy (rho = 1). Before issue 15
    the Gemma-2 run stopped at the first push ("stale or wrong adapter", the learner's head was uncapped)."""
    from runhelpers import run_cli, step_rows, write_config

    cfg = write_config(tmp_path, family_paths(name), train={"steps": 2, "save_every": 0})
    res = run_cli(cfg, "--quiet", timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = step_rows(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["push/probe_gap"] < 1e-4 for r in rows), [r["push/probe_gap"] for r in rows]
    assert abs(rows[0]["is/ratio_mean"] - 1) < 1e-4 and rows[0]["is/kl_sampler_learner"] < 1e-5
