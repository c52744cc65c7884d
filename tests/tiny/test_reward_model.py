"""The built-in reward-model reward (reward.reward_model) on a tiny random sequence classifier built on the fly,
and that reward/ imports neither torch nor vLLM at module import."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from reward import RewardRunner

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_reward_package_imports_neither_torch_nor_vllm():
    code = ("import sys, reward, reward.judge, reward.reward_model, reward.group_rewards, reward.pool;"
            "from reward import RewardRunner; RewardRunner(['reward_model', 'llm_judge'], num_workers=0);"
            "bad = [m for m in ('torch', 'vllm', 'transformers') if m in sys.modules]; assert not bad, bad")
    env = {**os.environ, "PYTHONPATH": ROOT}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


@pytest.fixture(scope="module")
def tiny_rm(tiny_model, tmp_path_factory):
    """A random 1-label LlamaForSequenceClassification with the tiny model's byte-level tokenizer."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForSequenceClassification

    path = tmp_path_factory.mktemp("tiny-rm")
    config = AutoConfig.from_pretrained(tiny_model)
    config.num_labels = 1
    torch.manual_seed(1)
    LlamaForSequenceClassification(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(path)
    return str(path)


def _direct(path, prompts, completions):
    """The classifier's score of each (prompt, completion), one at a time without padding, computed here."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    net = AutoModelForSequenceClassification.from_pretrained(path)
    out = []
    for p, c in zip(prompts, completions):
        text = tok.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": c}],
                                       tokenize=False)
        ids = tok(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out.append(net(**ids).logits[0, 0].item())
    return out


PROMPTS = ["What is 2+2?", "Name a prime.", "What is 2+2?", "Say hi"]
COMPLETIONS = ["4", "Seven is prime, and so is 11.", "It is five, I think", ""]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_reward_model_scores_batches_like_the_model(tiny_rm, num_workers):
    spec = {"name": "reward_model", "batch_size": 3, "timeout_s": 120,
            "kwargs": {"model": tiny_rm, "device": "cpu", "micro_batch": 2}}
    with RewardRunner([spec], num_workers=num_workers) as runner:
        assert runner.kinds() == {"reward_model": "batched"}
        res = runner.score(PROMPTS, COMPLETIONS, None)
    assert res.errors == 0 and res.timeouts == 0 and res.failed == [False] * 4
    want = _direct(tiny_rm, PROMPTS, COMPLETIONS)
    assert res.rewards == pytest.approx(want, abs=1e-4)
    assert len(set(round(v, 6) for v in res.rewards)) > 1  # a real model, not a constant


def test_reward_model_that_cannot_load_costs_counted_failures(tmp_path):
    spec = {"name": "reward_model", "kwargs": {"model": str(tmp_path / "missing")}}
    with RewardRunner([spec, {"name": "boxed_format"}], timeout_s=60, num_workers=0) as runner:
        res = runner.score(["q"] * 2, [r"\boxed{1}", "x"], None)
    assert res.errors == 2 and res.failed == [True, True]
    assert res.per_reward["boxed_format"] == [1.0, 0.0]


def test_reward_model_bad_label_and_over_the_limit(tiny_rm):
    bad_label = {"name": "reward_model", "kwargs": {"model": tiny_rm, "label": 3}}
    with RewardRunner([bad_label], timeout_s=60, num_workers=0) as runner:
        res = runner.score(PROMPTS[:2], COMPLETIONS[:2], None)
    assert res.errors == 2
    slow = {"name": "reward_model", "timeout_s": 0.001, "kwargs": {"model": tiny_rm}}
    with RewardRunner([slow], timeout_s=60, num_workers=0) as runner:
        res = runner.score(PROMPTS, COMPLETIONS, None)
    assert res.timeouts == 4 and res.failed == [True] * 4
